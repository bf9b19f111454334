"""Checkpoints from other trainers, turned into geoseg's own, without executing their code.

- an smp ``save_pretrained`` folder: ``config.json`` (the architecture and its arguments) and
  ``model.safetensors``;
- a TorchGeo/Lightning checkpoint of a semantic segmentation task (``.ckpt``): a dict whose
  ``hyper_parameters`` name the model, backbone, in_channels and classes, and whose
  ``state_dict`` holds the weights under ``model.``;
- a plain state_dict (``.pt``, ``.pth``, ``.safetensors``), whose architecture the sidecar names.

What these do not hold comes from a YAML sidecar with the names of geoseg's checkpoint
metadata: ``bands``, ``classes`` (names, or ``{id, name, color}``), ``mean``, ``std``, and for
a plain state_dict ``arch`` and ``arch_kwargs``. Files are read with safetensors or
``torch.load(weights_only=True)``; the weights must fit the architecture exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from geoseg.models.checkpoint import Checkpoint, CheckpointError, file_sha256
from geoseg.models.registry import SMP_ARCHITECTURES, load_state_dict_file

SIDECAR_NAME = "geoseg.yaml"  # beside the weights, or inside an smp folder
# TorchGeo's SemanticSegmentationTask model names -> geoseg's architecture names (smp models)
TORCHGEO_MODELS = {"unet": "smp-unet", "deeplabv3+": "deeplabv3plus", "fpn": "fpn", "pspnet": "pspnet"}
SMP_NAMES = {cls: name for name, cls in SMP_ARCHITECTURES.items()}
PALETTE = ["#1f78b4", "#1b7837", "#a6d96a", "#fee08b", "#d73027", "#bf8a5a", "#4d4d4d", "#984ea3", "#ff7f00"]


def read_sidecar(path: str | Path) -> dict[str, Any]:
    try:
        meta = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: cannot read the sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the sidecar must be a mapping (bands, classes, mean, std, ...)")
    return meta


def sidecar_for(src: Path) -> Path | None:
    """The sidecar that goes with ``src`` when none is given: ``geoseg.yaml`` in an smp folder,
    ``NAME.yaml`` beside a file."""
    candidate = src / SIDECAR_NAME if src.is_dir() else src.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def is_foreign(src: Path) -> bool:
    """Whether ``src`` is another trainer's checkpoint (not geoseg's own format)."""
    if src.is_dir():
        return (src / "config.json").is_file()
    if src.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            return "geoseg" not in (f.metadata() or {})
    if src.suffix in (".ckpt", ".pt", ".pth"):
        try:  # tensors memory-mapped, not read: the file is read once, by the loader that follows
            blob = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # a damaged file: its error once, not after a second read
                raise
            blob = torch.load(src, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
        return not (isinstance(blob, dict) and "meta" in blob)
    return False


def load_foreign(src: Path, sidecar: Path | None = None) -> Checkpoint:
    """Another trainer's checkpoint with its sidecar (given, or found beside it), as a Checkpoint
    whose checksum covers the weights and the sidecar."""
    sidecar = sidecar or sidecar_for(src)
    if sidecar is None:
        expected = src / SIDECAR_NAME if src.is_dir() else src.with_suffix(".yaml")
        raise CheckpointError(
            f"{src}: not a geoseg checkpoint; give its bands, classes and statistics in {expected} "
            "or convert it with `geoseg model import`"
        )
    meta = read_sidecar(sidecar)
    ckpt = import_checkpoint(src, meta, str(sidecar))
    weights = next((src / n for n in ("model.safetensors", "pytorch_model.bin") if (src / n).is_file()), src)
    # what decides the outputs: the weights, an smp folder's model settings, the sidecar's values
    config = (src / "config.json").read_bytes() if src.is_dir() else b""
    digest = hashlib.sha256(file_sha256(weights).encode() + config + json.dumps(meta, sort_keys=True).encode())
    ckpt.sha256 = digest.hexdigest()
    return ckpt


def import_checkpoint(src: str | Path, meta: dict[str, Any], sidecar: str = "sidecar") -> Checkpoint:
    """``src`` (an smp folder, a Lightning checkpoint or a state_dict) with the sidecar's ``meta``."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: not found")
    try:
        if src.is_dir():
            arch, arch_kwargs, in_channels, n_classes, state = _smp_folder(src)
        elif src.suffix == ".ckpt":
            arch, arch_kwargs, in_channels, n_classes, state = _lightning(src)
        else:
            if "arch" not in meta:
                raise CheckpointError(f"{src}: a plain state_dict: the {sidecar} must name its `arch`")
            arch, arch_kwargs, in_channels, n_classes = meta["arch"], {}, None, None
            state = load_state_dict_file(src)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{src}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    arch = meta.get("arch", arch)
    arch_kwargs = {**arch_kwargs, **meta.get("arch_kwargs", {})}
    for key in ("bands", "classes", "mean", "std"):
        if key not in meta:
            raise CheckpointError(f"{sidecar}: `{key}` is missing (bands, classes, mean and std are needed)")
    bands = [str(b) for b in meta["bands"]]
    classes = [_class(i, c) for i, c in enumerate(meta["classes"])]
    if in_channels is not None and len(bands) != in_channels:
        raise CheckpointError(f"{sidecar}: {len(bands)} bands, but {src} takes {in_channels} input channels")
    if n_classes is not None and len(classes) != n_classes:
        raise CheckpointError(f"{sidecar}: {len(classes)} classes, but {src} predicts {n_classes}")
    if len(meta["mean"]) != len(bands) or len(meta["std"]) != len(bands):
        raise CheckpointError(f"{sidecar}: mean and std need one value per band ({len(bands)})")
    ckpt = Checkpoint(
        arch=arch,
        bands=bands,
        classes=classes,
        mean=[float(v) for v in meta["mean"]],
        std=[float(v) for v in meta["std"]],
        arch_kwargs=arch_kwargs,
        extra={"imported_from": str(src), **({"raw_values": True} if meta.get("raw_values") else {})},
        state_dict=state,
        path=str(src),
    )
    ckpt.build()  # the weights must fit the architecture: a clear error now, not in a worker
    return ckpt


def _class(index: int, spec: Any) -> dict[str, Any]:
    if isinstance(spec, dict):
        return {
            "id": int(spec.get("id", index)),
            "name": str(spec["name"]),
            "color": spec.get("color", PALETTE[index % 9]),
        }
    return {"id": index, "name": str(spec), "color": PALETTE[index % len(PALETTE)]}


def _smp_folder(src: Path) -> tuple[str, dict[str, Any], int, int, dict[str, torch.Tensor]]:
    config = json.loads((src / "config.json").read_text())
    model_class = config.get("_model_class")
    if model_class not in SMP_NAMES:
        raise CheckpointError(f"{src}: smp model {model_class!r} is not one geoseg builds ({', '.join(SMP_NAMES)})")
    weights = next((src / name for name in ("model.safetensors", "pytorch_model.bin") if (src / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{src}: no model.safetensors in the smp folder")
    skip = {"_model_class", "in_channels", "classes", "encoder_weights"}
    kwargs = {k: v for k, v in config.items() if k not in skip}
    return SMP_NAMES[model_class], kwargs, int(config["in_channels"]), int(config["classes"]), _tensors(weights)


def _lightning(src: Path) -> tuple[str, dict[str, Any], int, int, dict[str, torch.Tensor]]:
    blob = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "hyper_parameters" not in blob:
        raise CheckpointError(f"{src}: expected a Lightning checkpoint (state_dict and hyper_parameters)")
    hparams = blob["hyper_parameters"]
    model = str(hparams.get("model", "")).lower()
    if model not in TORCHGEO_MODELS:
        raise CheckpointError(f"{src}: model {model!r} is not one geoseg builds ({', '.join(TORCHGEO_MODELS)})")
    n_classes = hparams.get("num_classes", hparams.get("classes"))
    if "in_channels" not in hparams or n_classes is None:
        raise CheckpointError(f"{src}: hyper_parameters must give in_channels and num_classes")
    state = {k.removeprefix("model."): v for k, v in blob["state_dict"].items() if k.startswith("model.")}
    kwargs = {"encoder_name": hparams.get("backbone", "resnet50")}
    return TORCHGEO_MODELS[model], kwargs, int(hparams["in_channels"]), int(n_classes), state


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """What a checkpoint holds, for ``geoseg model inspect``."""
    return {
        "checkpoint": ckpt.path,
        "sha256": ckpt.sha256 or None,
        "arch": ckpt.arch,
        "arch_kwargs": ckpt.arch_kwargs,
        "bands": ckpt.bands,
        "mean": ckpt.mean,
        "std": ckpt.std,
        "classes": [{"id": c["id"], "name": c["name"], "color": c.get("color")} for c in ckpt.classes],
        "parameters": sum(p.numel() for p in ckpt.build().parameters()),
        **({"extra": ckpt.extra} if ckpt.extra else {}),
    }
