"""The ``geoseg`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from geoseg import storage
from geoseg.config import CheckpointError, ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Land-cover segmentation of satellite scenes: GeoTIFF -> UNet -> Zarr mosaic -> polygons.",
)
log = logging.getLogger("geoseg")

SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: dotted.key=value")]  # noqa: UP045


def _setup_logging(verbose: bool) -> None:
    # Dask workers are other processes: they read their log level from the environment.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "debug" if verbose else "warning")
    import distributed  # noqa: F401  (configures its loggers on import; we override below)
    from rich.logging import RichHandler

    handler: logging.Handler
    # the log goes to stdout, as rich's console writes: stderr keeps the one-line error
    if sys.stdout.isatty():
        handler = RichHandler(show_path=False, rich_tracebacks=False, console=None)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:  # a batch job's log: a record per line, never wrapped (a URL stays whole for grep)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_redact_record)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    # botocore says at INFO where it found credentials, each time rasterio builds a session
    for noisy in ("distributed", "rasterio", "fiona", "pyogrio", "matplotlib", "PIL", "numexpr", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from geoseg.logs import one_line_dask_logs

    one_line_dask_logs()  # a LocalCluster's scheduler and nannies log here, through Dask's own handler


def _redact_record(record: logging.LogRecord) -> bool:
    """No secret in a log line: a signed URL's query, a credential's value."""
    record.msg, record.args = storage.redact(record.getMessage()), None
    return True


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {storage.redact(message)}", err=True)
    raise typer.Exit(code)


_verbose = False


@contextmanager
def _user_errors() -> Iterator[None]:
    """Failures a user can cause as one line on stderr and exit code 2 (a traceback with --verbose)."""
    from geoseg.runstate import RunError

    try:
        yield
    except (ConfigError, RunError, CheckpointError) as exc:
        _traceback_if_verbose()
        _fail(str(exc))
    except OSError as exc:
        _traceback_if_verbose()
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")


def _traceback_if_verbose() -> None:
    """With --verbose, the traceback of the error being handled (redacted) before its line: the
    exit code stays the one of a user's error."""
    if _verbose:
        import traceback

        typer.echo(storage.redact(traceback.format_exc()), err=True)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, tracebacks")] = False) -> None:
    global _verbose
    _verbose = verbose
    _setup_logging(verbose)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Scene GeoTIFF to write")],
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same scene")] = 0,
    width: Annotated[int, typer.Option(min=1)] = 1024,
    height: Annotated[int, typer.Option(min=1)] = 1024,
    labels: Annotated[Optional[Path], typer.Option(help="Label GeoTIFF to write (uint8, 255 nodata)")] = None,  # noqa: UP045
    crs: Annotated[str, typer.Option(help="CRS of the scene, e.g. EPSG:32633")] = "EPSG:32633",
    origin: Annotated[tuple[float, float], typer.Option(help="Upper-left corner (x, y) in CRS units")] = (
        500_000.0,
        5_200_000.0,
    ),
    pixel_size: Annotated[float, typer.Option(help="Pixel size in CRS units")] = 10.0,
    illumination: Annotated[Optional[float], typer.Option(help="Scene brightness gain (default: random)")] = None,  # noqa: UP045
    nodata_border: Annotated[bool, typer.Option(help="Leave a nodata wedge along one edge")] = True,
    change_from: Annotated[Optional[Path], typer.Option(help="Make a later date of this synthetic scene")] = None,  # noqa: UP045
    changes: Annotated[int, typer.Option(help="With --change-from: land-cover changes to plant")] = 5,
) -> None:
    """Write a synthetic 4-band (blue, green, red, nir) scene and its land-cover labels."""
    from geoseg.synth import SceneSpec, write_scene, write_second_date

    if change_from is not None:
        try:
            scene, label_path = write_second_date(change_from, out, labels, changes, illumination)
        except ValueError as exc:
            _fail(str(exc))
        log.info("second date %s of %s with %d planted changes", scene, change_from, changes)
        return
    spec = SceneSpec(width, height, seed, crs, origin, pixel_size, nodata_border)
    scene, label_path = write_scene(spec, out, labels, illumination)
    log.info("scene %s (%d x %d, %s)%s", scene, width, height, crs, f", labels {label_path}" if label_path else "")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)")],
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Scene path, directory or glob")] = None,  # noqa: UP045, A002
    out: Annotated[Optional[str], typer.Option(help="Output folder or URL prefix (s3://, gs://, az://)")] = None,  # noqa: UP045
    overwrite: Annotated[bool, typer.Option(help="Replace a previous run's outputs in OUT")] = False,
    stac_api: Annotated[Optional[str], typer.Option(help="Search a STAC API for the scenes")] = None,  # noqa: UP045
    collection: Annotated[Optional[list[str]], typer.Option(help="STAC API collection (repeat for several)")] = None,  # noqa: UP045
    bbox: Annotated[Optional[str], typer.Option(help="STAC API search box: W,S,E,N in lon/lat")] = None,  # noqa: UP045
    datetime: Annotated[Optional[str], typer.Option(help="STAC API search time: 2026-06-01/2026-06-30")] = None,  # noqa: UP045
    set_: SetOption = None,
) -> None:
    """Segment scenes into OUT/mosaic.zarr, OUT/polygons.gpkg and OUT/manifest.json."""
    _resumable()
    values: dict[str, object] = {}  # as typed: a path's quotes, backslashes and "#" are its own
    if input:
        values["inputs"] = list(input)
    if stac_api:
        values["stac_search.url"] = stac_api
    if collection:
        values["stac_search.collections"] = list(collection)
    if bbox:
        try:
            values["stac_search.bbox"] = [float(v) for v in bbox.split(",")]
        except ValueError:
            _fail(f"--bbox {bbox!r}: expected W,S,E,N (four numbers, lon/lat)")
    if datetime:
        values["stac_search.datetime"] = datetime
    if out is not None:
        values["out"] = str(out)
    if overwrite:
        values["output.overwrite"] = True
    try:
        cfg = load_config(config, list(set_ or []), values)
    except ConfigError as exc:
        _fail(str(exc))
    if "out" not in cfg.model_fields_set:  # neither --out nor the config: say where it goes
        typer.echo(f"note: no --out given and {config} sets no `out`: writing to {storage.absolute(cfg.out)}", err=True)
    _run_pipeline(cfg)


def _run_pipeline(cfg) -> None:
    from geoseg.jobs import run

    with _user_errors():
        result = run(cfg)
    log.info("mosaic:    %s", result.mosaic)
    if result.polygons:
        log.info("polygons:  %s", result.polygons)
    log.info("quicklook: %s", result.quicklook)
    log.info("manifest:  %s", result.manifest)
    if not result.ok:  # each failure was logged as the run met it: the count, and where they are listed
        log.error(
            "%d scene(s) and %d block(s) failed; see %s",
            len(result.failed_scenes),
            len(result.failed_blocks),
            result.manifest,
        )
        raise typer.Exit(1)


@app.command()
def view(
    out: Annotated[str, typer.Argument(help="Output folder or URL of a finished `geoseg run` or `geoseg change`")],
    host: Annotated[str, typer.Option(help="Address to listen on (the default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one)")] = 8000,
) -> None:
    """Serve a run's layers on a web map: classes, confidence, polygons, legend (Ctrl-C stops)."""
    from geoseg import mosaic, runstate
    from geoseg.view import ViewServer

    with _user_errors():
        if not mosaic.exists(storage.join(out, mosaic.CHANGE_STORE)):  # a store on a bucket is a prefix
            runstate.read_finished_manifest(out)  # a run that did not finish is refused in one line
        server = ViewServer(out, host, port)
    typer.echo(f"geoseg view: {server.url}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, Terminated):  # how a server is stopped (docker stop, systemd: SIGTERM)
        pass
    finally:
        server.server_close()


@app.command("worker-env")
def worker_env() -> None:
    """Print the shell exports that make a Dask worker (or scheduler) you start yourself run like
    geoseg's own: eval "$(geoseg worker-env)" before `dask worker ...` or `dask scheduler`."""
    from geoseg.cluster import worker_exports

    typer.echo("\n".join(worker_exports()))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("demo_out"),
    config: Annotated[Path, typer.Option(help="Run config")] = Path("configs/demo.yaml"),
    size: Annotated[int, typer.Option(help="Demo scene width and height in pixels")] = 2048,
    set_: SetOption = None,
) -> None:
    """Make a synthetic demo scene and run the full pipeline on it with a local Dask cluster."""
    from geoseg.synth import SceneSpec, write_scene

    scene = out / "demo_scene.tif"
    labels = out / "demo_labels.tif"
    if not scene.exists():
        write_scene(SceneSpec(size, size, seed=2024), scene, labels)
        log.info("demo scene: %s (labels: %s)", scene, labels)
    try:
        cfg = load_config(
            config if config.exists() else None, list(set_ or []), {"inputs": [str(scene)], "out": str(out)}
        )
    except ConfigError as exc:
        _fail(str(exc))
    _run_pipeline(cfg)
    if labels.exists():
        _log_accuracy(out / "mosaic.zarr", labels)


def _log_accuracy(mosaic_path: Path, labels: Path) -> None:
    """The demo knows the truth: say how close the mosaic is to it."""
    import rasterio

    from geoseg.metrics import confusion_matrix, summarize
    from geoseg.mosaic import read_legend, read_region

    legend = read_legend(mosaic_path)
    with rasterio.open(labels) as src:
        truth = src.read(1)
    pred = read_region(mosaic_path, slice(None), slice(None))
    summary = summarize(confusion_matrix(truth, pred, len(legend)), [legend[k] for k in sorted(legend)])
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in summary["iou"].items() if v is not None)
    log.info(
        "accuracy against the demo labels: mIoU %.3f, overall %.3f (%s)",
        summary["miou"],
        summary["overall_accuracy"],
        per_class,
    )


@app.command()
def export(
    out: Annotated[str, typer.Argument(help="Output folder or URL of a finished `geoseg run`")],
    formats: Annotated[str, typer.Option(help="Polygon formats, comma-separated: gpkg,parquet,fgb")] = "gpkg",
    set_: SetOption = None,
) -> None:
    """GIS layers of a finished run: classes.tif (COG), polygons, QGIS/SLD styles, quicklook, area report."""
    from geoseg.jobs import export_run, run_config_of

    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    with _user_errors():
        cfg = run_config_of(out, [*(set_ or []), f"vector.formats={fmts!r}"])
        result = export_run(out, cfg)
    for name, path in result.files.items():
        log.info("%-12s %s", name, path)


@app.command()
def vectorize(
    out: Annotated[str, typer.Argument(help="Output folder or URL of a finished `geoseg run`")],
    set_: SetOption = None,
) -> None:
    """Polygonize a finished run's mosaic again (e.g. with another vector.mmu_pixels) into OUT/polygons.gpkg."""
    from geoseg.jobs import run_config_of, vectorize_run

    with _user_errors():
        cfg = run_config_of(out, list(set_ or []))
        path = vectorize_run(out, cfg)
    log.info("polygons:  %s", path)


@app.command()
def change(
    run_a: Annotated[Optional[str], typer.Argument(help="Finished run of the first date")] = None,  # noqa: UP045
    run_b: Annotated[Optional[str], typer.Argument(help="Finished run of the second date")] = None,  # noqa: UP045
    out: Annotated[str, typer.Option(help="Output folder or URL prefix")] = "change_out",
    config: Annotated[Optional[Path], typer.Option(help="YAML with change settings (and date_a/date_b scenes)")] = None,  # noqa: UP045
    set_: SetOption = None,
) -> None:
    """What turned into what between two dates: change.zarr, change_polygons.gpkg, transitions.{csv,json,png}.

    Give two finished runs, or a config naming both dates' scenes (date_a, date_b): they are
    then segmented into OUT/date_a and OUT/date_b first.
    """
    _resumable()
    from geoseg.config import load_change_config
    from geoseg.jobs import change_dates, run_change

    with _user_errors():
        cfg = load_change_config(config, list(set_ or []))
        if run_a is not None and run_b is not None:
            result = run_change(run_a, run_b, out, cfg)
        elif cfg.date_a and cfg.date_b:
            result = change_dates(cfg, out)
        else:
            _fail("give two finished runs, or a --config with date_a and date_b scenes")
    valid = int(result.matrix.sum())
    changed = valid - int(result.matrix.trace())
    log.info("changed %d of %d valid pixels (%.2f%%)", changed, valid, 100 * changed / max(valid, 1))
    log.info("change:      %s", result.store)
    if result.polygons:
        log.info("polygons:    %s", result.polygons)
    for name, path in result.files.items():
        log.info("%-12s %s", name, path)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training config (YAML)")],
    set_: SetOption = None,
) -> None:
    """Train a model on image/label GeoTIFF pairs; writes OUT/model.safetensors, metrics and plots."""
    from geoseg.train import load_train_config
    from geoseg.train import train as run_training

    with _user_errors():
        cfg = load_train_config(config, list(set_ or []))
        run_training(cfg)


model_app = typer.Typer(no_args_is_help=True, help="Checkpoints: import other trainers' models, inspect any.")
app.add_typer(model_app, name="model")


@model_app.command("import")
def model_import(
    src: Annotated[Path, typer.Argument(help="smp save_pretrained folder, Lightning/TorchGeo .ckpt, or a state_dict")],
    meta: Annotated[Path, typer.Option(help="YAML sidecar: bands, classes, mean, std (arch, arch_kwargs)")],
    out: Annotated[Path, typer.Option(help="geoseg checkpoint to write (.safetensors)")],
) -> None:
    """Convert another trainer's checkpoint into geoseg's own format."""
    from geoseg.models.checkpoint import save_checkpoint
    from geoseg.models.importers import import_checkpoint, read_sidecar

    with _user_errors():
        ckpt = import_checkpoint(src, read_sidecar(meta), str(meta))
        path = save_checkpoint(ckpt, ckpt.build(), out)
    log.info("%s (%s, %d bands, %d classes) -> %s", src, ckpt.arch, len(ckpt.bands), ckpt.n_classes, path)


@model_app.command("inspect")
def model_inspect(
    checkpoint: Annotated[
        str, typer.Argument(help="A checkpoint: geoseg's, builtin:NAME, or another trainer's with its sidecar")
    ],
) -> None:
    """Print what a checkpoint holds: architecture, bands, classes, statistics, parameter count."""
    from geoseg.models.checkpoint import load_checkpoint
    from geoseg.models.importers import describe

    with _user_errors():
        typer.echo(json.dumps(describe(load_checkpoint(checkpoint)), indent=2))


class Terminated(BaseException):
    """SIGTERM, as a batch system (SLURM, Kubernetes) sends it before it kills a job: raised in the
    main thread so that the job unwinds as on Ctrl-C (its lease given back, its cluster closed)."""


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one, while unwinding, stops at once
    raise Terminated


_stopped_note = ""  # what the line of a stop by SIGTERM adds: how the command goes on


def _resumable() -> None:
    """This command keeps its work as it commits it: after a stop, the same command goes on."""
    global _stopped_note
    _stopped_note = "; the same command again goes on from what was committed"


def entrypoint() -> None:
    """``geoseg`` and ``python -m geoseg``: the commands, and a stop by SIGTERM said in one line."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
        code: int | str | None = 0
    except Terminated:
        typer.echo(f"error: stopped by SIGTERM{_stopped_note}", err=True)
        code = 128 + signal.SIGTERM
    except SystemExit as exc:  # how typer ends every command
        code = exc.code
    _exit(code)


def _exit(code: int | str | None) -> None:
    """End the process once the command is done (:func:`geoseg.logs.exit_without_teardown`)."""
    if isinstance(code, str):  # sys.exit("message"): said on stderr, exit code 1
        print(code, file=sys.stderr)
        code = 1
    from geoseg.logs import exit_without_teardown

    exit_without_teardown(code or 0)
