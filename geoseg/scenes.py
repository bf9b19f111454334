"""Scene catalog and windowed reads: headers only up front, pixels only per block."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geoseg import band_assets, storage

SUPPORTED_DTYPES = frozenset({"uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"})
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class SceneError(Exception):
    """A scene that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class RasterGrid:
    """A north-up pixel grid: CRS (as WKT, cheap to ship to workers), geotransform and size."""

    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    @property
    def rotated(self) -> bool:
        """Whether the grid's axes are turned (terms below a millionth of the pixel size are rounding)."""
        a, b, _, d, e, _ = self.transform
        return abs(b) > 1e-6 * abs(e) or abs(d) > 1e-6 * abs(a)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in the grid's CRS; of the four corners where the grid is rotated."""
        t = self.affine
        corners = [t * corner for corner in [(0, 0), (self.width, 0), (0, self.height), (self.width, self.height)]]
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def pixel_size(self) -> tuple[float, float]:
        """Width and height of a pixel in CRS units (rotated or not)."""
        a, b, _, d, e, _ = self.transform
        return float(np.hypot(a, d)), float(np.hypot(b, e))


@dataclass(frozen=True)
class SceneInfo(RasterGrid):
    """What a scene's header says."""

    path: str = ""
    count: int = 0
    dtype: str = ""
    nodata: float | None = None
    acquired: str | None = None  # ISO date-time of acquisition, when known
    block_rows: int = 0  # height of the file's internal blocks (tiles or strips); 0: unknown
    bands: tuple[int, ...] = ()  # the file's bands (1-based) in the model's order; (): all, as stored
    scales: tuple[float, ...] = ()  # per model band, applied on read: value * scale + offset; (): none
    offsets: tuple[float, ...] = ()
    mask: BandMask | None = None  # a band that marks clouds, shadows...: invalid where it says so
    resampling: str = "bilinear"  # of the bands when the scene is warped onto the output grid
    vrt: str = field(default="", repr=False)  # a STAC item's band assets as a GDAL VRT (geoseg.band_assets)

    @property
    def indexes(self) -> list[int]:
        """The bands to read, in the model's order."""
        return list(self.bands) if self.bands else list(range(1, self.count + 1))


@dataclass(frozen=True)
class BandMask:
    """A mask band (a scene classification, a QA band): its pixels whose value is one of
    ``invalid_values``, or that have any of the bits of ``invalid_bits`` set, are invalid."""

    band: int
    invalid_values: tuple[int, ...] = ()
    invalid_bits: int = 0

    def valid(self, values: np.ndarray) -> np.ndarray:
        codes = values.astype(np.int64, copy=False)
        ok = ~np.isin(codes, self.invalid_values) if self.invalid_values else np.ones(codes.shape, dtype=bool)
        if self.invalid_bits:
            ok &= (codes & self.invalid_bits) == 0
        return ok


@dataclass(frozen=True)
class BandSelection:
    """How the model's bands are found in a file: by the file's band descriptions (the names,
    case aside), by an explicit map (name -> band number or description), or as stored when the
    file has exactly as many bands; plus an optional mask band and whether scale/offset apply."""

    names: tuple[str, ...]
    explicit: tuple[tuple[str, int | str], ...] = ()
    mask_band: int | str | None = None
    invalid_values: tuple[int, ...] = ()
    invalid_bits: int = 0
    apply_scale: bool = True
    resampling: str = "bilinear"  # of the bands on another grid (a mask: nearest, always)


def open_scene(
    path: str | Path, expected_bands: int | None = None, selection: BandSelection | None = None
) -> SceneInfo:
    """Read and check a scene's header (a local file or a URL); raise :class:`SceneError` naming
    the file and the problem. With ``selection``, the model's bands are found by name (see
    :class:`BandSelection`), with the file's own scale and offset per band."""
    path = str(path)
    vrt, acquired = "", None
    if band_assets.is_item_ref(path):
        vrt, acquired = item_vrt(path, selection)
    elif storage.is_url(path):
        try:
            if not storage.exists(path):
                raise SceneError(path, "no such object")
        except storage.StorageError as exc:
            raise SceneError(path, exc.reason) from None
    elif not Path(path).is_file():
        raise SceneError(path, "file not found")
    try:
        src = open_vrt(vrt) if vrt else storage.open_raster(path)
    except Exception as exc:
        reason = storage.redact(_gdal_message(exc))
        if said := storage.http_reason(reason):
            raise SceneError(path, f"{said} ({reason})") from None
        if not vrt and _signature(path) in TIFF_SIGNATURES:  # a TIFF's header cut off or damaged
            raise SceneError(path, f"a TIFF that cannot be read, truncated or corrupt ({reason})") from None
        raise SceneError(path, f"not a readable raster ({reason})") from None
    with src:
        info = SceneInfo(
            path=str(path),
            crs_wkt=src.crs.to_wkt() if src.crs else "",
            transform=tuple(src.transform)[:6],
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            nodata=src.nodata,
            acquired=acquired or acquisition_time(src.tags()),
            block_rows=src.block_shapes[0][0],
            vrt=vrt,
        )
        if selection is not None:
            # a VRT's bands are already the model's, in its order, named by it: no map applies
            chosen = replace(selection, explicit=()) if vrt else selection
            info = select_bands(info, chosen, src.descriptions, src.scales, src.offsets)
        # A header can be intact while the pixel data is truncated: touch the last block.
        try:
            src.read(1, window=Window(src.width - 1, src.height - 1, 1, 1))
        except Exception as exc:
            reason = storage.redact(_gdal_message(exc))
            if said := storage.http_reason(reason):
                raise SceneError(path, f"{said} reading pixel data ({reason})") from None
            raise SceneError(path, f"cannot read pixel data, truncated or corrupt ({reason})") from None
    if not info.crs_wkt:
        raise SceneError(path, "has no CRS; georeference it first (e.g. gdal_edit.py -a_srs)")
    if info.affine.is_identity:
        raise SceneError(path, "has no geotransform")
    if info.dtype not in SUPPORTED_DTYPES:
        raise SceneError(path, f"unsupported data type {info.dtype}")
    if expected_bands is not None and not info.bands and info.count != expected_bands:
        raise SceneError(path, f"has {info.count} bands, the model expects {expected_bands}")
    return info


def item_vrt(ref: str, selection: BandSelection | None) -> tuple[str, str | None]:
    """A STAC item's band assets for the model (and its mask asset) as a VRT, and the item's datetime."""
    if selection is None:
        raise SceneError(ref, "a STAC item of band assets needs the model's band names")
    if isinstance(selection.mask_band, int):
        raise SceneError(ref, "a STAC item's mask is named by mask.asset (its asset key), not a band number")
    mask = selection.mask_band
    try:
        item, _sources = band_assets.item_sources(ref, list(selection.names), mask, selection.resampling)
        return band_assets.vrt_xml(_sources), item.get("properties", {}).get("datetime")
    except (band_assets.AssetError, storage.StorageError) as exc:
        raise SceneError(ref, str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise SceneError(ref, f"not a usable STAC item ({type(exc).__name__}: {exc})") from None


def open_dataset(info: SceneInfo) -> DatasetReader:
    """A scene opened for reading: its file, or its VRT of band assets. A scene that opened when
    the run was planned may be gone since (a bucket's lifecycle rule, a file moved): the error
    names it and says why."""
    try:
        return open_vrt(info.vrt) if info.vrt else storage.open_raster(info.path)
    except rasterio.errors.RasterioError as exc:
        reason = storage.redact(_gdal_message(exc))
        said = storage.http_reason(reason)
        raise SceneError(info.path, f"{said} ({reason})" if said else f"cannot be opened ({reason})") from None


def open_vrt(xml: str) -> DatasetReader:
    """A VRT document, its sources opened with the options for files over a network."""
    with storage.gdal_env(**storage.REMOTE_OPEN_OPTIONS):
        return rasterio.open(xml)


def select_bands(
    info: SceneInfo,
    selection: BandSelection,
    descriptions: tuple[str | None, ...],
    scales: tuple[float, ...],
    offsets: tuple[float, ...],
) -> SceneInfo:
    """``info`` with the file's bands for the model's names, their scale/offset and the mask band."""
    by_description = {d.strip().lower(): i + 1 for i, d in enumerate(descriptions) if d}

    def band(spec: int | str, what: str) -> int:
        if isinstance(spec, int):
            if not 1 <= spec <= info.count:
                raise SceneError(info.path, f"{what}: band {spec} does not exist (the file has {info.count})")
            return spec
        if spec.strip().lower() not in by_description:
            known = ", ".join(d for d in descriptions if d) or f"{info.count} bands without names"
            raise SceneError(info.path, f"has no band {spec!r} for {what} (its bands: {known})")
        return by_description[spec.strip().lower()]

    explicit = dict(selection.explicit)
    if explicit:
        indexes = tuple(band(explicit.get(name, name), f"model band {name!r}") for name in selection.names)
    elif all(name.lower() in by_description for name in selection.names):
        indexes = tuple(by_description[name.lower()] for name in selection.names)
    elif info.count == len(selection.names) and not any(name.lower() in by_description for name in selection.names):
        indexes = tuple(range(1, info.count + 1))  # no names to go by: as stored
    else:
        missing = next(name for name in selection.names if name.lower() not in by_description)
        indexes = (band(missing, f"model band {missing!r}"),)  # raises, naming the band
    picked_scales = tuple(float(scales[i - 1]) for i in indexes) if selection.apply_scale else ()
    picked_offsets = tuple(float(offsets[i - 1]) for i in indexes) if selection.apply_scale else ()
    if all(sc == 1.0 for sc in picked_scales) and all(of == 0.0 for of in picked_offsets):
        picked_scales = picked_offsets = ()
    mask = None
    if selection.mask_band is not None:
        mask = BandMask(band(selection.mask_band, "the mask"), selection.invalid_values, selection.invalid_bits)
    same = indexes == tuple(range(1, info.count + 1))
    return replace(
        info,
        bands=() if same else indexes,
        scales=picked_scales,
        offsets=picked_offsets,
        mask=mask,
        resampling=selection.resampling,
    )


@dataclass(frozen=True)
class DataCoverage:
    """Which internal blocks of a tiled GeoTIFF hold data. A sparse file leaves blocks out, and
    GDAL reads an absent block as nodata: pixels there are invalid without reading them."""

    block_height: int
    block_width: int
    present: np.ndarray  # bool, (block rows, block columns) of the file

    def any_in(self, rows: tuple[int, int], cols: tuple[int, int]) -> bool:
        """Whether any block with data meets the file's pixels ``rows`` x ``cols`` (half-open)."""
        r0, r1 = max(0, rows[0]) // self.block_height, -(-max(0, rows[1]) // self.block_height)
        c0, c1 = max(0, cols[0]) // self.block_width, -(-max(0, cols[1]) // self.block_width)
        return bool(self.present[r0:r1, c0:c1].any())


def data_coverage(path: str | Path, max_blocks: int = 4_000_000) -> DataCoverage | None:
    """The blocks of a sparse GeoTIFF that hold data, from its block offsets (header only; a
    query costs well under a microsecond). None where every block is there, or where absent
    blocks would not read as nodata (no nodata value) or the file is no GeoTIFF."""
    with storage.open_raster(path) as src:
        # Only where validity comes from the nodata value: an absent block under a mask band
        # (internal mask, alpha) reads as nodata values that the mask may still call valid.
        if src.driver != "GTiff" or src.nodata is None or any(f != [MaskFlags.nodata] for f in src.mask_flag_enums):
            return None
        bh, bw = src.block_shapes[0]
        rows, cols = -(-src.height // bh), -(-src.width // bw)
        if rows * cols > max_blocks:
            return None
        # Band 1 suffices: where its block is absent it is nodata, and a pixel nodata in any band is invalid.
        offsets = (src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1) for r in range(rows) for c in range(cols))
        present = np.fromiter((bool(o) for o in offsets), dtype=bool, count=rows * cols).reshape(rows, cols)
    return None if present.all() else DataCoverage(bh, bw, present)


def acquisition_time(tags: dict[str, str]) -> str | None:
    """ISO acquisition time from common GeoTIFF tags (``ACQUISITION_DATETIME``, ``TIFFTAG_DATETIME``)."""
    for key in ("ACQUISITION_DATETIME", "DATETIME", "TIFFTAG_DATETIME"):
        value = tags.get(key)
        if value:
            date, _, time = value.strip().partition(" ")
            if key == "TIFFTAG_DATETIME":  # "YYYY:MM:DD HH:MM:SS"
                date = date.replace(":", "-")
            return f"{date}T{time}" if time else date
    return None


def _signature(loc: str) -> bytes:
    """A file's first 4 bytes, which tell a TIFF; b"" where they cannot be read for a reason
    that may pass. A store that refuses them (a HEAD allowed, a GET not) says why."""
    try:
        (head,) = storage.read_ranges(loc, [[0, 4]])
    except storage.StorageError as exc:
        if exc.lasting:
            raise SceneError(loc, exc.reason) from None
        return b""
    except (OSError, ValueError):
        return b""
    return head


def _gdal_message(exc: BaseException) -> str:
    """The most specific message in an exception chain (rasterio wraps GDAL's)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return storage.gdal_reason(str(exc))


def same_grid(info: SceneInfo, crs: CRS, transform: Affine, tol: float = 1e-6) -> bool:
    """Whether the scene's pixels coincide with the output grid's (so no warping is needed)."""
    if info.crs != crs:
        return False
    a, b = info.affine, transform
    if not np.allclose([a.a, a.b, a.d, a.e], [b.a, b.b, b.d, b.e], rtol=tol, atol=0):
        return False
    col_off = (a.c - b.c) / b.a
    row_off = (a.f - b.f) / b.e
    return abs(col_off - round(col_off)) < tol and abs(row_off - round(row_off)) < tol


def read_window(
    info: SceneInfo, crs: CRS, transform: Affine, window: Window, src: DatasetReader | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` of the output grid from a scene: float32 bands and a validity mask.

    The window may reach outside the scene (tile halos at the edges); those pixels come back
    invalid. Scenes on another grid are warped on the fly, never copied whole. Pass ``src``,
    the scene opened once by the caller, when reading many windows: GDAL's block cache lives
    with the open dataset, so rows shared by consecutive windows are decoded once.
    """
    if src is None:
        with open_dataset(info) as opened:
            return read_window(info, crs, transform, window, opened)
    try:
        return _read_window(info, crs, transform, window, src)
    except rasterio.errors.RasterioError as exc:
        rows, cols = window.toranges()
        where = f"rows {rows[0]}..{rows[1]}, cols {cols[0]}..{cols[1]}"
        reason = storage.redact(_gdal_message(exc))
        if said := storage.http_reason(reason):
            reason = f"{said} ({reason})"
        raise SceneError(info.path, f"cannot read pixels ({where} of the output grid): {reason}") from None


def _read_window(
    info: SceneInfo, crs: CRS, transform: Affine, window: Window, src: DatasetReader
) -> tuple[np.ndarray, np.ndarray]:
    shape = (int(window.height), int(window.width))
    if same_grid(info, crs, transform):
        col_off = round((transform.c - info.affine.c) / info.affine.a)
        row_off = round((transform.f - info.affine.f) / info.affine.e)
        src_window = Window(window.col_off + col_off, window.row_off + row_off, window.width, window.height)
        data, valid = _read_boundless(src, src_window, shape, info)
        return _finish(info, data, valid, lambda: _read_boundless_band(src, src_window, shape, info.mask))
    window_transform = transform @ Affine.translation(window.col_off, window.row_off)

    # The warp takes one nodata value for all bands: the selected bands' own when they agree;
    # otherwise an alpha band marks what lies outside, and each band's value is compared after.
    nodata = {src.nodatavals[i - 1] for i in info.indexes}
    common = nodata.pop() if len(nodata) == 1 else None

    def warped(resampling: Resampling, indexes: list[int]) -> np.ma.MaskedArray:
        with WarpedVRT(
            src,
            crs=crs,
            transform=window_transform,
            width=shape[1],
            height=shape[0],
            resampling=resampling,
            src_nodata=common,
            nodata=common,
            add_alpha=common is None,
        ) as vrt:
            return vrt.read(indexes=indexes, masked=True)

    block = warped(Resampling[info.resampling], info.indexes)
    valid = ~np.ma.getmaskarray(block).any(axis=0)
    data = block.filled(0).astype(np.float32, copy=False)
    # a mask band's codes are resampled by nearest neighbour: averaging them means nothing
    return _finish(info, data, valid, lambda: warped(Resampling.nearest, [info.mask.band])[0].filled(0))


def _finish(info: SceneInfo, data: np.ndarray, valid: np.ndarray, read_mask) -> tuple[np.ndarray, np.ndarray]:
    """Apply the scene's mask band and its bands' scale and offset to what was read."""
    if info.mask is not None:
        valid &= info.mask.valid(read_mask())
    if info.scales:
        data *= np.asarray(info.scales, dtype=np.float32)[:, None, None]
        data += np.asarray(info.offsets, dtype=np.float32)[:, None, None]
    return data, valid


def _read_boundless(
    src: DatasetReader, window: Window, shape: tuple[int, int], info: SceneInfo
) -> tuple[np.ndarray, np.ndarray]:
    """Read the part of ``window`` inside ``src``; pad the rest as invalid."""
    indexes = info.indexes
    data = np.zeros((len(indexes), *shape), dtype=np.float32)
    valid = np.zeros(shape, dtype=bool)
    inner = window.intersection(Window(0, 0, src.width, src.height)) if _overlaps(window, src) else None
    if inner is None:
        return data, valid
    r0 = int(inner.row_off - window.row_off)
    c0 = int(inner.col_off - window.col_off)
    h, w = int(inner.height), int(inner.width)
    raw = src.read(window=inner) if not info.bands else src.read(indexes, window=inner)
    data[:, r0 : r0 + h, c0 : c0 + w] = raw
    valid[r0 : r0 + h, c0 : c0 + w] = _validity(src, inner, raw, indexes)
    return data, valid


def _read_boundless_band(src: DatasetReader, window: Window, shape: tuple[int, int], mask: BandMask) -> np.ndarray:
    """One band over ``window``, zeros outside the file (those pixels are invalid anyway)."""
    out = np.zeros(shape, dtype=np.int64)
    if not _overlaps(window, src):
        return out
    inner = window.intersection(Window(0, 0, src.width, src.height))
    r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
    out[r0 : r0 + int(inner.height), c0 : c0 + int(inner.width)] = src.read(mask.band, window=inner)
    return out


def _validity(src: DatasetReader, window: Window, raw: np.ndarray, indexes: list[int]) -> np.ndarray:
    """Pixels valid in every band read. A band's nodata value is compared directly (GDAL's mask
    bands for it cost a second pass per band: reads ran ~3x slower); real mask or alpha bands
    are read."""
    flags = [src.mask_flag_enums[i - 1] for i in indexes]
    if all(f == [MaskFlags.all_valid] for f in flags):
        return np.ones(raw.shape[1:], dtype=bool)
    nodata = [src.nodatavals[i - 1] for i in indexes]
    if all(f == [MaskFlags.nodata] for f in flags) and all(v is not None for v in nodata):
        valid = np.ones(raw.shape[1:], dtype=bool)
        for band, value in zip(raw, nodata, strict=True):  # each band its own nodata value
            valid &= ~np.isnan(band) if np.isnan(value) else band != band.dtype.type(value)
        return valid
    return src.read_masks(indexes, window=window).all(axis=0)


def _overlaps(window: Window, src) -> bool:
    return (
        window.col_off < src.width
        and window.row_off < src.height
        and window.col_off + window.width > 0
        and window.row_off + window.height > 0
    )
