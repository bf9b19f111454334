"""Segmentation architectures and the checkpoint format."""

from geoseg.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from geoseg.models.registry import available_architectures, build_model

__all__ = ["Checkpoint", "available_architectures", "build_model", "load_checkpoint", "save_checkpoint"]
