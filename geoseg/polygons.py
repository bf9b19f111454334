"""The polygon stage on a cluster: each block polygonized on the workers, the pieces cut by block
edges merged there too, and the client writing layers as they arrive (:mod:`geoseg.vectorize`
holds the maths)."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import geopandas as gpd
import pyarrow as pa
import shapely
from distributed import Client, Future, as_completed
from rasterio.transform import Affine

from geoseg import runstate, storage, vectorize
from geoseg.blocks import has_classes, polygonize_task
from geoseg.config import VectorConfig
from geoseg.grid import OutputGrid
from geoseg.progress import track
from geoseg.tiling import Block
from geoseg.vector_io import LayerWriter, decode_rows, encode_frame, encode_rows, slice_rows

log = logging.getLogger(__name__)


MERGE_GROUPS = 8  # tasks that merge the pieces cut by block edges, classes shared out by id
# The merged rows grow with the block edges: a group's rows reach the client in one slice per
# this many blocks, so that what the client holds at once does not grow with the scene.
BLOCKS_PER_SLICE = 16


def stream_polygons(
    client: Client,
    blocks: list[Block],
    grid: OutputGrid,
    out: str,
    legend: dict[int, str],
    writers: list[tuple[LayerWriter, str | None]],
    vector: VectorConfig,
    task: Callable[..., vectorize.BlockPolygons] | None = None,
    finish: Callable[[gpd.GeoDataFrame], gpd.GeoDataFrame] | None = None,
) -> int:
    """Polygonize per block on the workers and write polygons as blocks finish; returns the polygon count.

    ``task(block, out=, grid=, vector=)`` polygonizes a block (default: the class mosaic's);
    see :func:`submit_layers` and :func:`write_layers`.
    """
    try:
        parts = submit_parts(client, blocks, out, grid, vector, legend, task)
        layers = submit_layers(client, parts, grid, legend, vector)
    except BaseException:  # nothing submitted: nothing to write, and no staging left behind
        for writer, _ in writers:
            writer.abort()
        raise
    return write_layers(layers, writers, finish)


def submit_parts(
    client: Client,
    blocks: list[Block],
    out: str,
    grid: OutputGrid,
    vector: VectorConfig,
    legend: dict[int, str],
    task: Callable[..., vectorize.BlockPolygons] | None = None,
    after: dict[str, list[Any]] | None = None,
    run_id: str | None = None,
) -> list[tuple[Block, Future]]:
    """Each block's share of the layer (:class:`BlockLayer`) as a task: its polygons by ``task``
    (default :func:`geoseg.blocks.polygonize_task` with ``run_id``: a worker opens the mosaic
    once for all its blocks), given ``after[block key]``: its own record, then the tasks it must
    wait for."""
    stamp = time.time_ns()
    task = layer_task(task or partial(polygonize_task, run_id=run_id or uuid.uuid4().hex), grid.crs_wkt, legend, vector)
    after = after or {}
    return [
        (
            b,
            client.submit(
                task,
                b,
                *after.get(b.key, []),
                out=str(out),
                grid=grid,
                vector=vector,
                key=f"polygonize-{b.key}-{stamp}",
            ),
        )
        for b in blocks
    ]


def submit_layers(
    client: Client, parts: list[tuple[Block, Future]], grid: OutputGrid, legend: dict[int, str], vector: VectorConfig
) -> list[Future]:
    """The polygon layer's rows as tasks, in order: each block's finished polygons (``parts``,
    futures of :class:`BlockLayer` in block order), then the merge of the pieces cut by block
    edges (one task per group of classes, ``MERGE_GROUPS`` at most, its rows handed on in slices
    of about ``BLOCKS_PER_SLICE`` blocks' worth). All the work is the workers'."""
    stamp = time.time_ns()
    crs, tolerance = grid.crs_wkt, vector.simplify_tolerance
    # fixed, not from the cluster's size: with simplification, a group is simplified as a batch
    groups = max(1, min(len(legend), MERGE_GROUPS))
    # one small task per block hands its edge pieces on: a worker fetches a block's pieces once
    # for all the groups it merges, and the block's finished rows never travel to a merge
    edges = [client.submit(edge_of, part, key=f"edge-pieces-{b.key}-{stamp}") for b, part in parts]
    merged = [
        client.submit(
            merged_rows,
            grid.affine,
            crs,
            legend,
            tolerance,
            groups,
            g,
            *edges,
            key=f"merged-polygons-{g}-{stamp}",
        )
        for g in range(groups)
    ]
    finals = [part for _, part in parts]
    slices = -(-len(parts) // BLOCKS_PER_SLICE)
    if slices <= 1:
        return finals + merged
    return finals + [
        client.submit(slice_rows, group, k, slices, key=f"merged-slice-{g}-{k}-{stamp}")
        for g, group in enumerate(merged)
        for k in range(slices)
    ]


@dataclass(frozen=True)
class BlockLayer:
    """A block's share of the polygon layer: its finished polygons' rows, for the client, and its
    pieces cut by block edges, for the merge tasks (through :func:`edge_of`). One task makes
    both: a task costs the scheduler and the worker ~2 ms whatever it does. The pieces travel as
    WKB (:func:`pack`): the client, which fetches the whole, never builds their geometries."""

    rows: pa.Table
    edge: pa.Table


def pack(pieces: vectorize.Polygons) -> pa.Table:
    """Polygons as an Arrow table, their geometries as WKB."""
    return pa.table(
        {
            "class_id": pieces.class_ids,
            "pixels": pieces.pixels,
            "confidence_sum": pieces.confidence_sums,
            "wkb": pa.array(shapely.to_wkb(pieces.geometries), type=pa.binary()),
        }
    )


def unpack(table: pa.Table) -> vectorize.Polygons:
    """The polygons of :func:`pack`."""
    columns = [table[name].to_numpy(zero_copy_only=False) for name in ("class_id", "wkb", "pixels", "confidence_sum")]
    class_ids, wkb, pixels, confidence_sums = columns
    return vectorize.Polygons(class_ids, shapely.from_wkb(wkb), pixels, confidence_sums)


def layer_task(
    task: Callable[..., vectorize.BlockPolygons], crs: str, legend: dict[int, str], vector: VectorConfig
) -> Callable[..., BlockLayer]:
    """``task`` (a block's polygons) made to hand on its :class:`BlockLayer`."""
    return partial(block_layer, task, crs=crs, legend=legend, simplify_tolerance=vector.simplify_tolerance)


def block_layer(
    task: Callable[..., vectorize.BlockPolygons],
    *args: Any,
    crs: str,
    legend: dict[int, str],
    simplify_tolerance: float,
    **kwargs: Any,
) -> BlockLayer:
    """A task: ``task(*args, **kwargs)``'s polygons as a :class:`BlockLayer`."""
    part = task(*args, **kwargs)
    return BlockLayer(encode_rows(*vectorize.final_layer(part, crs, legend, simplify_tolerance), crs), pack(part.edge))


def edge_of(layer: BlockLayer) -> pa.Table:
    """A task: the pieces of a block cut by block edges (what the merge tasks need of it)."""
    return layer.edge


def merged_rows(transform: Affine, crs: str, legend: dict[int, str], tolerance: float, *args: Any) -> pa.Table:
    """A task: the encoded rows of :func:`geoseg.vectorize.merged_layer` over the blocks' edge
    pieces (:func:`edge_of`, the last of ``args``) of the classes in ``group`` (of ``groups``,
    by class id)."""
    groups, group, *edges = args
    # only this group's pieces are decoded (every group is handed every block's pieces)
    pieces = [unpack(edge.filter(edge["class_id"].to_numpy() % groups == group)) for edge in edges]
    return encode_rows(*vectorize.merged_layer(transform, crs, legend, tolerance, *pieces), crs)


class LayerSink:
    """Writes the rows of :func:`submit_layers` in their order (so reruns give the same file),
    whatever order their tasks finish in. A finished task's rows are fetched at once (a worker
    lost meanwhile would have them computed again), up to ``HELD`` tasks' rows waiting for an
    earlier one; past that they wait on the workers, so the client's memory does not grow with
    the scene. Each writer gets the polygons in the mosaic CRS, or reprojected to the CRS paired
    with it; ``finish`` adapts each batch's columns before it is written. Only the writing is
    the client's. After a task fails, the later ones are released unwritten."""

    HELD = 8

    def __init__(
        self,
        layers: list[Future],
        writers: list[tuple[LayerWriter, str | None]],
        finish: Callable[[gpd.GeoDataFrame], gpd.GeoDataFrame] | None = None,
    ) -> None:
        self.layers, self.writers, self.finish = layers, writers, finish
        self._order = {fut.key: i for i, fut in enumerate(layers)}
        self._finished: set[int] = set()
        self._held: dict[int, pa.Table] = {}
        self._next = 0
        self._failed = False
        self.count = 0

    def add(self, fut: Future) -> None:
        """A finished layer task: its rows, and those of the later ones that wait for it, are
        written once every earlier task's are."""
        if self._failed:
            fut.release()
            return
        index = self._order[fut.key]
        self._finished.add(index)
        if index != self._next and len(self._held) < self.HELD:
            self._held[index] = self._fetch(fut)
        while self._next in self._finished:
            self._finished.discard(self._next)
            rows = self._held.pop(self._next, None)
            if rows is None:
                rows = self._fetch(self.layers[self._next])
            self._next += 1
            frame = None  # the rows decoded, once, where columns are adapted or reprojected
            if self.finish is not None:
                frame = self.finish(decode_rows(rows))
                rows = encode_frame(frame)
            reprojected: dict[str, pa.Table] = {}  # once per CRS, whatever the formats
            for writer, to_crs in self.writers:
                if to_crs is not None and to_crs not in reprojected:
                    frame = decode_rows(rows) if frame is None else frame
                    reprojected[to_crs] = encode_frame(frame.to_crs(to_crs))
                writer.write(rows if to_crs is None else reprojected[to_crs])
            self.count += rows.num_rows

    def _fetch(self, fut: Future) -> pa.Table:
        try:
            result = fut.result()
            return result.rows if isinstance(result, BlockLayer) else result
        except BaseException:
            self._failed = True
            self._held.clear()
            for later in self.layers[self._next :]:
                later.release()
            raise
        finally:
            fut.release()

    def close(self) -> int:
        """Close the files (every layer task added); the polygon count."""
        for writer, _ in self.writers:
            writer.close()
        return self.count

    def abort(self) -> None:
        """After a failure: no half layer is left, here or on a store."""
        for writer, _ in self.writers:
            writer.abort()


def write_layers(
    layers: list[Future],
    writers: list[tuple[LayerWriter, str | None]],
    finish: Callable[[gpd.GeoDataFrame], gpd.GeoDataFrame] | None = None,
) -> int:
    """Write the rows of :func:`submit_layers` (see :class:`LayerSink`) and close the writers;
    returns the polygon count."""
    sink = LayerSink(layers, writers, finish)
    try:
        for fut in track(as_completed(layers), total=len(layers), description="vectorizing blocks"):
            sink.add(fut)
        return sink.close()
    except BaseException:
        sink.abort()
        raise


LAYER_SUFFIXES = {"gpkg": ".gpkg", "parquet": ".parquet", "fgb": ".fgb"}


def crs_tag(crs: str) -> str:
    """How the copy of a layer in ``crs`` is named: ``_epsg4326`` by the CRS's code, else by a
    short hash of its text (a WKT or PROJ string is no file name)."""
    from pyproj import CRS

    authority = CRS.from_user_input(crs).to_authority()
    if authority is not None:
        return f"_{authority[0].lower()}{authority[1]}"
    return "_crs" + hashlib.sha256(crs.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class LayerFiles:
    """The polygon layer's files under a run's OUT: one per format of ``vector.formats``, and again
    in ``vector.reproject_to``. Each ``writer`` is given the rows; a FlatGeobuf, which cannot grow,
    is converted from its GeoPackage (always written) as that is closed."""

    writers: list[tuple[LayerWriter, str | None]]
    files: dict[str, str]  # by format, and the CRS's tag for the copy: gpkg, parquet, gpkg_epsg4326...

    @property
    def gpkg(self) -> str:
        return self.files["gpkg"]


def layer_files(out: str, crs: str, vector: VectorConfig) -> LayerFiles:
    """The writers of the layer's files (:class:`LayerFiles`); ``crs``: the mosaic's."""
    writers: list[tuple[LayerWriter, str | None]] = []
    try:
        for tag, to_crs in _targets(vector):
            at = {fmt: storage.join(out, f"polygons{tag}{suffix}") for fmt, suffix in LAYER_SUFFIXES.items()}
            fgb = at["fgb"] if "fgb" in vector.formats else None
            writers.append((LayerWriter(at["gpkg"], to_crs or crs, flatgeobuf=fgb), to_crs))
            if "parquet" in vector.formats:
                writers.append((LayerWriter(at["parquet"], to_crs or crs), to_crs))
    except BaseException:  # the layers begun are dropped: no staging left behind
        for writer, _ in writers:
            writer.abort()
        raise
    return LayerFiles(writers, layer_locations(out, vector))


def _targets(vector: VectorConfig) -> list[tuple[str, str | None]]:
    """The layer's CRSs: the mosaic's (no tag), and ``reproject_to`` with its tag."""
    return [("", None)] + ([(crs_tag(vector.reproject_to), vector.reproject_to)] if vector.reproject_to else [])


def layer_locations(out: str, vector: VectorConfig) -> dict[str, str]:
    """Where ``vector``'s layer files go, by format and CRS tag (gpkg, parquet, gpkg_epsg4326...)."""
    return {
        f"{fmt}{tag}": storage.join(out, f"polygons{tag}{LAYER_SUFFIXES[fmt]}")
        for tag, _ in _targets(vector)
        for fmt in ["gpkg", *vector.formats]
    }


def asked_layers(out: str, vector: VectorConfig) -> dict[str, str | None]:
    """The layers ``vector`` asks for, as a manifest names its outputs (:func:`layer_outputs`)."""
    return layer_outputs(LayerFiles([], layer_locations(out, vector)))


def announce_layers(out: str, manifest: dict[str, Any], vector: VectorConfig) -> dict[str, Any]:
    """The manifest written naming, besides the layers it names, those about to be written for
    ``vector``: a job killed while writing them leaves none its successor does not know of (and
    remove if no longer asked for). Returns the manifest as written."""
    outputs = manifest.get("outputs", {}) | asked_layers(out, vector)
    announced = {**manifest, "outputs": outputs}
    runstate.write_manifest(out, announced)
    return announced


def write_polygons(
    client: Client,
    blocks: list[Block],
    grid: OutputGrid,
    out: str,
    legend: dict[int, str],
    vector: VectorConfig,
) -> tuple[LayerFiles, int]:
    """The run's polygon layer, in every format asked (:class:`LayerFiles`), and its polygon count."""
    files = layer_files(out, grid.crs_wkt, vector)
    count = stream_polygons(client, blocks, grid, out, legend, files.writers, vector)
    log.info("%d polygons -> %s", count, ", ".join(files.files.values()))
    return files, count


def layer_outputs(files: LayerFiles | None) -> dict[str, str | None]:
    """The polygon layers as a manifest names its outputs: ``polygons`` (the GeoPackage) and
    ``polygons_<format><crs tag>`` for the others."""
    if files is None:
        return {"polygons": None}
    return {"polygons": files.gpkg} | {f"polygons_{key}": loc for key, loc in files.files.items() if key != "gpkg"}


def record_layers(out: str, manifest: dict[str, Any], vector: VectorConfig, files: LayerFiles) -> list[str]:
    """Name a finished run's polygon layers as they are now in its manifest, with the vector
    settings that made them (a later export starts from these), and remove its layers of formats
    or CRSs no longer asked for (:func:`stale_layers`): the names of those removed."""
    before = manifest.get("outputs", {})
    outputs = {k: v for k, v in before.items() if not k.startswith("polygons")} | layer_outputs(files)
    config = {**manifest.get("config", {}), "vector": vector.model_dump(mode="json")}
    runstate.write_manifest(out, {**manifest, "config": config, "outputs": outputs})
    stale = stale_layers(before, files)
    remove_layers(out, stale)
    return stale


def stale_layers(before: dict[str, Any], files: LayerFiles | None) -> list[str]:
    """The names of the polygon layers a run's manifest named (its ``outputs``, ``before``) that
    ``files`` no longer writes: they hold the old polygons. Layers are known by name in OUT: a
    run folder copied elsewhere names its old location, whose files are not its own."""
    written = {storage.name(loc) for loc in files.files.values()} if files is not None else set()
    return sorted({storage.name(loc) for k, loc in before.items() if k.startswith("polygons") and loc} - written)


def remove_layers(out: str, names: list[str]) -> None:
    for name in names:
        storage.delete(storage.join(out, name))


def blocks_with_classes(manifest: dict, block_size: int, blocks: list[Block]) -> list[Block]:
    """The blocks (of ``block_size``) a finished run's manifest says hold a class: the others have
    no polygon. Blocks of another size than the run's cannot be told apart: all of them."""
    if manifest.get("config", {}).get("output", {}).get("block_size") != block_size:
        return blocks
    records = manifest.get("blocks", {})
    return [b for b in blocks if has_classes(records.get(b.key))]
