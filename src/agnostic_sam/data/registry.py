"""Dataset registry and ``build_data``: one entry per data set, a uniform builder signature.

A builder receives a ``DataRequest`` and returns a ``Source``: the training split *without*
transforms, its clean labels, the transforms, and a callable that opens the test split. The
common steps (held-out validation part, label noise, views) live here, once, so every data set
gets them the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from agnostic_sam.data.noise import symmetric_label_noise
from agnostic_sam.data.split import stratified_holdout
from agnostic_sam.data.views import make_view
from agnostic_sam.errors import UsageError

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataRequest",
    "DatasetSpec",
    "Source",
    "build_data",
    "default_data_dir",
    "list_datasets",
    "register_dataset",
]

# The held-out validation part is the same for every method and run seed.
HOLDOUT_SEED = 0
# Seed offset of the held-out labels' noise (val_noise): a stream apart from the training labels'.
HELD_NOISE_OFFSET = 1_000_003


def default_data_dir() -> Path:
    """``$AGNOSTIC_SAM_DATA`` if set, else ``~/.cache/agnostic-sam/data``."""
    env = os.environ.get("AGNOSTIC_SAM_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agnostic-sam" / "data"


@dataclass(frozen=True)
class DataRequest:
    """What ``build_data`` passes to a builder. ``None`` means "the data set's default"."""

    root: Path
    download: bool = False
    seed: int = 0
    image_size: int | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    train_size: int | None = None
    test_size: int | None = None


@dataclass
class Source:
    """A builder's answer. ``load_test`` is only called when the real test split is wanted."""

    train: Dataset  # training split, samples untransformed (PIL images or tensors)
    train_targets: torch.Tensor  # LongTensor (N,), clean labels of ``train``
    load_test: Callable[[], Dataset]  # opens the test split, samples untransformed
    num_classes: int
    in_channels: int
    image_size: int  # side of the (square) tensors the transforms produce
    train_transform: Callable[[Any], Any] | None = None
    eval_transform: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry. ``files`` names the on-disk layout for the "data not found" message."""

    name: str
    builder: Callable[[DataRequest], Source]
    description: str = ""
    files: str = ""
    # Options of DataRequest this builder reads besides root/download/seed/image_size.
    options: tuple[str, ...] = ()


@dataclass
class DataBundle:
    """The data of one run.

    ``train`` yields ``(float tensor (C, H, W), int label)`` with training augmentation and the
    (possibly noisy) labels ``train_targets``; ``test`` yields eval-transformed samples with
    clean labels (the real test split, or the held-out part when ``val_fraction > 0``).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    train_targets: torch.Tensor  # LongTensor (len(train),), labels used for training
    clean_train_targets: torch.Tensor  # LongTensor (len(train),), before label noise
    noise_rate_realized: float = 0.0
    holdout: bool = False  # True: ``test`` is the held-out part of the training split


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, description: str = "", files: str = "", options: tuple[str, ...] = ()
) -> Callable[[Callable[[DataRequest], Source]], Callable[[DataRequest], Source]]:
    """Decorator adding ``builder(request) -> Source`` to ``DATASETS`` under ``name``."""

    def add(builder: Callable[[DataRequest], Source]) -> Callable[[DataRequest], Source]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetSpec(name, builder, description, files, options)
        return builder

    return add


def list_datasets() -> list[str]:
    """Registered data set names, sorted."""
    return sorted(DATASETS)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (int(value) != value or value < 1):
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _checked_spec(name: str, noise_rate: float, val_fraction: float, train_fraction: float,
                  extra: dict[str, int | None]) -> DatasetSpec:
    """The registry entry of ``name``, after checking ``build_data``'s options against it (one
    line naming the bad value: an unknown name, a rate out of range, an option it does not use)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    spec = DATASETS[name]
    if not 0.0 <= float(noise_rate) < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not 0.0 < float(train_fraction) <= 1.0:
        raise UsageError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    for key, value in extra.items():
        _check_positive(key, value)
        if key != "image_size" and value is not None and key not in spec.options:
            raise UsageError(f"option {key}={value} is not used by dataset {name!r}")
    return spec


def _evaluation_part(source: Source, clean: torch.Tensor, *, val_fraction: float,
                     val_noise: bool, noise_rate: float,
                     seed: int) -> tuple[torch.Tensor | None, torch.Tensor, Dataset]:
    """``(keep, clean, test)``: the indices of the training split left for training (None: all)
    and their clean labels, and the evaluation set: the held-out part when ``val_fraction > 0``
    (its labels noisy under ``val_noise``), else the real test split."""
    if val_noise and not val_fraction > 0:
        raise UsageError("val_noise needs a held-out part: set val_fraction > 0")
    if not val_fraction > 0:
        return None, clean, make_view(source.load_test(), None, source.eval_transform, None)
    keep, held = stratified_holdout(clean, val_fraction, seed=HOLDOUT_SEED)
    held_labels = clean[held]
    if val_noise:
        held_labels, _ = symmetric_label_noise(held_labels, noise_rate, source.num_classes,
                                               seed=seed + HELD_NOISE_OFFSET)
    test = make_view(source.train, held, source.eval_transform, held_labels)
    return keep, clean[keep], test


def _train_subset(keep: torch.Tensor | None, clean: torch.Tensor, train_fraction: float,
                  seed: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A class-stratified ``train_fraction`` of the training part (drawn with ``seed``): its
    indices into the training split and their clean labels; the part as it is at 1."""
    if not train_fraction < 1.0:
        return keep, clean
    base = keep if keep is not None else torch.arange(clean.numel())
    subset, _ = stratified_holdout(clean, 1.0 - train_fraction, seed=seed)
    return base[subset], clean[subset]


def build_data(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    noise_rate: float = 0.0,
    seed: int = 0,
    val_fraction: float = 0.0,
    train_fraction: float = 1.0,
    val_noise: bool = False,
    image_size: int | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
) -> DataBundle:
    """Build the train/test data of data set ``name``.

    Args:
        data_dir: root folder holding the data sets (None: ``default_data_dir()``).
        download: let torchvision fetch missing files (needs a network).
        noise_rate: symmetric label noise p in [0, 1) on the training labels, seeded by ``seed``.
        seed: seeds the label noise and the synthetic data.
        val_fraction: in [0, 1). When > 0, a class-stratified part of the training split chosen
            with seed 0 (the same for every method and seed) becomes ``test`` with eval
            transforms and clean labels; the rest is ``train``, and the real test split is never
            opened. Label noise is applied after this split, to the remaining training part only,
            unless ``val_noise``.
        val_noise: the held-out labels carry the same symmetric noise (rate ``noise_rate``,
            drawn with seed ``seed + HELD_NOISE_OFFSET``, a stream apart from the training
            labels'): a user's validation set is as noisy as their training set.
        train_fraction: in (0, 1]. Below 1, train on a class-stratified subset of that many of
            the (remaining) training examples, drawn with ``seed`` (the same subset for every
            method of a seed: the paper's small-data protocol); label noise is applied after.
        image_size: side of the produced images (None: the data set's native/paper size).
        num_classes, in_channels, train_size, test_size: shape of the ``synthetic`` data set;
            other data sets reject them.
    """
    extra = {"num_classes": num_classes, "in_channels": in_channels,
             "train_size": train_size, "test_size": test_size, "image_size": image_size}
    spec = _checked_spec(name, noise_rate, val_fraction, train_fraction, extra)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    request = DataRequest(root, bool(download), int(seed), image_size, num_classes,
                          in_channels, train_size, test_size)
    source = spec.builder(request)
    clean = torch.as_tensor(source.train_targets, dtype=torch.long)

    keep, clean, test = _evaluation_part(source, clean, val_fraction=val_fraction,
                                         val_noise=val_noise, noise_rate=noise_rate, seed=seed)
    keep, clean = _train_subset(keep, clean, train_fraction, seed)

    noisy, realized = symmetric_label_noise(clean, noise_rate, source.num_classes, seed=seed)
    train = make_view(source.train, keep, source.train_transform, noisy)
    return DataBundle(
        name=name, train=train, test=test, num_classes=source.num_classes,
        in_channels=source.in_channels, image_size=source.image_size, train_targets=noisy,
        clean_train_targets=clean, noise_rate_realized=realized, holdout=val_fraction > 0,
    )
