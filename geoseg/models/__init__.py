"""Segmentation architectures and the checkpoint format.

Names are imported on first use: reading a checkpoint's header (a run's client) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Checkpoint": "geoseg.models.checkpoint",
    "load_checkpoint": "geoseg.models.checkpoint",
    "save_checkpoint": "geoseg.models.checkpoint",
    "available_architectures": "geoseg.models.registry",
    "build_model": "geoseg.models.registry",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
