"""Architectures by name: the project's own and segmentation-models-pytorch's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoseg.models.baselines import FCN8s, SegNet
from geoseg.models.unet import UNet

# smp architectures users ask for, by the names the config accepts.
SMP_ARCHITECTURES = {
    "smp-unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "deeplabv3plus": "DeepLabV3Plus",
    "linknet": "Linknet",
    "pspnet": "PSPNet",
    "manet": "MAnet",
}
# The "ResUNet" of the literature: smp's Unet on a ResNet encoder.
ALIASES = {"resunet": ("smp-unet", {"encoder_name": "resnet34"})}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` or ``.pt``/``.pth`` file, without executing code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def available_architectures() -> list[str]:
    return ["unet", "fcn", "segnet", *ALIASES, *SMP_ARCHITECTURES]


def build_model(arch: str, in_channels: int, classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate an architecture with random weights (no download, ever)."""
    arch = arch.lower()
    if arch in ALIASES:
        arch, defaults = ALIASES[arch]
        kwargs = {**defaults, **kwargs}
    own = {"unet": UNet, "fcn": FCN8s, "segnet": SegNet}
    if arch in own:
        return own[arch](in_channels, classes, **kwargs)
    if arch in SMP_ARCHITECTURES:
        import segmentation_models_pytorch as smp

        kwargs.setdefault("encoder_name", "resnet18")
        encoder_file = kwargs.pop("encoder_weights_path", None)
        kwargs["encoder_weights"] = None  # never downloaded: a local file may be given instead
        model = smp.create_model(SMP_ARCHITECTURES[arch], in_channels=in_channels, classes=classes, **kwargs)
        if encoder_file:
            model.encoder.load_state_dict(load_state_dict_file(encoder_file))
        return model
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(available_architectures())}")
