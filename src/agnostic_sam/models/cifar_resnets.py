"""CIFAR residual networks written here: ResNet-32 (He et al., 2016) and WRN-28-10
(Zagoruyko & Komodakis, 2016). Both take 32x32 inputs and end in global average pooling, so
other sizes and channel counts work too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agnostic_sam.models.registry import register_model

__all__ = ["CifarResNet", "WideResNet", "init_conv_bn_linear"]


def init_conv_bn_linear(model: nn.Module) -> None:
    """He-normal conv weights (fan-out), BN weight 1 / bias 0, linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (post-activation, He et al. 2016a).

    Option-A shortcut: when the block halves the resolution and widens, the identity is
    subsampled (every other pixel) and zero-padded in channels, adding no parameters; this is
    the variant of the paper's CIFAR experiments (0.46M parameters for ResNet-32).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            # (N, C_in, H, W) -> (N, C_out, H, W): zeros split evenly before/after the channels.
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: 3x3 stem, 3 stages of n basic blocks, widths w, 2w, 4w.

    ``n=5, width=16`` is ResNet-32 (0.46M parameters with 10 classes).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, n: int = 5, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 + shortcut (pre-activation, wide ResNet).

    When the shape changes, the shortcut is a 1x1 conv on the *pre-activated* input.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-d-k: 3x3 stem of 16, 3 groups of (d-4)/6 blocks of widths 16k, 32k, 64k, BN-ReLU, pool.

    ``depth=28, widen=10, dropout=0`` is WRN-28-10 (36.5M parameters with 10 classes).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 28, widen: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth!r}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(n):
                blocks.append(_PreActBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1, dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("resnet32", image_size=32,
                description="ResNet-32 (CIFAR, option-A shortcuts), 0.46M")
def _resnet32(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(num_classes, in_channels, n=5, width=16)


@register_model("resnet32_mini", image_size=32, description="ResNet-8, widths 4/8/16")
def _resnet32_mini(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(num_classes, in_channels, n=1, width=4)


@register_model("wrn28_10", image_size=32, description="WideResNet-28-10, dropout 0, 36.5M")
def _wrn28_10(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return WideResNet(num_classes, in_channels, depth=28, widen=10)


@register_model("wrn28_10_mini", image_size=32, description="WideResNet-10-1")
def _wrn28_10_mini(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return WideResNet(num_classes, in_channels, depth=10, widen=1)
