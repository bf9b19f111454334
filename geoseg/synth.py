"""Synthetic land-cover scenes: a label map with realistic shapes and 4-band imagery rendered from it.

The generator exists because no data set can be downloaded here: it gives the demo model
something to learn and the tests something with known answers. Classes follow the legend in
``geoseg/data/landcover.yaml``; each has its own spectral signature and texture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from scipy import ndimage

WATER, FOREST, GRASS, CROP, BUILT, BARE, ROAD = range(7)
NODATA_CLASS = 255
SCENE_NODATA = 0
BAND_NAMES = ("blue", "green", "red", "nir")

# Surface reflectance per class (blue, green, red, nir) and relative texture strength.
SPECTRA = np.array(
    [
        [0.060, 0.055, 0.030, 0.015],  # water
        [0.030, 0.060, 0.030, 0.330],  # forest
        [0.050, 0.100, 0.080, 0.250],  # grassland
        [0.070, 0.120, 0.100, 0.420],  # cropland
        [0.150, 0.160, 0.180, 0.210],  # built-up
        [0.110, 0.150, 0.210, 0.270],  # bare soil
        [0.095, 0.100, 0.105, 0.115],  # road
    ],
    dtype=np.float32,
)
TEXTURE = np.array([0.03, 0.15, 0.06, 0.08, 0.12, 0.07, 0.04], dtype=np.float32)


@dataclass(frozen=True)
class SceneSpec:
    width: int
    height: int
    seed: int
    crs: str = "EPSG:32633"
    origin: tuple[float, float] = (500_000.0, 5_200_000.0)
    pixel_size: float = 10.0
    nodata_border: bool = True

    def to_json(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "crs": self.crs,
            "origin": list(self.origin),
            "pixel_size": self.pixel_size,
            "nodata_border": self.nodata_border,
        }

    @classmethod
    def from_scene(cls, path: Path) -> SceneSpec:
        """The spec a synthetic scene was made from (stored in its tags)."""
        with rasterio.open(path) as src:
            tag = src.tags().get("GEOSEG_SYNTH")
        if tag is None:
            raise ValueError(f"{path}: not a scene made by `geoseg synth` (no GEOSEG_SYNTH tag)")
        data = json.loads(tag)
        return cls(**{**data, "origin": tuple(data["origin"])})

    @property
    def transform(self) -> Affine:
        return from_origin(self.origin[0], self.origin[1], self.pixel_size, self.pixel_size)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with features about ``scale`` pixels across."""
    factor = max(1, int(scale // 4))
    small = (max(2, shape[0] // factor + 2), max(2, shape[1] // factor + 2))
    noise = ndimage.gaussian_filter(rng.standard_normal(small), sigma=max(scale / factor / 2, 0.5))
    zoomed = ndimage.zoom(noise, factor, order=1)[: shape[0], : shape[1]]
    if zoomed.shape != shape:  # tiny scenes: pad with edge values
        zoomed = np.pad(zoomed, [(0, shape[0] - zoomed.shape[0]), (0, shape[1] - zoomed.shape[1])], "edge")
    return (zoomed - zoomed.mean()) / (zoomed.std() + 1e-9)


def _fields(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular parcels with jittered edges: parcel id per pixel and whether it is cropland."""
    h, w = shape
    ys = np.cumsum(rng.integers(30, 90, size=h // 30 + 2))
    xs = np.cumsum(rng.integers(30, 90, size=w // 30 + 2))
    row = np.searchsorted(ys, np.arange(h), side="right")
    col = np.searchsorted(xs, np.arange(w), side="right")
    parcel = row[:, None] * (len(xs) + 1) + col[None, :]
    n_parcels = (len(ys) + 1) * (len(xs) + 1)
    is_crop = rng.random(n_parcels) < 0.45
    return parcel, is_crop[parcel]


def _draw_line(mask: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: float) -> None:
    """Rasterise a thick segment into ``mask`` (in place), touching only its bounding box."""
    h, w = mask.shape
    pad = int(np.ceil(width)) + 1
    y0, y1 = int(max(0, min(p0[0], p1[0]) - pad)), int(min(h, max(p0[0], p1[0]) + pad + 1))
    x0, x1 = int(max(0, min(p0[1], p1[1]) - pad)), int(min(w, max(p0[1], p1[1]) + pad + 1))
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = p1 - p0
    length2 = float(d @ d) or 1.0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0, 1)
    dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
    mask[y0:y1, x0:x1] |= dist2 <= (width / 2) ** 2


def _polyline_mask(shape: tuple[int, int], points: np.ndarray, width: float) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for p0, p1 in zip(points[:-1], points[1:], strict=False):
        _draw_line(mask, p0, p1, width)
    return mask


def _river(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    n = 60
    t = np.linspace(-0.1, 1.1, n)
    wander = np.cumsum(rng.normal(0, 0.03, n))
    if rng.random() < 0.5:  # flows left to right
        pts = np.stack([h * (rng.uniform(0.2, 0.8) + 0.15 * np.sin(6 * t + rng.uniform(0, 6)) + wander), w * t], 1)
    else:
        pts = np.stack([h * t, w * (rng.uniform(0.2, 0.8) + 0.15 * np.sin(6 * t + rng.uniform(0, 6)) + wander)], 1)
    return _polyline_mask(shape, pts, width=rng.uniform(6, 14))


def _roads(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    lines = []
    for _ in range(max(2, int(np.sqrt(h * w) / 400))):
        centre = rng.uniform([0, 0], [h, w])
        angle = rng.uniform(0, np.pi)
        half = np.hypot(h, w)
        direction = np.array([np.sin(angle), np.cos(angle)])
        p0, p1 = centre - half * direction, centre + half * direction
        _draw_line(mask, p0, p1, width=rng.uniform(2.0, 3.5))
        lines.append(np.stack([p0, p1]))
    return mask, lines


def _settlements(rng: np.random.Generator, shape: tuple[int, int], roads: list[np.ndarray]) -> np.ndarray:
    """Clusters of rectangular buildings along roads."""
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    n_towns = max(1, int(h * w / 400_000))
    for _ in range(n_towns):
        line = roads[rng.integers(len(roads))]
        centre = line[0] + rng.uniform(0.3, 0.7) * (line[1] - line[0])
        centre = np.clip(centre + rng.normal(0, 0.15, 2) * [h, w], 0, [h - 1, w - 1])
        radius = rng.uniform(40, 110)
        for _ in range(int(radius * 1.2)):
            cy, cx = centre + rng.normal(0, radius / 2, 2)
            bh, bw = rng.integers(4, 14, 2)
            y0, x0 = int(cy), int(cx)
            mask[max(0, y0) : max(0, y0 + bh), max(0, x0) : max(0, x0 + bw)] = True
    return mask


def make_labels(spec: SceneSpec) -> np.ndarray:
    """The land-cover label map of a scene (uint8 classes, no nodata yet)."""
    rng = np.random.default_rng(spec.seed)
    shape = (spec.height, spec.width)
    labels = np.full(shape, GRASS, dtype=np.uint8)
    _, is_crop = _fields(rng, shape)
    labels[is_crop] = CROP
    labels[smooth_noise(rng, shape, 40) > 0.7] = FOREST
    labels[smooth_noise(rng, shape, 25) > 1.6] = BARE
    road_mask, road_lines = _roads(rng, shape)
    labels[_settlements(rng, shape, road_lines)] = BUILT
    labels[_river(rng, shape) | (smooth_noise(rng, shape, 60) > 2.2)] = WATER
    labels[road_mask] = ROAD
    return labels


def render_bands(labels: np.ndarray, seed: int, illumination: float | None = None) -> np.ndarray:
    """4-band reflectance (float32, bands first) for a label map, with texture, noise and haze."""
    rng = np.random.default_rng(seed + 1_000_003)
    shape = labels.shape
    gain = rng.uniform(0.8, 1.2) if illumination is None else illumination
    band_gain = gain * rng.uniform(0.95, 1.05, size=4).astype(np.float32)
    haze = rng.uniform(0.0, 0.02) * np.array([1.0, 0.7, 0.4, 0.1], dtype=np.float32)
    texture = smooth_noise(rng, shape, 3).astype(np.float32)
    regional = smooth_noise(rng, shape, 80).astype(np.float32)
    # Each parcel of cropland has its own growth stage: a per-region brightness shift.
    parcel_shift = 0.12 * smooth_noise(rng, shape, 30).astype(np.float32)
    bands = np.empty((4, *shape), dtype=np.float32)
    strength = TEXTURE[labels]
    modulation = 1.0 + strength * texture + 0.04 * regional
    modulation += np.where(labels == CROP, parcel_shift, 0.0)
    for b in range(4):
        bands[b] = SPECTRA[labels, b] * modulation * band_gain[b] + haze[b]
        bands[b] += rng.normal(0, 0.004, size=shape).astype(np.float32)
    return np.clip(bands, 0.0001, 6.5)


def footprint_mask(spec: SceneSpec) -> np.ndarray:
    """True where the scene has data: a slanted swath edge leaves a nodata wedge, as in real L2 tiles."""
    shape = (spec.height, spec.width)
    if not spec.nodata_border:
        return np.ones(shape, dtype=bool)
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width]
    edge = 0.12 * spec.width - 0.1 * yy * spec.width / max(spec.height, 1)
    return xx >= edge


def write_scene(
    spec: SceneSpec,
    scene_path: Path,
    labels_path: Path | None = None,
    illumination: float | None = None,
    labels: np.ndarray | None = None,
    noise_seed: int | None = None,
) -> tuple[Path, Path | None]:
    """Generate one synthetic scene and write it (and its labels) as tiled GeoTIFFs.

    ``labels`` replaces the spec's own label map (a later date); ``noise_seed`` its texture and noise.
    """
    labels = make_labels(spec) if labels is None else labels
    bands = render_bands(labels, spec.seed if noise_seed is None else noise_seed, illumination)
    valid = footprint_mask(spec)
    dn = np.clip(np.round(bands * 10_000), 1, 65535).astype(np.uint16)
    dn[:, ~valid] = SCENE_NODATA
    labels = np.where(valid, labels, NODATA_CLASS).astype(np.uint8)
    profile = {
        "driver": "GTiff",
        "width": spec.width,
        "height": spec.height,
        "crs": CRS.from_user_input(spec.crs),
        "transform": spec.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    scene_path = Path(scene_path)
    scene_path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene_path, "w", count=4, dtype="uint16", nodata=SCENE_NODATA, **profile) as dst:
        dst.write(dn)
        dst.descriptions = BAND_NAMES
        dst.update_tags(GEOSEG_SYNTH=json.dumps(spec.to_json()))
    if labels_path is not None:
        labels_path = Path(labels_path)
        labels_path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(labels_path, "w", count=1, dtype="uint8", nodata=NODATA_CLASS, **profile) as dst:
            dst.write(labels, 1)
    return scene_path, labels_path


# What turns into what in a planted change: (from classes, to class).
PLANTED_TRANSITIONS = ((FOREST, BARE), (CROP, BUILT), (GRASS, BUILT), (GRASS, WATER), (CROP, BARE))


def plant_changes(labels: np.ndarray, n: int, seed: int, min_size: int = 30, max_size: int = 80) -> np.ndarray:
    """A second date's labels: ``n`` blobs where one class turned into another (clearing, building, flooding)."""
    rng = np.random.default_rng(seed + 7_777)
    after = labels.copy()
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w]
    placed = 0
    for _ in range(n * 50):
        if placed == n:
            break
        src, dst = PLANTED_TRANSITIONS[placed % len(PLANTED_TRANSITIONS)]
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        if labels[cy, cx] != src:
            continue
        ry, rx = rng.integers(min_size // 2, max_size // 2, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        target = blob & (labels == src) & (after == labels)
        if target.sum() < min_size * min_size // 4:
            continue
        after[target] = dst
        placed += 1
    return after


def write_second_date(
    first_scene: Path, scene_path: Path, labels_path: Path | None, n_changes: int, illumination: float | None = None
) -> tuple[Path, Path | None]:
    """The same area at a later date: planted land-cover changes, new noise and illumination."""
    spec = SceneSpec.from_scene(first_scene)
    after = plant_changes(make_labels(spec), n_changes, spec.seed)
    return write_scene(spec, scene_path, labels_path, illumination, labels=after, noise_seed=spec.seed + 1)
