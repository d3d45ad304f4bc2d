"""Small models for the ``digits`` default and quick runs: an MLP and a tiny BatchNorm CNN."""

from __future__ import annotations

from torch import nn

from agnostic_sam.models.registry import register_model

__all__ = ["SmallCNN", "mlp"]


def mlp(*, num_classes: int, in_channels: int, image_size: int, hidden: int = 256) -> nn.Sequential:
    """Flatten -> Linear(hidden) -> ReLU -> Linear(hidden) -> ReLU -> Linear(num_classes)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class SmallCNN(nn.Module):
    """3x3 conv-BN-ReLU stages, a stride-2 conv between stages, global average pool, linear head.

    All convolutions use padding 1 and the pooling is global, so any input of at least 1x1 pixel
    and any channel count works (8x8 digits give 8 -> 4 -> 2 pixel feature maps).
    """

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):  # x: (N, C, H, W) -> logits (N, num_classes)
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model("mlp", image_size=8, in_channels=1, description="2 hidden layers of 256 (digits)")
def _mlp(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return mlp(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_model("mlp_mini", image_size=8, in_channels=1, description="2 hidden layers of 16")
def _mlp_mini(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return mlp(num_classes=num_classes, in_channels=in_channels, image_size=image_size, hidden=16)


@register_model("cnn", image_size=8, in_channels=1, description="6 conv-BN-ReLU, widths 32/64/128")
def _cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


@register_model("cnn_mini", image_size=8, in_channels=1, description="6 conv-BN-ReLU, widths 4/8/8")
def _cnn_mini(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels, widths=(4, 8, 8))
