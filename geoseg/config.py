"""Run configuration: pydantic models loaded from YAML, with dotted ``--set`` overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_LEGEND = PACKAGE_DIR / "data" / "landcover.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is meant for the user as is."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason. (Here, not
    in :mod:`geoseg.models.checkpoint`, so that catching it does not import torch.)"""


@dataclass(frozen=True)
class InferenceSettings:
    """What a task needs to find (or build) its worker's model: small and hashable. (Here, not in
    :mod:`geoseg.inference`, so that a run's client makes them without importing torch.)"""

    checkpoint: str
    batch_size: int = 8
    device: str = "auto"
    amp: bool = True
    torch_threads: int = 0  # 0: leave torch's default; -1: this worker's cores / its task threads
    compile: bool = False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LandCoverClass(_Strict):
    id: int = Field(ge=0, le=254)
    name: str
    color: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class ModelConfig(_Strict):
    checkpoint: str = "builtin:demo"
    batch_size: int = Field(8, ge=0)
    """Tiles per forward pass; 0 = choose from free GPU memory (8 on CPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported); ignored on CPU."""
    compile: bool = False
    """torch.compile the model once per worker (slow start, faster passes on GPU)."""
    torch_threads: int = Field(0, ge=0)
    """Intra-op threads of each forward pass; 0: the cores shared out over the workers' task
    threads. Fix it to get bitwise the same confidence on clusters of other shapes."""


class TilingConfig(_Strict):
    tile_size: int = Field(256, ge=32)
    overlap: int = Field(32, ge=0)
    blend: Literal["gaussian", "cosine", "trim"] = "gaussian"

    @model_validator(mode="after")
    def _overlap_fits(self) -> TilingConfig:
        if self.overlap >= self.tile_size // 2:
            raise ValueError(f"overlap ({self.overlap}) must be < tile_size/2 ({self.tile_size // 2})")
        if self.overlap % 2:
            raise ValueError(f"overlap ({self.overlap}) must be even: half of it pads each side")
        return self


class OutputConfig(_Strict):
    block_size: int = Field(1024, ge=64)
    mosaic_rule: Literal["first", "latest", "confidence"] = "first"
    """Where scenes overlap: the first valid pixel in input order, in order of acquisition (newest
    first), or the scene whose prediction is most confident (each scene is segmented on its own)."""
    polygons: bool = True
    overwrite: bool = False
    zarr_format: Literal[2, 3] = 3
    """Zarr v3 (zstd), or v2, which GDAL (so QGIS) opens: the GDAL of rasterio's wheels (3.10)
    refuses v3 arrays; GDAL reads v2 from 3.4 on."""


class GridConfig(_Strict):
    """The output grid, where the scenes' own will not do (default: the first scene's CRS and
    pixels, extended over every scene)."""

    crs: str | None = None
    """Any CRS rasterio reads (EPSG:3035, a WKT...); scenes in other CRSs are warped onto it."""
    resolution: float | None = Field(None, gt=0)
    """Pixel size in the CRS's units; default: the first scene's (estimated in another CRS)."""
    aoi: list[float] | str | None = None
    """Area of interest: a bbox [west, south, east, north] in ``aoi_crs``, or a GeoJSON or
    GeoPackage file (any CRS) whose geometries' bounds the grid covers."""
    aoi_crs: str = "EPSG:4326"

    @field_validator("aoi")
    @classmethod
    def _bbox(cls, aoi: list[float] | str | None) -> list[float] | str | None:
        if isinstance(aoi, list) and (len(aoi) != 4 or aoi[0] >= aoi[2] or aoi[1] >= aoi[3]):
            raise ValueError("a bbox is [west, south, east, north] with west < east and south < north")
        return aoi


class MaskConfig(_Strict):
    """A band of each scene that marks clouds and shadows (a scene classification such as
    Sentinel-2's SCL, or a QA band such as Landsat's QA_PIXEL): its pixels become nodata."""

    band: int | str | None = None
    """The band's number (1-based) or description in a scene file."""
    asset: str | None = None
    """The mask asset's key (or band name) in STAC items with one asset per band (SCL, QA_PIXEL)."""
    invalid_values: list[int] = Field(default_factory=list)
    """Codes that are invalid (SCL: [3, 8, 9, 10] for shadow, clouds and cirrus)."""
    invalid_bits: list[int] = Field(default_factory=list)
    """Bit numbers that make a pixel invalid when set (QA_PIXEL: [1, 2, 3, 4] dilated cloud,
    cirrus, cloud, shadow)."""

    @model_validator(mode="after")
    def _something_invalid(self) -> MaskConfig:
        if (self.band is None) == (self.asset is None):
            raise ValueError("name the mask's band (in files) or asset (in STAC items), one of the two")
        if not self.invalid_values and not self.invalid_bits:
            raise ValueError("give invalid_values or invalid_bits")
        if any(not 0 <= b < 63 for b in self.invalid_bits):
            raise ValueError("invalid_bits are bit numbers, 0 to 62")
        return self

    @property
    def source(self) -> int | str:
        """The mask band's number or name: a STAC item's mask asset is a band of its VRT by that name."""
        return self.band if self.band is not None else str(self.asset)

    @property
    def bit_mask(self) -> int:
        return sum(1 << b for b in set(self.invalid_bits))


class StacSearchConfig(_Strict):
    """Scenes found by a STAC API search (pystac-client), in addition to ``inputs``."""

    url: str | None = None
    collections: list[str] = Field(default_factory=list)
    bbox: list[float] | None = None
    """[west, south, east, north] in lon/lat."""
    datetime: str | None = None
    """An instant or an interval, as STAC APIs take it: 2026-06-01/2026-06-30."""
    max_items: int = Field(500, ge=1)


class VectorConfig(_Strict):
    """How the class mosaic becomes polygons (in `geoseg run` and `geoseg export`)."""

    mmu_pixels: int = Field(0, ge=0)
    """Minimum mapping unit: regions smaller than this are absorbed by their neighbours first."""
    fill_holes_pixels: int = Field(0, ge=0)
    """Holes smaller than this (regions enclosed by one class) are filled with that class; 0 keeps all."""
    simplify_tolerance: float = Field(0.0, ge=0)
    """Coverage-preserving simplification tolerance in CRS units (0: exact pixel edges)."""
    formats: list[Literal["gpkg", "parquet", "fgb"]] = ["gpkg"]
    reproject_to: str | None = None
    """Also write a copy of the polygons in this CRS (e.g. EPSG:4326)."""

    @field_validator("reproject_to")
    @classmethod
    def _a_crs(cls, value: str | None) -> str | None:
        if value is not None:
            from pyproj import CRS
            from pyproj.exceptions import CRSError

            try:
                CRS.from_user_input(value)
            except CRSError:
                raise ValueError(f"not a CRS: {value!r}") from None
        return value


class JobqueueConfig(_Strict):
    """A batch-scheduler cluster through dask-jobqueue (``pip install geoseg[jobqueue]``)."""

    kind: Literal["slurm", "pbs", "sge", "lsf"] = "slurm"
    jobs: int = Field(2, ge=1)
    cores: int = Field(4, ge=1)
    memory: str = "16GB"
    processes: int = Field(1, ge=1)
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    job_extra_directives: list[str] = Field(default_factory=list)


class ClusterConfig(_Strict):
    address: str | None = None
    """An existing scheduler (tcp://host:8786); takes precedence over a local or jobqueue cluster.
    Unset, Dask's own ``DASK_SCHEDULER_ADDRESS`` is taken where there is no jobqueue cluster."""
    connect_timeout_s: float = Field(30.0, gt=0)
    """How long to wait for the scheduler at ``address`` before giving up."""
    n_workers: int = Field(1, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    dashboard: bool = True
    jobqueue: JobqueueConfig | None = None
    gpu_resource: bool = False
    """Ask for one ``GPU`` worker resource per block task (start GPU workers with ``--resources GPU=1``)."""
    read_threads: int = Field(0, ge=0)
    """Threads per block that read and decode the input ahead of the forward passes; 0: one on
    CPU (the cores run the model), half the worker's cores (up to 8) on a GPU."""


class RunConfig(_Strict):
    model: ModelConfig = ModelConfig()
    tiling: TilingConfig = TilingConfig()
    output: OutputConfig = OutputConfig()
    cluster: ClusterConfig = ClusterConfig()
    vector: VectorConfig = VectorConfig()
    grid: GridConfig = GridConfig()
    bands: dict[str, int | str] = Field(default_factory=dict)
    """The model's bands in the scene files, by name: band number or description (default: by
    the files' band descriptions, else as stored when the count matches)."""
    mask: MaskConfig | None = None
    resampling: Literal["bilinear", "cubic", "nearest", "average"] = "bilinear"
    """How a band on another grid (a coarser band asset, a scene in another CRS) is resampled
    onto the output grid while reading; mask bands always by nearest neighbour."""
    classes: list[LandCoverClass] = Field(default_factory=lambda: load_legend(DEFAULT_LEGEND))
    inputs: list[str] = Field(default_factory=list)
    stac_search: StacSearchConfig = StacSearchConfig()
    stac_asset: str = "image"
    """Asset key to read from the items of a STAC ItemCollection given as an input."""
    out: str = "out"

    @field_validator("classes")
    @classmethod
    def _unique_ids(cls, classes: list[LandCoverClass]) -> list[LandCoverClass]:
        ids = [c.id for c in classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        return classes

    def class_names(self) -> dict[int, str]:
        return {c.id: c.name for c in self.classes}


def load_legend(path: Path) -> list[LandCoverClass]:
    data = yaml.safe_load(Path(path).read_text())
    return [LandCoverClass(**c) for c in data["classes"]]


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"tiling.overlap=64"`` -> (["tiling", "overlap"], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not plain YAML ({yaml_problem(exc)})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set each dotted key in a nested dict: ``overrides`` as ``key=YAML value`` (``--set``),
    ``values`` as they are (paths and URLs from the command line: no YAML reads their quotes,
    backslashes or "#"). Unknown keys are caught by validation later."""
    settings = [(*parse_override(text), f"--set {text!r}") for text in overrides]
    settings += [(dotted.split("."), value, dotted) for dotted, value in (values or {}).items()]
    for keys, value, source in settings:
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{where}: {msg}")
    return f"invalid configuration ({source}): " + "; ".join(problems)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and ``values`` (see
    :func:`apply_overrides`) and validate the result."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        source = str(path)
        legend = data.pop("legend", None)
        if legend is not None:
            legend_path = (path.parent / legend).resolve()
            data.setdefault("classes", [c.model_dump() for c in load_legend(legend_path)])
    data = apply_overrides(data, overrides or [], values)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


class ChangeConfig(_Strict):
    """Settings of `geoseg change` (two finished runs -> change products)."""

    min_confidence: int = Field(50, ge=0, le=100)
    """Both dates' confidence (percent) must reach this for a pixel to count as changed."""
    mmu_pixels: int = Field(9, ge=0)
    """Change regions smaller than this many pixels are noise, not change."""
    block_size: int = Field(1024, ge=64)
    polygons: bool = True
    overwrite: bool = False
    cluster: ClusterConfig = ClusterConfig()
    """The change's cluster; with date_a and date_b, also their runs' where it is set here (else
    theirs, the run config's, is the whole command's: one cluster in either case)."""
    date_a: list[str] = Field(default_factory=list)
    """Scenes of the first date, to segment in the same go (instead of giving two finished runs)."""
    date_b: list[str] = Field(default_factory=list)
    run_config: str | None = None
    """Run config (YAML) used to segment date_a and date_b; relative to the change config."""


def load_change_config(path: str | Path | None, overrides: list[str] | None = None) -> ChangeConfig:
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        data = data.get("change", data)
        if data.get("run_config"):
            data["run_config"] = str((Path(path).parent / data["run_config"]).resolve())
    data = apply_overrides(data, overrides or [])
    try:
        return ChangeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path or "defaults"))) from None
