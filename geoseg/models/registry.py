"""Architectures by name: the project's own and segmentation-models-pytorch's."""

from __future__ import annotations

from typing import Any

from torch import nn

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


def available_architectures() -> list[str]:
    return ["unet", *ALIASES, *SMP_ARCHITECTURES]


def build_model(arch: str, in_channels: int, classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate an architecture with random weights (no download, ever)."""
    arch = arch.lower()
    if arch in ALIASES:
        arch, defaults = ALIASES[arch]
        kwargs = {**defaults, **kwargs}
    if arch == "unet":
        return UNet(in_channels, classes, **kwargs)
    if arch in SMP_ARCHITECTURES:
        import segmentation_models_pytorch as smp

        kwargs.setdefault("encoder_name", "resnet18")
        kwargs["encoder_weights"] = None  # weights come from a checkpoint file, not the network
        return smp.create_model(SMP_ARCHITECTURES[arch], in_channels=in_channels, classes=classes, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(available_architectures())}")
