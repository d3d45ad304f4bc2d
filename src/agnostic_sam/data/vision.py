"""Image data sets read with torchvision: CIFAR-10/100, the paper's small fine-grained sets and a
user's ImageFolder tree.

Checksums: torchvision's CIFAR and Flowers102 classes compare the md5 sum of every file at each
construction. We subclass them so that construction only checks that the files are present
(``_check_integrity`` / ``_load_meta`` overridden), which lets the same code read the tiny files
the tests write in the real formats. Downloads still verify: with ``download=True`` torchvision
checks the md5 of every archive it fetches. The other loaders (pets, aircraft, cars,
ImageFolder) never check sums.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tvd

from agnostic_sam.data.registry import DataRequest, Source, register_dataset
from agnostic_sam.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_transforms,
    small_data_transforms,
)
from agnostic_sam.errors import UsageError

__all__ = ["CIFAR10Files", "CIFAR100Files", "Flowers102Files", "open_dataset"]

D = TypeVar("D")


class _PresenceCheckMixin:
    """CIFAR: check that the batch and meta files exist instead of hashing them."""

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(folder, f)) for f in names)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10Files(_PresenceCheckMixin, tvd.CIFAR10):
    """torchvision CIFAR10 without per-load md5 sums (see the module docstring)."""


class CIFAR100Files(_PresenceCheckMixin, tvd.CIFAR100):
    """torchvision CIFAR100 without per-load md5 sums (see the module docstring)."""


class Flowers102Files(tvd.Flowers102):
    """torchvision Flowers102 checking presence of ``jpg/`` and the two .mat files, not md5."""

    def _check_integrity(self) -> bool:
        return self._images_folder.is_dir() and all(
            (self._base_folder / name).is_file()
            for key, (name, _) in self._file_dict.items() if key != "image"
        )


def open_dataset(name: str, req: DataRequest, files: str, factory: Callable[[], D],
                 downloadable: bool = True) -> D:
    """Run ``factory()``; turn torchvision's "not found"/download errors into one-line
    UsageErrors."""
    try:
        return factory()
    except (RuntimeError, FileNotFoundError) as exc:
        hint = ("pass --download to fetch it where a network exists" if not req.download
                else "the download did not provide them "
                     f"({str(exc).splitlines()[0] if str(exc) else exc!r})")
        if not downloadable:
            hint = "it cannot be downloaded automatically: place the files there by hand"
        raise UsageError(f"dataset {name!r} not found under {req.root}: "
                         f"expected {files}; {hint}") from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise UsageError(f"dataset {name!r} under {req.root} cannot be read ({exc}); "
                         f"expected {files}; delete the files and fetch them again") from exc
    except OSError as exc:  # urllib errors when downloading without a network
        raise UsageError(f"could not download dataset {name!r} into {req.root}: {exc}") from exc


def _targets(ds: Any) -> torch.Tensor:
    """Labels of a torchvision data set without decoding its images."""
    if hasattr(ds, "targets"):  # CIFAR, ImageFolder
        return torch.as_tensor(ds.targets, dtype=torch.long)
    if hasattr(ds, "_labels"):  # Flowers102, FGVCAircraft, OxfordIIITPet
        return torch.as_tensor(ds._labels, dtype=torch.long)
    if hasattr(ds, "_samples"):  # StanfordCars: list of (path, label)
        return torch.as_tensor([label for _, label in ds._samples], dtype=torch.long)
    raise TypeError(f"cannot read the labels of {type(ds).__name__}")


def _cifar(name: str, cls: type, mean: tuple, std: tuple, num_classes: int, files: str,
           req: DataRequest) -> Source:
    size = req.image_size or 32
    train_tf, eval_tf = cifar_transforms(mean, std, size)
    train = open_dataset(name, req, files,
                         lambda: cls(str(req.root), train=True, download=req.download))
    return Source(
        train=train, train_targets=_targets(train),
        load_test=lambda: open_dataset(name, req, files, lambda: cls(str(req.root), train=False)),
        num_classes=num_classes, in_channels=3, image_size=size,
        train_transform=train_tf, eval_transform=eval_tf,
    )


CIFAR10_FILES = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
CIFAR100_FILES = "cifar-100-python/{train, test, meta}"


@register_dataset("cifar10", description="CIFAR-10, 32x32 RGB, 10 classes, 50k/10k",
                  files=CIFAR10_FILES)
def build_cifar10(req: DataRequest) -> Source:
    return _cifar("cifar10", CIFAR10Files, CIFAR10_MEAN, CIFAR10_STD, 10, CIFAR10_FILES, req)


@register_dataset("cifar100", description="CIFAR-100, 32x32 RGB, 100 classes, 50k/10k",
                  files=CIFAR100_FILES)
def build_cifar100(req: DataRequest) -> Source:
    return _cifar("cifar100", CIFAR100Files, CIFAR100_MEAN, CIFAR100_STD, 100, CIFAR100_FILES, req)


def _small(name: str, files: str, num_classes: int, req: DataRequest,
           open_train: Callable[[], Dataset], open_test: Callable[[], Dataset],
           downloadable: bool = True) -> Source:
    """A paper small data set (Section 4.2): 224x224 augmentations, ImageNet normalisation."""
    size = req.image_size or 224
    train_tf, eval_tf = small_data_transforms(size)
    train = open_dataset(name, req, files, open_train, downloadable)
    return Source(
        train=train, train_targets=_concat_targets(train),
        load_test=lambda: open_dataset(name, req, files, open_test, downloadable),
        num_classes=num_classes, in_channels=3, image_size=size,
        train_transform=train_tf, eval_transform=eval_tf,
    )


def _concat_targets(ds: Dataset) -> torch.Tensor:
    if isinstance(ds, ConcatDataset):
        return torch.cat([_targets(part) for part in ds.datasets])
    return _targets(ds)


FLOWERS_FILES = "flowers-102/{jpg/, imagelabels.mat, setid.mat}"


@register_dataset("flowers102", description="Oxford Flowers-102 (train+val / test), 102 classes",
                  files=FLOWERS_FILES)
def build_flowers102(req: DataRequest) -> Source:
    """Training on the train and val splits together (1020 + 1020 images), testing on test
    (6149)."""
    root, dl = str(req.root), req.download
    return _small(
        "flowers102", FLOWERS_FILES, 102, req,
        lambda: ConcatDataset([Flowers102Files(root, split="train", download=dl),
                               Flowers102Files(root, split="val")]),
        lambda: Flowers102Files(root, split="test"),
    )


CARS_FILES = ("stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
              "cars_test/, cars_test_annos_withlabels.mat}")


@register_dataset("stanford_cars", description="Stanford Cars, 196 classes, 8144/8041",
                  files=CARS_FILES)
def build_stanford_cars(req: DataRequest) -> Source:
    root = str(req.root)
    # torchvision's StanfordCars.download() raises ValueError (dead URL): never ask it to.
    return _small("stanford_cars", CARS_FILES, 196, req,
                  lambda: tvd.StanfordCars(root, split="train"),
                  lambda: tvd.StanfordCars(root, split="test"), downloadable=False)


AIRCRAFT_FILES = ("fgvc-aircraft-2013b/data/{images/, variants.txt, "
                  "images_variant_trainval.txt, images_variant_test.txt}")


@register_dataset("fgvc_aircraft",
                  description="FGVC-Aircraft variants (trainval / test), 100 classes",
                  files=AIRCRAFT_FILES)
def build_fgvc_aircraft(req: DataRequest) -> Source:
    root, dl = str(req.root), req.download
    return _small("fgvc_aircraft", AIRCRAFT_FILES, 100, req,
                  lambda: tvd.FGVCAircraft(root, split="trainval", download=dl),
                  lambda: tvd.FGVCAircraft(root, split="test"))


PETS_FILES = "oxford-iiit-pet/{images/*.jpg, annotations/trainval.txt, annotations/test.txt}"


@register_dataset("oxford_pets", description="Oxford-IIIT Pets (trainval / test), 37 classes",
                  files=PETS_FILES)
def build_oxford_pets(req: DataRequest) -> Source:
    root, dl = str(req.root), req.download
    return _small("oxford_pets", PETS_FILES, 37, req,
                  lambda: tvd.OxfordIIITPet(root, split="trainval", download=dl),
                  lambda: tvd.OxfordIIITPet(root, split="test"))


class _FolderWithClasses(tvd.ImageFolder):
    """ImageFolder whose class list is given (the train folder's), not read from its own root."""

    def __init__(self, root: str, class_to_idx: dict[str, int]) -> None:
        self._given = class_to_idx
        super().__init__(root, allow_empty=True)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        extra = sorted(e.name for e in os.scandir(directory)
                       if e.is_dir() and e.name not in self._given)
        if extra:
            raise UsageError(f"{directory} has class folders missing from train/: "
                             f"{', '.join(extra)}")
        return sorted(self._given, key=self._given.__getitem__), dict(self._given)


IMAGEFOLDER_FILES = "train/<class>/<images> and test/<class>/<images> (your own images)"


@register_dataset("imagefolder",
                  description="your images: <data_dir>/train/<class>/*, "
                              "<data_dir>/test/<class>/*",
                  files=IMAGEFOLDER_FILES)
def build_imagefolder(req: DataRequest) -> Source:
    """``data_dir/train`` and ``data_dir/test`` class trees; class indices from ``train/``
    (sorted)."""
    size = req.image_size or 224
    train_tf, eval_tf = small_data_transforms(size)
    train_dir, test_dir = Path(req.root) / "train", Path(req.root) / "test"
    missing = [str(d) for d in (train_dir, test_dir) if not d.is_dir()]
    if missing:
        raise UsageError(f"dataset 'imagefolder' needs the folders {' and '.join(missing)} "
                         f"(layout: {IMAGEFOLDER_FILES})")
    train = open_dataset("imagefolder", req, IMAGEFOLDER_FILES,
                         lambda: tvd.ImageFolder(str(train_dir)))
    return Source(
        train=train, train_targets=_targets(train),
        load_test=lambda: open_dataset(
            "imagefolder", req, IMAGEFOLDER_FILES,
            lambda: _FolderWithClasses(str(test_dir), train.class_to_idx)),
        num_classes=len(train.classes), in_channels=3, image_size=size,
        train_transform=train_tf, eval_transform=eval_tf,
    )
