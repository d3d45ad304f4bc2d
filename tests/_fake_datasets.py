"""Tiny data sets written in the real on-disk formats that torchvision's loaders read.

Each writer returns the labels it wrote so tests can compare them with what the loaders give.
Images are a few pixels of deterministic noise; JPEG files are tiny.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _jpeg(path: Path, rng: np.random.Generator, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/data_batch_1..5, test_batch (pickled dicts), batches.meta."""
    rng, folder = _rng(seed), root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # rows: R, G, B planes
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f)
        out[name] = (data, np.array(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return out


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 8, seed: int = 0) -> dict:
    """cifar-100-python/train, test (fine and coarse labels), meta."""
    rng, folder = _rng(seed), root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"data": data, "fine_labels": fine, "coarse_labels": [x // 5 for x in fine]}, f
            )
        out[name] = (data, np.array(fine))
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    return out


PET_BREEDS = ["Abyssinian", "american_bulldog", "Bengal"]


def write_oxford_pets(root: Path, per_class: int = 4, seed: int = 0) -> dict[str, list[int]]:
    """oxford-iiit-pet/images/<Breed>_<k>.jpg and annotations/{trainval,test}.txt.

    An annotation line is ``<image id> <class 1..37> <species 1..2> <breed id>``; the first half
    of each breed's images is trainval, the rest test.
    """
    rng, base = _rng(seed), root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    labels: dict[str, list[int]] = {"trainval": [], "test": []}
    for cls, breed in enumerate(PET_BREEDS):
        for k in range(1, per_class + 1):
            _jpeg(base / "images" / f"{breed}_{k}.jpg", rng)
            split = "trainval" if k <= per_class // 2 else "test"
            lines[split].append(f"{breed}_{k} {cls + 1} {1 + cls % 2} {k}")
            labels[split].append(cls)
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return labels


def write_flowers102(root: Path, seed: int = 0) -> dict[str, list[int]]:
    """flowers-102/jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat."""
    from scipy.io import savemat

    rng, base = _rng(seed), root / "flowers-102"
    n = 12
    labels = rng.integers(1, 103, n)  # 1-based class per image id 1..n
    for image_id in range(1, n + 1):
        _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", rng)
    ids = {"trnid": [1, 2, 3, 4], "valid": [5, 6, 7], "tstid": [8, 9, 10, 11, 12]}
    savemat(base / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    savemat(base / "setid.mat", {k: np.array(v).reshape(1, -1) for k, v in ids.items()})
    return {split: [int(labels[i - 1]) - 1 for i in v] for split, v in ids.items()}


def write_fgvc_aircraft(root: Path, seed: int = 0) -> dict[str, list[int]]:
    """fgvc-aircraft-2013b/data/{variants.txt, images_variant_{trainval,test}.txt, images/}."""
    rng, data = _rng(seed), root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A320", "Cessna 172"]  # names may contain spaces
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    labels: dict[str, list[int]] = {}
    image_id = 1000000
    for split, n in (("trainval", 6), ("test", 3)):
        rows, labels[split] = [], []
        for i in range(n):
            image_id += 1
            _jpeg(data / "images" / f"{image_id}.jpg", rng)
            rows.append(f"{image_id} {variants[i % 3]}")
            labels[split].append(i % 3)
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    return labels


def write_stanford_cars(root: Path, seed: int = 0) -> dict[str, list[int]]:
    """stanford_cars/devkit/{cars_meta.mat, cars_train_annos.mat}, cars_train/, cars_test/,
    cars_test_annos_withlabels.mat (struct arrays with ``fname`` and 1-based ``class``)."""
    from scipy.io import savemat

    rng, base = _rng(seed), root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat",
            {"class_names": np.array([["AM General Hummer"], ["Acura RL"], ["BMW M3"]],
                                     dtype=object).T})
    labels: dict[str, list[int]] = {}
    annos = {"train": base / "devkit" / "cars_train_annos.mat",
             "test": base / "cars_test_annos_withlabels.mat"}
    for split, n in (("train", 5), ("test", 3)):
        records = np.zeros((1, n), dtype=[("fname", "O"), ("class", "O")])
        labels[split] = []
        for i in range(n):
            fname = f"{i + 1:05d}.jpg"
            _jpeg(base / f"cars_{split}" / fname, rng)
            records[0, i] = (fname, np.array([[i % 3 + 1]], dtype=np.uint8))
            labels[split].append(i % 3)
        savemat(annos[split], {"annotations": records})
    return labels


def write_imagefolder(root: Path, train: dict[str, int], test: dict[str, int],
                      seed: int = 0) -> None:
    """root/train/<class>/<k>.jpg and root/test/<class>/<k>.jpg with the given counts per class."""
    rng = _rng(seed)
    for split, counts in (("train", train), ("test", test)):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                _jpeg(root / split / cls / f"{k}.jpg", rng)
