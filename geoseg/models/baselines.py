"""Historical baselines, small, so the UNet's lineage can be compared on the same data.

- :class:`FCN8s`: Long et al. (2015): a conv/pool encoder whose class scores at strides
  32, 16 and 8 are upsampled and summed (skip *fusion*, not concatenation).
- :class:`SegNet`: Badrinarayanan et al. (2017): the decoder unpools with the encoder's
  max-pooling indices instead of learning the up-sampling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def _conv_block(c_in: int, c_out: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(n):
        layers += [
            nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class FCN8s(nn.Module):
    def __init__(self, in_channels: int, classes: int, base_width: int = 16) -> None:
        super().__init__()
        widths = [base_width * m for m in (1, 2, 4, 8, 8)]
        self.stages = nn.ModuleList(
            _conv_block(c_in, c_out, 2) for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.score8 = nn.Conv2d(widths[2], classes, 1)
        self.score16 = nn.Conv2d(widths[3], classes, 1)
        self.score32 = nn.Sequential(_conv_block(widths[4], widths[4], 1), nn.Conv2d(widths[4], classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2, ceil_mode=True)
            feats.append(x)
        score = self.score32(feats[4])
        score = F.interpolate(score, size=feats[3].shape[-2:], mode="bilinear", align_corners=False)
        score = score + self.score16(feats[3])
        score = F.interpolate(score, size=feats[2].shape[-2:], mode="bilinear", align_corners=False)
        score = score + self.score8(feats[2])
        return F.interpolate(score, size=size, mode="bilinear", align_corners=False)


class SegNet(nn.Module):
    def __init__(self, in_channels: int, classes: int, base_width: int = 16, depth: int = 4) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(depth)]
        ins = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(_conv_block(c_in, c_out, 2) for c_in, c_out in zip(ins, widths, strict=True))
        outs = [*widths[:-1]]
        self.decoder = nn.ModuleList(
            _conv_block(widths[i], outs[i - 1] if i > 0 else widths[0], 2) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for block in self.encoder:
            x = block(x)
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, 2, return_indices=True, ceil_mode=True)
            indices.append(idx)
        for block in self.decoder:
            x = F.max_unpool2d(x, indices.pop(), 2, output_size=sizes.pop())
            x = block(x)
        return self.head(x)
