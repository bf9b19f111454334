"""Checkpoint format: weights plus everything needed to use them on a scene.

A checkpoint is a ``.safetensors`` file whose header metadata holds, as JSON, the
architecture and its arguments, the input bands, the normalisation statistics and the
classes with names and colours. Loading never executes code: safetensors is plain tensors,
and ``.pt`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg import storage
from geoseg.config import CheckpointError

if TYPE_CHECKING:  # a run's client reads a checkpoint's header without torch (load_checkpoint(weights=False))
    import torch
    from torch import nn

FORMAT_VERSION = 1
BUILTIN = {"demo": Path(__file__).resolve().parent.parent / "data" / "demo_model.safetensors"}


@dataclass
class Checkpoint:
    arch: str
    bands: list[str]
    classes: list[dict[str, Any]]  # [{"id", "name", "color"}]
    mean: list[float]
    std: list[float]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # empty: header only
    path: str = ""
    sha256: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def metadata(self) -> dict[str, Any]:
        meta = asdict(self)
        for key in ("state_dict", "path", "sha256"):
            meta.pop(key)
        return {"format_version": FORMAT_VERSION, **meta}

    def build(self) -> nn.Module:
        """The model with the checkpoint's weights, in eval mode."""
        from geoseg.models.registry import build_model

        model = build_model(self.arch, len(self.bands), self.n_classes, **self.arch_kwargs)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()
            detail = next((line.strip() for line in reason[1:] if line.strip()), reason[0] if reason else "")
            raise CheckpointError(f"{self.path}: weights do not fit architecture {self.arch!r}: {detail}") from None
        return model.eval()


def resolve_checkpoint_path(spec: str) -> Path:
    """``builtin:NAME`` -> the file shipped in the package; a URL -> a local copy; anything else is a path."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise CheckpointError(f"{spec}: no such built-in model (have: {', '.join(BUILTIN)})")
        return BUILTIN[name]
    if storage.is_url(spec):
        try:
            return storage.cached_copy(spec)
        except storage.StorageError as exc:
            raise CheckpointError(f"{spec}: cannot fetch the checkpoint ({exc.reason})") from None
    return Path(spec).expanduser()


def sidecar_beside_url(spec: str) -> Path:
    """A local copy of the sidecar beside another trainer's checkpoint at a URL (``NAME.yaml``)."""
    base = storage.without_query(spec)  # a signed URL's query signs the weights, not the sidecar
    loc = storage.join(storage.parent(base), Path(storage.name(base)).stem + ".yaml")
    try:
        return storage.cached_copy(loc)
    except storage.StorageError as exc:
        message = (
            f"{spec}: not a geoseg checkpoint, and its sidecar {loc} cannot be read ({exc.reason}); give its bands, "
            "classes and statistics there or convert it with `geoseg model import`"
        )
        raise CheckpointError(storage.redact(message)) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(ckpt: Checkpoint, model: nn.Module, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"geoseg": json.dumps(ckpt.metadata())})
    return path


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file, without torch and without its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


def load_checkpoint(spec: str | Path, weights: bool = True) -> Checkpoint:
    """Read a checkpoint (safetensors, or a weights-only ``.pt`` dict with ``meta``/``state_dict``),
    or another trainer's with its YAML sidecar (:mod:`geoseg.models.importers`).

    ``weights=False`` reads a geoseg ``.safetensors`` file's header alone, without torch (a run's
    client needs its bands, classes and checksum; the workers load the weights): ``state_dict``
    stays empty. Other formats are read whole either way."""
    path = resolve_checkpoint_path(str(spec))
    # a URL is named as the user gave it, not by its local copy
    shown = str(spec) if storage.is_url(str(spec)) else str(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{shown}: is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{shown}: checkpoint not found")
    if not weights and path.suffix == ".safetensors" and path.is_file():
        try:
            header = _safetensors_metadata(path)
            meta = json.loads(header["geoseg"]) if "geoseg" in header else None
        except Exception as exc:
            raise CheckpointError(f"{shown}: cannot read checkpoint ({exc})") from None
        if meta is not None:
            return _checkpoint_from(spec, path, meta, {})
    from geoseg.models import importers

    try:
        foreign = importers.is_foreign(path)
    except Exception as exc:
        raise CheckpointError(f"{shown}: cannot read checkpoint ({exc})") from None
    if foreign:  # another trainer's, with its sidecar
        if not storage.is_url(str(spec)):
            return importers.load_foreign(path)
        ckpt = importers.load_foreign(path, sidecar_beside_url(str(spec)))
        ckpt.path = str(spec)  # named as the user gave it; workers fetch it (and its sidecar) from there
        return ckpt
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            header = _safetensors_metadata(path)
            if "geoseg" not in header:
                raise CheckpointError(f"{path}: safetensors file has no geoseg metadata")
            meta = json.loads(header["geoseg"])
            state = load_file(str(path))
        else:
            import torch

            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
                raise CheckpointError(f"{path}: expected a dict with 'meta' and 'state_dict'")
            meta, state = blob["meta"], blob["state_dict"]
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from None
    return _checkpoint_from(spec, path, meta, state)


def _checkpoint_from(spec: str | Path, path: Path, meta: dict[str, Any], state: dict[str, Any]) -> Checkpoint:
    """A geoseg checkpoint from its metadata and its tensors (none for a header alone), checked."""
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is not supported (expected {FORMAT_VERSION})")
    where = str(spec) if storage.is_url(str(spec)) else str(path)  # a URL is named as the user gave it
    try:
        ckpt = Checkpoint(**meta, state_dict=state, path=where, sha256=file_sha256(path))
    except TypeError as exc:
        raise CheckpointError(f"{path}: malformed metadata ({exc})") from None
    if len(ckpt.mean) != len(ckpt.bands) or len(ckpt.std) != len(ckpt.bands):
        raise CheckpointError(f"{path}: normalisation stats do not match the {len(ckpt.bands)} bands")
    return ckpt
