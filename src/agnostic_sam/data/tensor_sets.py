"""In-memory data sets held as ``TensorDataset``s: ``digits`` (the default) and ``synthetic``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from agnostic_sam.data.registry import DataRequest, Source, register_dataset
from agnostic_sam.errors import UsageError

__all__ = ["DIGITS_TEST_FRACTION", "SYNTHETIC_DEFAULTS"]

# digits: fixed stratified 80/20 split, train_test_split(..., stratify=y, random_state=0):
# 1437 training / 360 test images of 8x8 pixels, 10 classes.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# synthetic: shape and size when the request leaves them open.
SYNTHETIC_DEFAULTS = {"num_classes": 10, "in_channels": 3, "image_size": 32,
                      "train_size": 512, "test_size": 256}
# synthetic sample = SIGNAL * prototype[label] + standard normal noise: learnable, not trivial.
SYNTHETIC_SIGNAL = 0.25


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@register_dataset(
    "digits",
    description="scikit-learn handwritten digits, 8x8 gray, 10 classes, 1437 train / 360 test",
    files="(bundled with scikit-learn)",
)
def build_digits(req: DataRequest) -> Source:
    """sklearn ``load_digits``: pixels 0..16 -> [0, 1] -> standardised by the training mean/std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    # One gray channel: a scalar mean/std over all training pixels (after scaling to [0, 1]).
    x_tr = torch.as_tensor(x_tr, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x_te = torch.as_tensor(x_te, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    mean, std = x_tr.mean(), x_tr.std()
    size = req.image_size or 8
    x_tr, x_te = _resize((x_tr - mean) / std, size), _resize((x_te - mean) / std, size)
    y_tr = torch.as_tensor(y_tr, dtype=torch.long)
    y_te = torch.as_tensor(y_te, dtype=torch.long)
    return Source(
        train=TensorDataset(x_tr, y_tr), train_targets=y_tr,
        load_test=lambda: TensorDataset(x_te, y_te),
        num_classes=10, in_channels=1, image_size=size,
    )


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent generator per (seed, stream): train and test do not depend on each other."""
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@register_dataset(
    "synthetic",
    description="random Gaussian class prototypes + noise, deterministic by seed "
    "(benchmarks, smoke runs)",
    files="(generated in memory)",
    options=("num_classes", "in_channels", "train_size", "test_size"),
)
def build_synthetic(req: DataRequest) -> Source:
    """Samples ``x = SIGNAL * mu_y + eps`` with ``mu_c, eps ~ N(0, I)``, labels uniform."""
    opts = {k: getattr(req, k) or v for k, v in SYNTHETIC_DEFAULTS.items()}
    c, size, k = opts["in_channels"], opts["image_size"], opts["num_classes"]
    if k < 2:
        raise UsageError(f"synthetic needs num_classes >= 2, got {k}")
    prototypes = torch.randn(k, c, size, size, generator=_generator(req.seed, 0))

    def sample(n: int, stream: int) -> TensorDataset:
        gen = _generator(req.seed, stream)
        y = torch.randint(0, k, (n,), generator=gen)
        x = SYNTHETIC_SIGNAL * prototypes[y] + torch.randn(n, c, size, size, generator=gen)
        return TensorDataset(x, y)

    train = sample(opts["train_size"], 1)
    return Source(
        train=train, train_targets=train.tensors[1],
        load_test=lambda: sample(opts["test_size"], 2),
        num_classes=k, in_channels=c, image_size=size,
    )
