r"""PyramidNet with bottleneck blocks (Han, Kim & Kim, CVPR 2017) for CIFAR.

Additive widening: with :math:`N` blocks in total, block :math:`k = 1..N` has
:math:`D_k = \lfloor 16 + \alpha k / N \rceil` bottleneck channels (rounded) and outputs
:math:`4 D_k`; depth :math:`= 9 n + 2` with :math:`n` blocks per stage (three 1x1/3x3/1x1 convs
per block plus stem and classifier). ``pyramidnet101`` is depth 101 (:math:`n = 11`, 33 blocks)
with widening factor :math:`\alpha = 270` (the largest in Han et al.'s CIFAR tables; the
Agnostic-SAM paper does not state it); it has
about 16.8M parameters and 2.9 GMACs per 32x32 image with 10 classes, 0.55x the cost of
WRN-28-10, in line with the paper's Table 6 epoch times (``test_models.py`` pins the count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agnostic_sam.models.cifar_resnets import init_conv_bn_linear
from agnostic_sam.models.registry import register_model

__all__ = ["PyramidNet"]


class _Bottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4D)-BN + shortcut; no final ReLU.

    Shortcut: 2x2 average pooling when downsampling, then zero-padding of the new channels
    (no projection parameters, as in the paper).
    """

    expansion = 4

    def __init__(self, c_in: int, d: int, stride: int) -> None:
        super().__init__()
        c_out = d * self.expansion
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            nn.Conv2d(d, d, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(d),
            nn.ReLU(inplace=True),
            nn.Conv2d(d, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        shortcut = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride > 1 else x
        if self.pad:  # (N, C_in, H, W) -> (N, C_out, H, W), new channels are zeros
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return out + shortcut


class PyramidNet(nn.Module):
    """Bottleneck PyramidNet of ``depth = 9n + 2`` with additive widening ``alpha``."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 101,
                 alpha: float = 270.0, base: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"bottleneck PyramidNet depth must be 9n+2, got {depth!r}")
        n = (depth - 2) // 9
        total = 3 * n
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(base))
        blocks: list[nn.Module] = []
        c_in, width = base, float(base)
        for k in range(total):
            width += alpha / total  # D_k = base + alpha * k / N, kept as float, rounded per block
            stride = 2 if k in (n, 2 * n) else 1
            blocks.append(_Bottleneck(c_in, round(width), stride))
            c_in = round(width) * _Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("pyramidnet101", image_size=32,
                description="PyramidNet-101 bottleneck, alpha=270 (CIFAR)")
def _pyramidnet101(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PyramidNet(num_classes, in_channels, depth=101, alpha=270)


@register_model("pyramidnet101_mini", image_size=32, description="PyramidNet-11, alpha=12, base 4")
def _pyramidnet101_mini(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PyramidNet(num_classes, in_channels, depth=11, alpha=12, base=4)
