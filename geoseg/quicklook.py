"""A picture of the mosaic: classes in their colours, downsampled, with a legend."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import zarr

from geoseg import mosaic, storage
from geoseg.blending import NODATA


def downsample_classes(mosaic_store: str | Path | zarr.Group, max_size: int) -> np.ndarray:
    """The class mosaic with its longer side ``max_size`` (or less, for a smaller mosaic): the
    coarsest overview level that still has ``max_size`` pixels there (read, not the whole
    mosaic), sampled at the centres of the picture's pixels (a level is less than twice the
    size: every k-th pixel would halve a Sentinel-2 tile's 1,373 px to 687)."""
    group = mosaic.as_group(mosaic_store)
    longer = max(group[mosaic.CLASSES].shape)
    factors = [f for f in group.attrs["geoseg"].get("overviews", []) if -(-longer // f) >= max_size]
    level = group[f"{mosaic.OVERVIEWS}/{max(factors)}/{mosaic.CLASSES}" if factors else mosaic.CLASSES]
    height, width = level.shape
    scale = max(height, width) / max_size
    if scale <= 1:
        return level[:]
    rows, cols = (centres(n, max(1, round(n / scale))) for n in (height, width))
    return level.oindex[rows, cols]  # only the picture's pixels are held, chunk by chunk


def centres(n: int, m: int) -> np.ndarray:
    """Which of ``n`` pixels lies under the centre of each of ``m`` pixels spanning the same length."""
    return ((np.arange(m) + 0.5) * n / m).astype(np.int64)


def colorize(classes: np.ndarray, colors: dict[int, str]) -> np.ndarray:
    """RGBA image: each class in its colour, nodata transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for value, hex_color in colors.items():
        lut[value] = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)] + [255]
    lut[NODATA] = 0
    return lut[classes]


def import_plotting() -> None:
    """matplotlib's drawing off-screen: ~0.5 s of imports, which a run does while its blocks are
    computed rather than after the last one (:func:`write_quicklook`)."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    from matplotlib.patches import Patch  # noqa: F401


def write_quicklook(mosaic_path: str | Path, png_path: str | Path, max_size: int = 1024) -> str:
    """The picture of the mosaic at ``png_path``. Drawn on a figure of its own, not pyplot's
    (global state): a run draws it in a thread while its polygon layers are closed."""
    import_plotting()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    group = mosaic.as_group(mosaic_path)
    legend = mosaic.read_legend(group)
    colors = mosaic.read_colors(group) or {k: "#808080" for k in legend}
    classes = downsample_classes(group, max_size)
    counts = np.bincount(classes.ravel(), minlength=256)
    valid = counts[:NODATA].sum() or 1
    fig = Figure(figsize=(9, 7), dpi=120)
    ax = fig.subplots()
    ax.imshow(colorize(classes, colors), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{storage.name(storage.parent(str(mosaic_path)))}: land cover")
    handles = [
        Patch(
            facecolor=colors.get(k, "#808080"),
            edgecolor="black",
            linewidth=0.3,
            label=f"{name} ({100 * counts[k] / valid:.1f}%)",
        )
        for k, name in sorted(legend.items())
    ]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(str(png_path), buffer.getvalue())
    return str(png_path)
