"""Image transforms of the paper's two regimes.

CIFAR (Section 4.1): pad by 4 pixels + random 32x32 crop + horizontal flip, per-channel
normalisation. Small fine-grained sets trained at 224x224 (Section 4.2): random resized crop,
horizontal flip, brightness/contrast jitter, ImageNet normalisation; eval resizes the short side
to 256/224 of the crop size and takes the centre crop.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_transforms",
    "small_data_transforms",
]

# Per-channel statistics (RGB, pixel values scaled to [0, 1]) of the training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Strength of ColorJitter for the small data sets: factors drawn from [1 - 0.4, 1 + 0.4].
JITTER = 0.4


def cifar_transforms(
    mean: Sequence[float], std: Sequence[float], image_size: int = 32
) -> tuple[T.Compose, T.Compose]:
    """``(train, eval)`` transforms of PIL images: crop with 4-pixel padding + flip; eval none.

    ``image_size != 32`` first resizes the 32x32 images (e.g. 224 for ImageNet-stem models).
    """
    resize = [T.Resize(image_size)] if image_size != 32 else []
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose(
        [*resize, T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(), *tail]
    )
    return train, T.Compose([*resize, *tail])


def small_data_transforms(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[T.Compose, T.Compose]:
    """``(train, eval)`` transforms for the small data sets at ``image_size`` (224 in the paper)."""
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=JITTER, contrast=JITTER),
        *tail,
    ])
    # 256 for 224: the usual resize-then-centre-crop ratio.
    resize = round(image_size * 256 / 224)
    return train, T.Compose([T.Resize(resize), T.CenterCrop(image_size), *tail])
