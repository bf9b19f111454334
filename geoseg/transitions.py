"""The change stage on a cluster: two finished runs' mosaics -> change blocks in OUT/change.zarr,
the from-to matrix (transitions.{csv,json,png}) and change polygons; :mod:`geoseg.change` holds
the per-block maths.

DIR/change.zarr          from_class, to_class, changed, transition (from*K + to), on run A's grid
DIR/change_polygons.gpkg one polygon per contiguous change region (from_class, to_class, names, area_m2)
DIR/transitions.{csv,json,png}  the from-to matrix in pixels and km2
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
from distributed import Client, as_completed
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject, transform_bounds

from geoseg import change, mosaic, runstate, stac_item, storage, vectorize
from geoseg.blending import NODATA
from geoseg.config import ChangeConfig, VectorConfig
from geoseg.grid import OutputGrid
from geoseg.mosaic import CHANGE_STORE, MOSAIC_NAME
from geoseg.polygons import stream_polygons
from geoseg.progress import track
from geoseg.runstate import RunError, prepare_output
from geoseg.tiling import Block, Span, iter_blocks
from geoseg.vector_io import LayerWriter

log = logging.getLogger(__name__)


ARRAYS = ("from_class", "to_class", "changed", "transition")


@dataclass
class ChangeResult:
    store: str
    polygons: str | None
    matrix: np.ndarray
    files: dict[str, str]
    computed: int = 0
    reused: int = 0


def read_on_grid(store: str, target: OutputGrid, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
    """Classes and confidence of a mosaic for a window of ``target``: sliced if the grids share a lattice,
    else reprojected (nearest). Outside the mosaic: nodata."""
    source = mosaic.read_grid(store)
    shape = (rows.size, cols.size)
    classes = np.full(shape, NODATA, dtype=np.uint8)
    confidence = np.zeros(shape, dtype=np.uint8)
    s, t = source.affine, target.affine
    if source.crs == target.crs and np.allclose([s.a, s.e], [t.a, t.e]):
        dc, dr = (t.c - s.c) / s.a, (t.f - s.f) / s.e
        if abs(dc - round(dc)) < 1e-6 and abs(dr - round(dr)) < 1e-6:
            r0, c0 = rows.start + round(dr), cols.start + round(dc)
            rr0, rr1 = max(r0, 0), min(r0 + rows.size, source.height)
            cc0, cc1 = max(c0, 0), min(c0 + cols.size, source.width)
            if rr0 < rr1 and cc0 < cc1:
                dest = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
                classes[dest] = mosaic.read_region(store, slice(rr0, rr1), slice(cc0, cc1))
                confidence[dest] = mosaic.read_region(store, slice(rr0, rr1), slice(cc0, cc1), mosaic.CONFIDENCE)
            return classes, confidence
    window_transform = t @ Affine.translation(cols.start, rows.start)
    west, north = window_transform @ (0, 0)
    east, south = window_transform @ (cols.size, rows.size)
    bw, bs, be, bn = transform_bounds(target.crs, source.crs, west, south, east, north)
    inv = ~s
    c0, r0 = inv @ (bw, bn)
    c1, r1 = inv @ (be, bs)
    c0, c1 = max(int(np.floor(min(c0, c1))) - 2, 0), min(int(np.ceil(max(c0, c1))) + 2, source.width)
    r0, r1 = max(int(np.floor(min(r0, r1))) - 2, 0), min(int(np.ceil(max(r0, r1))) + 2, source.height)
    if c0 >= c1 or r0 >= r1:
        return classes, confidence
    src_transform = s @ Affine.translation(c0, r0)
    for name, dest, nodata in ((mosaic.CLASSES, classes, NODATA), (mosaic.CONFIDENCE, confidence, None)):
        data = mosaic.read_region(store, slice(r0, r1), slice(c0, c1), name)
        reproject(
            data,
            dest,
            src_transform=src_transform,
            src_crs=source.crs,
            dst_transform=window_transform,
            dst_crs=target.crs,
            resampling=Resampling.nearest,
            src_nodata=nodata,
            dst_nodata=nodata,
        )
    return classes, confidence


def change_task(
    block: Block,
    run_a: str,
    run_b: str,
    grid: OutputGrid,
    n_classes: int,
    cfg: ChangeConfig,
    out: str,
    run_id: str | None = None,
) -> np.ndarray:
    """A Dask task: change of one block (read with a halo for the MMU), written to the store; its
    matrix. With ``run_id``, nothing is written unless that change job still holds OUT's lease."""
    halo = cfg.mmu_pixels if cfg.mmu_pixels > 1 else 0
    rows = Span(max(0, block.rows.start - halo), min(grid.height, block.rows.stop + halo))
    cols = Span(max(0, block.cols.start - halo), min(grid.width, block.cols.stop + halo))
    a_cls, a_conf = read_on_grid(storage.join(run_a, MOSAIC_NAME), grid, rows, cols)
    b_cls, b_conf = read_on_grid(storage.join(run_b, MOSAIC_NAME), grid, rows, cols)
    result = change.detect_change(a_cls, b_cls, a_conf, b_conf, n_classes, cfg.min_confidence, cfg.mmu_pixels)
    inner = (
        slice(block.rows.start - rows.start, block.rows.stop - rows.start),
        slice(block.cols.start - cols.start, block.cols.stop - cols.start),
    )
    arrays = {name: getattr(result, name)[inner] for name in ARRAYS}
    runstate.require_lease(out, run_id)
    mosaic.write_region(storage.join(out, CHANGE_STORE), block, arrays)
    matrix = change.transition_matrix(arrays["transition"], n_classes)
    # Written after the region: a block with a marker is complete, a rerun skips it.
    runstate.commit_block(out, block.key, {"status": "done", "matrix": matrix.tolist()})
    return matrix


def change_polygon_task(block: Block, out: str, grid: OutputGrid, vector: VectorConfig) -> vectorize.BlockPolygons:
    rows, cols = block.region
    store = storage.join(out, CHANGE_STORE)
    transition = mosaic.read_region(store, rows, cols, "transition")
    changed = mosaic.read_region(store, rows, cols, "changed")
    codes = np.where(changed == 1, transition, NODATA).astype(np.uint8)
    return vectorize.polygonize_block(codes, block, grid.affine, grid.height, grid.width)


def change_fingerprint(run_a: str, run_b: str, cfg: ChangeConfig) -> str:
    """What determines the change pixels: both mosaics (by their own fingerprints) and the settings."""
    import hashlib

    def mosaic_id(run: str) -> str:
        return mosaic.read_attrs(storage.join(run, MOSAIC_NAME)).get("fingerprint", run)

    relevant = {
        "a": mosaic_id(run_a),
        "b": mosaic_id(run_b),
        "settings": cfg.model_dump(include={"min_confidence", "mmu_pixels", "block_size"}),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def check_overlap(a: OutputGrid, b: OutputGrid, run_a: str, run_b: str) -> None:
    aw, as_, ae, an = a.bounds
    bw, bs, be, bn = transform_bounds(b.crs, a.crs, *b.bounds)
    if bw >= ae or be <= aw or bs >= an or bn <= as_:
        raise RunError(f"{run_a} and {run_b} do not overlap: nothing to compare")


def change_runs(
    run_a: str, run_b: str, out: str, cfg: ChangeConfig, client: Client, run_id: str | None = None
) -> ChangeResult:
    store_a, store_b = storage.join(run_a, MOSAIC_NAME), storage.join(run_b, MOSAIC_NAME)
    legend = mosaic.read_legend(store_a)
    if mosaic.read_legend(store_b) != legend:
        raise RunError(f"{run_a} and {run_b} use different classes: {legend} vs {mosaic.read_legend(store_b)}")
    if sorted(legend) != list(range(len(legend))):  # a transition is coded from * n + to
        raise RunError(f"{run_a}: change detection needs classes numbered 0 to n-1, the run has {sorted(legend)}")
    grid = mosaic.read_grid(store_a)
    check_overlap(grid, mosaic.read_grid(store_b), run_a, run_b)
    n = len(legend)
    codes_legend = {f * n + t: f"{legend[f]} -> {legend[t]}" for f in range(n) for t in range(n)}
    layers = [
        mosaic.Layer("from_class", "uint8", NODATA, mosaic.class_attrs(legend, "class at the first date")),
        mosaic.Layer("to_class", "uint8", NODATA, mosaic.class_attrs(legend, "class at the second date")),
        mosaic.Layer("changed", "uint8", NODATA, {"long_name": "changed (1) or not (0)", "nodata": NODATA}),
        mosaic.Layer("transition", "uint8", NODATA, {"long_name": f"from_class * {n} + to_class", "nodata": NODATA}),
    ]
    store = storage.join(out, CHANGE_STORE)
    fingerprint = change_fingerprint(run_a, run_b, cfg)
    reused = prepare_output(out, fingerprint, cfg.overwrite, CHANGE_STORE)
    if not reused:
        mosaic.create_store(
            store,
            grid,
            cfg.block_size,
            layers,
            {
                "classes": {str(k): v for k, v in legend.items()},
                "run_a": str(run_a),
                "run_b": str(run_b),
                "min_confidence": cfg.min_confidence,
                "mmu_pixels": cfg.mmu_pixels,
            },
        )
    blocks = list(iter_blocks(grid.height, grid.width, cfg.block_size))
    stamp = time.time_ns()
    todo = [b for b in blocks if reused.get(b.key, {}).get("status") != "done"]
    futures = [
        client.submit(
            change_task, b, str(run_a), str(run_b), grid, n, cfg, str(out), run_id, key=f"change-{b.key}-{stamp}"
        )
        for b in todo
    ]
    matrix = np.zeros((n, n), dtype=np.int64)
    for record in reused.values():
        matrix += np.asarray(record["matrix"], dtype=np.int64)
    log.info("%d change blocks (%d reused)", len(blocks), len(blocks) - len(todo))
    for fut in track(as_completed(futures), total=len(futures), description="change blocks"):
        matrix += fut.result()
        fut.release()
    files = write_matrix(matrix, legend, vectorize.pixel_area_m2(grid), out)
    polygons = None
    if cfg.polygons:
        polygons = storage.join(out, "change_polygons.gpkg")

        def with_dates(gdf):
            codes = gdf["class_id"].astype(int)
            gdf.insert(0, "from_class", (codes // n).astype("uint8"))
            gdf.insert(1, "to_class", (codes % n).astype("uint8"))
            gdf.insert(2, "from_name", [legend[int(v)] for v in gdf["from_class"]])
            gdf.insert(3, "to_name", [legend[int(v)] for v in gdf["to_class"]])
            gdf = gdf.rename(columns={"class_id": "transition", "class_name": "transition_name"})
            return gdf.drop(columns=["mean_confidence"])

        count = stream_polygons(
            client,
            blocks,
            grid,
            out,
            codes_legend,
            [(LayerWriter(polygons, grid.crs_wkt), None)],
            VectorConfig(),
            task=change_polygon_task,
            finish=with_dates,
        )
        log.info("%d change polygons -> %s", count, polygons)
    files["item"] = write_change_item(out, run_a, run_b, grid, codes_legend, [store, polygons, *files.values()])
    return ChangeResult(store, polygons, matrix, files, computed=len(todo), reused=len(blocks) - len(todo))


def write_change_item(
    out: str, run_a: str, run_b: str, grid: OutputGrid, codes_legend: dict[int, str], outputs: list[str | None]
) -> str:
    """The change's STAC Item: the two runs' scenes give its time span, the first run its model."""
    a, b = (runstate.read_finished_manifest(r) for r in (run_a, run_b))
    record = {
        "grid": {
            "crs_wkt": grid.crs_wkt,
            "transform": list(grid.transform),
            "width": grid.width,
            "height": grid.height,
        },
        "scenes": [*a.get("scenes", []), *b.get("scenes", [])],
        "model": a.get("model", {}),
        "geoseg_version": a.get("geoseg_version", "unknown"),
        "run_id": None,
        "status": "finished",
    }
    item = stac_item.run_item(
        out,
        record,
        codes_legend,
        {},
        [storage.name(loc) for loc in outputs if loc],
        lineage=f"land-cover change from {run_a} to {run_b}: transition = from_class * K + to_class",
    )
    return stac_item.write_item(out, item)


def write_matrix(matrix: np.ndarray, legend: dict[int, str], pixel_m2: float, out: str) -> dict[str, str]:
    names = [legend[k] for k in sorted(legend)]
    km2 = matrix * pixel_m2 / 1e6
    lines = ["unit,from \\ to," + ",".join(names)]
    for unit, m in (("pixels", matrix), ("km2", km2)):
        for name, row in zip(names, m, strict=True):
            cells = ",".join(str(int(v)) if unit == "pixels" else f"{v:.6f}" for v in row)
            lines.append(f"{unit},{name},{cells}")
    files = {ext: storage.join(out, f"transitions.{ext}") for ext in ("csv", "json", "png")}
    storage.write_text(files["csv"], "\n".join(lines) + "\n")
    changed = int(matrix.sum() - np.trace(matrix))
    doc = {
        "classes": names,
        "pixels": matrix.tolist(),
        "km2": km2.round(6).tolist(),
        "valid_pixels": int(matrix.sum()),
        "changed_pixels": changed,
        "changed_km2": changed * pixel_m2 / 1e6,
        "pixel_area_m2": pixel_m2,
    }
    storage.write_text(files["json"], json.dumps(doc, indent=2))
    plot_matrix(matrix, names, files["png"])
    return files


def plot_matrix(matrix: np.ndarray, names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    shown = np.where(matrix > 0, matrix, np.nan)
    im = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(matrix.max(), 2)))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("to (second date)")
    ax.set_ylabel("from (first date)")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, f"{v:,}", ha="center", va="center", fontsize=7, color="white" if i != j else "black")
    ax.set_title("land-cover transitions (pixels; diagonal = unchanged)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="pixels")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
