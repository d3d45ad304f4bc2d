"""torchvision architectures of the paper (ResNet-18, DenseNet-121, EfficientNet-B3/B4), built
with ``weights=None`` and adapted to the input:

* ``in_channels != 3``: the first convolution is replaced by one with that many inputs.
* ``image_size <= 64`` (CIFAR-like): a CIFAR stem. ResNet: 3x3 stride-1 first conv and no
  max-pool; DenseNet: 3x3 stride-1 first conv and no pool; EfficientNet: first conv stride 1.

Full models keep torchvision's exact module names, so ImageNet checkpoints load with
``load_pretrained`` (only a replaced stem or a head of another size is skipped).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.densenet import DenseNet
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.resnet import BasicBlock, ResNet

from agnostic_sam.models.registry import register_model

__all__ = ["CIFAR_STEM_MAX_SIZE", "densenet", "efficientnet", "resnet18"]

# Inputs up to this side length get the CIFAR stem (no early downsampling).
CIFAR_STEM_MAX_SIZE = 64


def _conv_like(conv: nn.Conv2d, in_channels: int, kernel: int | None = None,
               stride: int | None = None) -> nn.Conv2d:
    """A fresh conv like ``conv`` with other input channels / kernel / stride ('same' padding)."""
    k = kernel if kernel is not None else conv.kernel_size[0]
    return nn.Conv2d(in_channels, conv.out_channels, k, stride=stride or conv.stride[0],
                     padding=k // 2, bias=conv.bias is not None)


def resnet18(*, num_classes: int, in_channels: int, image_size: int,
             layers: tuple[int, int, int, int] = (2, 2, 2, 2)) -> ResNet:
    """torchvision ResNet with basic blocks; ``layers=(2, 2, 2, 2)`` is ResNet-18."""
    model = ResNet(BasicBlock, list(layers), num_classes=num_classes)
    if image_size <= CIFAR_STEM_MAX_SIZE:
        model.conv1 = _conv_like(model.conv1, in_channels, kernel=3, stride=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _conv_like(model.conv1, in_channels)
    return model


def densenet(*, num_classes: int, in_channels: int, image_size: int, growth_rate: int = 32,
             block_config: tuple[int, ...] = (6, 12, 24, 16),
             num_init_features: int = 64) -> DenseNet:
    """torchvision DenseNet-BC; the defaults are DenseNet-121."""
    model = DenseNet(growth_rate=growth_rate, block_config=block_config,
                     num_init_features=num_init_features, num_classes=num_classes)
    if image_size <= CIFAR_STEM_MAX_SIZE:
        model.features.conv0 = _conv_like(model.features.conv0, in_channels, kernel=3, stride=1)
        model.features.pool0 = nn.Identity()
    elif in_channels != 3:
        model.features.conv0 = _conv_like(model.features.conv0, in_channels)
    return model


# EfficientNet-B0 stages (expand ratio, kernel, stride, in, out, layers), Tan & Le 2019, Table 1;
# B3/B4 scale channels and depths of these by width/depth multipliers.
_B0_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
              (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
              (6, 3, 1, 192, 320, 1)]


def efficientnet(*, num_classes: int, in_channels: int, image_size: int, width_mult: float,
                 depth_mult: float, dropout: float) -> EfficientNet:
    """torchvision EfficientNet (v1) scaled by width/depth multipliers
    (B3: 1.2/1.4, B4: 1.4/1.8)."""
    stages = [MBConvConfig(*s, width_mult=width_mult, depth_mult=depth_mult) for s in _B0_STAGES]
    model = EfficientNet(stages, dropout=dropout, num_classes=num_classes)
    stem = model.features[0][0]
    if image_size <= CIFAR_STEM_MAX_SIZE or in_channels != 3:
        stride = 1 if image_size <= CIFAR_STEM_MAX_SIZE else None
        model.features[0][0] = _conv_like(stem, in_channels, stride=stride)
    return model


@register_model("resnet18", image_size=224, description="torchvision ResNet-18, 11.2M")
def _resnet18(**kw: Any) -> nn.Module:
    return resnet18(**kw)


@register_model("resnet18_mini", image_size=224, description="ResNet-10 (1 block per stage)")
def _resnet18_mini(**kw: Any) -> nn.Module:
    return resnet18(**kw, layers=(1, 1, 1, 1))


@register_model("densenet121", image_size=32, description="torchvision DenseNet-121, 7.0M")
def _densenet121(**kw: Any) -> nn.Module:
    return densenet(**kw)


@register_model("densenet121_mini", image_size=32, description="DenseNet, growth 8, 4x2 layers")
def _densenet121_mini(**kw: int) -> nn.Module:
    return densenet(**kw, growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)


@register_model("efficientnet_b3", image_size=224, description="torchvision EfficientNet-B3, 12.2M")
def _efficientnet_b3(**kw: int) -> nn.Module:
    return efficientnet(**kw, width_mult=1.2, depth_mult=1.4, dropout=0.3)


@register_model("efficientnet_b4", image_size=224, description="torchvision EfficientNet-B4, 19.3M")
def _efficientnet_b4(**kw: int) -> nn.Module:
    return efficientnet(**kw, width_mult=1.4, depth_mult=1.8, dropout=0.4)


@register_model("efficientnet_b3_mini", image_size=224,
                description="EfficientNet, width/depth 0.25")
def _efficientnet_b3_mini(**kw: int) -> nn.Module:
    return efficientnet(**kw, width_mult=0.25, depth_mult=0.25, dropout=0.3)


@register_model("efficientnet_b4_mini", image_size=224,
                description="EfficientNet, width 0.3, depth 0.3")
def _efficientnet_b4_mini(**kw: int) -> nn.Module:
    return efficientnet(**kw, width_mult=0.3, depth_mult=0.3, dropout=0.4)

