"""A STAC item with one asset per band (Sentinel-2 L2A, Landsat C2), read as one raster.

The item's assets for the model's bands (and the mask asset, if any) are stacked in a GDAL
virtual raster (VRT, an XML document kept with the scene: workers need no shared file) on the
grid of the finest of them. GDAL resamples the coarser bands while reading a window, bilinear
for reflectance and nearest for the mask, so a band is never resampled whole. Each VRT band
carries its asset's name, nodata, scale and offset (``raster:bands``), which the scene reader
then applies like a file's own (:mod:`geoseg.scenes`).

An item is referred to as ``ITEM_LOCATION#ITEM_ID``; asset hrefs resolve against the item's
own location.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Any

from rasterio.transform import Affine

from geoseg import storage

ITEM_MARK = "#"


class AssetError(ValueError):
    """An item's band asset that cannot be used: the reason, naming the band or asset."""


def is_item_ref(loc: str) -> bool:
    """Whether ``loc`` names a STAC item's band assets: ``DOCUMENT.json#ITEM_ID``, or an item
    of a STAC API by its own URL (``https://.../items/ID#ID``)."""
    base, mark, item_id = loc.rpartition(ITEM_MARK)
    api_item = storage.scheme(base) in ("http", "https") and "/items/" in base
    return bool(mark and item_id and (base.lower().endswith(".json") or api_item))


def item_ref(item_loc: str, item: dict[str, Any]) -> str:
    return f"{item_loc}{ITEM_MARK}{item.get('id')}"


def read_item(ref: str) -> tuple[str, dict[str, Any]]:
    """The item a reference names, and the location of the document that holds it."""
    item_loc, _, item_id = ref.rpartition(ITEM_MARK)
    doc = json.loads(storage.read_text(item_loc))
    items = doc.get("features", [doc] if doc.get("type") == "Feature" else [])
    for item in items:
        if str(item.get("id")) == item_id:
            return item_loc, item
    raise AssetError(f"no item {item_id!r} in {item_loc}")


def band_names(asset: dict[str, Any]) -> set[str]:
    """The names an asset answers to: ``eo:bands`` names and common names (STAC 1.0), ``bands``
    names and ``eo:common_name`` (STAC 1.1), lower case."""
    names = set()
    for band in [*asset.get("eo:bands", []), *asset.get("bands", [])]:
        for key in ("name", "common_name", "eo:common_name"):
            if band.get(key):
                names.add(str(band[key]).lower())
    return names


def find_asset(item: dict[str, Any], name: str) -> str | None:
    """The key of the asset for band ``name``: the asset of that key (case aside), else the one
    whose band names include it."""
    assets = item.get("assets", {})
    by_key = {key.lower(): key for key in assets}
    if name.lower() in by_key:
        return by_key[name.lower()]
    matches = [key for key, asset in assets.items() if name.lower() in band_names(asset)]
    return matches[0] if matches else None


def raster_band(asset: dict[str, Any]) -> dict[str, Any]:
    """The asset's nodata, scale and offset: its first band's (STAC 1.0 ``raster:bands``, 1.1
    ``bands``), else the asset's own fields (STAC 1.1 ``nodata``, ``raster:scale``...)."""
    own = {k.removeprefix("raster:"): v for k, v in asset.items() if k in ("nodata", "raster:scale", "raster:offset")}
    for band in [*asset.get("raster:bands", []), *asset.get("bands", [])]:
        return {**own, **{k.removeprefix("raster:"): v for k, v in band.items()}}
    return own


@dataclass(frozen=True)
class BandSource:
    """One asset's raster as the VRT uses it."""

    name: str  # the band's name in the VRT (the model's name, or the mask asset's key)
    path: str  # as GDAL opens it
    width: int
    height: int
    transform: Affine
    crs_wkt: str
    dtype: str
    nodata: float | None
    scale: float
    offset: float
    resampling: str
    is_mask: bool = False


def band_source(item_loc: str, item: dict[str, Any], key: str, name: str, resampling: str) -> BandSource:
    asset = item["assets"][key]
    loc = storage.resolve_href(item_loc, asset["href"])
    try:
        with storage.open_raster(loc) as src:
            crs_wkt = src.crs.to_wkt() if src.crs else ""
            header = (src.width, src.height, src.transform, crs_wkt, src.dtypes[0], src.nodata)
            own_scale, own_offset = src.scales[0], src.offsets[0]
    except Exception as exc:
        reason = storage.redact(str(exc))
        raise AssetError(f"asset {key!r} ({storage.redact(loc)}): not a readable raster ({reason})") from None
    width, height, transform, crs_wkt, dtype, nodata = header
    fields = {"scale": own_scale, "offset": own_offset, **raster_band(asset)}  # the item's word first
    return BandSource(
        name=name,
        path=storage.gdal_path(loc),
        width=width,
        height=height,
        transform=transform,
        crs_wkt=crs_wkt,
        dtype=dtype,
        nodata=fields.get("nodata", nodata),
        scale=float(fields.get("scale", 1.0)),
        offset=float(fields.get("offset", 0.0)),
        resampling=resampling,
    )


def item_sources(
    ref: str, names: list[str], mask_asset: str | None = None, resampling: str = "bilinear"
) -> tuple[dict[str, Any], list[BandSource]]:
    """The item, and the sources of its model bands (in ``names`` order, resampled by
    ``resampling`` where coarser) and its mask asset (nearest neighbour)."""
    item_loc, item = read_item(ref)
    sources = []
    for name in names:
        key = find_asset(item, name)
        if key is None:
            raise AssetError(f"has no asset for band {name!r} (assets: {', '.join(item.get('assets', {}))})")
        sources.append(band_source(item_loc, item, key, name, resampling))
    if mask_asset is not None:
        key = find_asset(item, mask_asset)
        if key is None:
            raise AssetError(f"has no mask asset {mask_asset!r} (assets: {', '.join(item.get('assets', {}))})")
        sources.append(replace(band_source(item_loc, item, key, mask_asset, "nearest"), is_mask=True))
    crs = {s.crs_wkt for s in sources}
    if len(crs) > 1:
        raise AssetError("its band assets are in different CRSs")
    return item, sources


def vrt_xml(sources: list[BandSource]) -> str:
    """A VRT stacking ``sources`` (one CRS) on the finest one's pixel lattice, over the extent
    all of them cover: no pixel of it lacks a band."""
    finest = min(sources, key=lambda s: abs(s.transform.a))
    a, e = finest.transform.a, finest.transform.e
    west = max(s.transform.c for s in sources)
    east = min(s.transform.c + s.width * s.transform.a for s in sources)
    north = min(s.transform.f for s in sources)
    south = max(s.transform.f + s.height * s.transform.e for s in sources)
    col0 = math.ceil((west - finest.transform.c) / a - 1e-9)
    row0 = math.ceil((finest.transform.f - north) / -e - 1e-9)
    t = Affine(a, 0.0, finest.transform.c + col0 * a, 0.0, e, finest.transform.f + row0 * e)
    width = math.floor((east - t.c) / a + 1e-9)
    height = math.floor((t.f - south) / -e + 1e-9)
    if width <= 0 or height <= 0:
        raise AssetError("its band assets do not overlap")
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = finest.crs_wkt
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    gdal_types = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32"}
    # the bands the model reads share one type (they are read together); a mask keeps its own
    data_types = {s.dtype for s in sources if not s.is_mask}
    common = gdal_types.get(data_types.pop(), "Float32") if len(data_types) == 1 else "Float32"
    for number, source in enumerate(sources, start=1):
        kind = gdal_types.get(source.dtype, "Float32") if source.is_mask else common
        band = ET.SubElement(root, "VRTRasterBand", dataType=kind, band=str(number))
        ET.SubElement(band, "Description").text = source.name
        if source.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(float(source.nodata))
        if source.scale != 1.0 or source.offset != 0.0:
            ET.SubElement(band, "Offset").text = repr(source.offset)
            ET.SubElement(band, "Scale").text = repr(source.scale)
        element = ET.SubElement(band, "ComplexSource", resampling=source.resampling)
        ET.SubElement(element, "SourceFilename", relativeToVRT="0").text = source.path
        ET.SubElement(element, "SourceBand").text = "1"
        ET.SubElement(element, "SrcRect", xOff="0", yOff="0", xSize=str(source.width), ySize=str(source.height))
        # where the source lands on the reference grid, in its pixels
        x0 = (source.transform.c - t.c) / t.a
        y0 = (source.transform.f - t.f) / t.e
        x_size = source.width * source.transform.a / t.a
        y_size = source.height * source.transform.e / t.e
        ET.SubElement(element, "DstRect", xOff=repr(x0), yOff=repr(y0), xSize=repr(x_size), ySize=repr(y_size))
        if source.nodata is not None:
            ET.SubElement(element, "NODATA").text = repr(float(source.nodata))
    return ET.tostring(root, encoding="unicode")
