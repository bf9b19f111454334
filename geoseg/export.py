"""GIS layers from a finished run: a COG of the classes, polygons in GIS formats, styles for QGIS
and SLD tools, a report, and the run's STAC item updated with them.

All writers stream the mosaic block by block; none holds the whole scene in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import rasterio
import rasterio.shutil
from distributed import Client

from geoseg import mosaic, stac_item, storage
from geoseg.blending import NODATA
from geoseg.config import RunConfig
from geoseg.grid import OutputGrid
from geoseg.mosaic import MOSAIC_NAME
from geoseg.polygons import announce_layers, blocks_with_classes, record_layers, write_polygons
from geoseg.quicklook import write_quicklook
from geoseg.tiling import iter_blocks

log = logging.getLogger(__name__)


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def write_cog(
    mosaic_path: str, path: str, legend: dict[int, str], colors: dict[int, str], block_size: int = 2048
) -> str:
    """The class mosaic as a Cloud-Optimized GeoTIFF: tiled, deflate, mode overviews, colour table,
    class names; built in a local temporary folder and moved (or uploaded) to ``path`` whole."""
    grid = mosaic.read_grid(mosaic_path)
    classes = mosaic.open_array(mosaic_path)
    with storage.scratch("cog") as tmp, storage.staged(str(path)) as target:
        staging = tmp / "classes.tif"
        profile = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "count": 1,
            "dtype": "uint8",
            "crs": grid.crs,
            "transform": grid.affine,
            "nodata": NODATA,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        with rasterio.open(staging, "w", **profile) as dst:
            for b in iter_blocks(grid.height, grid.width, block_size):
                window = rasterio.windows.Window(b.cols.start, b.rows.start, b.cols.size, b.rows.size)
                dst.write(classes[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop], 1, window=window)
            dst.write_colormap(1, {k: (*hex_to_rgb(c), 255) for k, c in colors.items()} | {NODATA: (0, 0, 0, 0)})
            dst.set_band_description(1, "land-cover class")
            dst.update_tags(
                1,
                **{f"CLASS_{k}": name for k, name in sorted(legend.items())},
                CLASS_NAMES=json.dumps({str(k): v for k, v in sorted(legend.items())}),
            )
        rasterio.shutil.copy(
            staging,
            target,
            driver="COG",
            compress="DEFLATE",
            overview_resampling="MODE",
            resampling="NEAREST",
            blocksize=512,
            BIGTIFF="IF_SAFER",
        )
    # GTiff keeps category names in GDAL's auxiliary file (PAM): a GIS without the .qml then
    # shows names, not 0..6
    storage.write_text(storage.join(storage.parent(str(path)), storage.name(str(path)) + ".aux.xml"), pam_xml(legend))
    return str(path)


def pam_xml(legend: dict[int, str]) -> str:
    """GDAL's auxiliary XML for band 1: the class names as category names (indexed by value)."""
    names = [escape(legend.get(value, "")) for value in range(max(legend, default=-1) + 1)]
    categories = "".join(f"      <Category>{name}</Category>\n" for name in names)
    return (
        "<PAMDataset>\n"
        '  <PAMRasterBand band="1">\n'
        f"    <CategoryNames>\n{categories}    </CategoryNames>\n"
        "  </PAMRasterBand>\n"
        "</PAMDataset>\n"
    )


def raster_qml(legend: dict[int, str], colors: dict[int, str]) -> str:
    """A QGIS paletted renderer for the class raster."""
    entries = "\n".join(
        f'        <paletteEntry value="{k}" color="{colors.get(k, "#808080")}" alpha="255" label={quoteattr(name)}/>'
        for k, name in sorted(legend.items())
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.34" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""


def vector_qml(legend: dict[int, str], colors: dict[int, str]) -> str:
    """A QGIS categorized renderer on ``class_id`` for the polygons."""
    categories, symbols = [], []
    for i, (k, name) in enumerate(sorted(legend.items())):
        r, g, b = hex_to_rgb(colors.get(k, "#808080"))
        categories.append(f'      <category value="{k}" label={quoteattr(name)} symbol="{i}" render="true"/>')
        symbols.append(f"""      <symbol type="fill" name="{i}" alpha="1">
        <layer class="SimpleFill">
          <Option type="Map">
            <Option name="color" value="{r},{g},{b},255" type="QString"/>
            <Option name="outline_color" value="35,35,35,255" type="QString"/>
            <Option name="outline_width" value="0.1" type="QString"/>
          </Option>
        </layer>
      </symbol>""")
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.34" styleCategories="Symbology">
  <renderer-v2 type="categorizedSymbol" attr="class_id">
    <categories>
{chr(10).join(categories)}
    </categories>
    <symbols>
{chr(10).join(symbols)}
    </symbols>
  </renderer-v2>
</qgis>
"""


def vector_sld(legend: dict[int, str], colors: dict[int, str], layer: str = "landcover") -> str:
    """An OGC SLD 1.0 style: one rule per class on ``class_id``."""
    rules = "\n".join(
        f"""        <Rule>
          <Name>{escape(name)}</Name>
          <Title>{escape(name)}</Title>
          <ogc:Filter><ogc:PropertyIsEqualTo><ogc:PropertyName>class_id</ogc:PropertyName>
            <ogc:Literal>{k}</ogc:Literal></ogc:PropertyIsEqualTo></ogc:Filter>
          <PolygonSymbolizer>
            <Fill><CssParameter name="fill">{colors.get(k, "#808080")}</CssParameter></Fill>
            <Stroke><CssParameter name="stroke">#232323</CssParameter>
              <CssParameter name="stroke-width">0.2</CssParameter></Stroke>
          </PolygonSymbolizer>
        </Rule>"""
        for k, name in sorted(legend.items())
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc"
    xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <NamedLayer>
    <Name>{escape(layer)}</Name>
    <UserStyle>
      <Title>geoseg land cover</Title>
      <FeatureTypeStyle>
{rules}
      </FeatureTypeStyle>
    </UserStyle>
  </NamedLayer>
</StyledLayerDescriptor>
"""


def class_histogram(mosaic_path: str, block_size: int = 2048) -> np.ndarray:
    """Pixel count per class value (256 bins), read block by block."""
    grid = mosaic.read_grid(mosaic_path)
    classes = mosaic.open_array(mosaic_path)
    counts = np.zeros(256, dtype=np.int64)
    for b in iter_blocks(grid.height, grid.width, block_size):
        counts += np.bincount(classes[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop].ravel(), minlength=256)
    return counts


def area_report(counts: np.ndarray, grid: OutputGrid, legend: dict[int, str]) -> dict:
    """Area per class in km2 and percent of the valid (non-nodata) area."""
    from geoseg.vectorize import pixel_area_m2

    pixel_m2 = pixel_area_m2(grid)
    valid = int(counts[:NODATA].sum())
    rows = [
        {
            "class_id": k,
            "class_name": name,
            "pixels": int(counts[k]),
            "area_km2": counts[k] * pixel_m2 / 1e6,
            "percent": 100.0 * counts[k] / valid if valid else 0.0,
        }
        for k, name in sorted(legend.items())
    ]
    return {
        "valid_pixels": valid,
        "nodata_pixels": int(counts[NODATA]),
        "pixel_area_m2": pixel_m2,
        "total_area_km2": valid * pixel_m2 / 1e6,
        "classes": rows,
    }


def report_markdown(report: dict, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Valid area: {report['total_area_km2']:.3f} km2 "
        f"({report['valid_pixels']} pixels of {report['pixel_area_m2']:.2f} m2; "
        f"{report['nodata_pixels']} nodata pixels)",
        "",
        "| class | area (km2) | percent |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {r['class_name']} | {r['area_km2']:.4f} | {r['percent']:.2f} |" for r in report["classes"]]
    return "\n".join(lines) + "\n"


@dataclass
class ExportResult:
    files: dict[str, str] = field(default_factory=dict)


def export_layers(out: str, cfg: RunConfig, client: Client, manifest: dict) -> ExportResult:
    def at(name: str) -> str:
        return storage.join(out, name)

    mosaic_path = at(MOSAIC_NAME)
    grid = mosaic.read_grid(mosaic_path)
    legend = mosaic.read_legend(mosaic_path)
    colors = mosaic.read_colors(mosaic_path) or {k: "#808080" for k in legend}
    result = ExportResult()
    result.files["cog"] = write_cog(mosaic_path, at("classes.tif"), legend, colors)
    size = cfg.output.block_size
    blocks = blocks_with_classes(manifest, size, list(iter_blocks(grid.height, grid.width, size)))
    manifest = announce_layers(out, manifest, cfg.vector)  # a killed export leaves none unknown
    layers, count = write_polygons(client, blocks, grid, out, legend, cfg.vector)
    # these are the run's polygon layers now: the manifest names them, as after vectorize
    dropped = record_layers(out, manifest, cfg.vector, layers)
    result.files.update(layers.files)
    styles = {
        "qml_raster": ("classes.qml", raster_qml(legend, colors)),
        "qml_vector": ("polygons.qml", vector_qml(legend, colors)),
        "sld": ("polygons.sld", vector_sld(legend, colors)),
    }
    for key, (name, text) in styles.items():
        storage.write_text(at(name), text)
        result.files[key] = at(name)
    result.files["quicklook"] = write_quicklook(mosaic_path, at("quicklook.png"))
    report = area_report(class_histogram(mosaic_path), grid, legend)
    report["polygons"] = count
    storage.write_text(at("report.json"), json.dumps(report, indent=2))
    storage.write_text(at("report.md"), report_markdown(report, f"Land cover of {storage.name(out)}"))
    result.files.update(report_json=at("report.json"), report_md=at("report.md"))
    names = sorted(
        {storage.name(loc) for loc in result.files.values()}
        | {storage.name(result.files["cog"]) + ".aux.xml"}  # the COG's category names
    )
    result.files["item"] = stac_item.add_assets(out, manifest, legend, colors, names, dropped)
    log.info("%d polygons; layers in %s", count, out)
    return result
