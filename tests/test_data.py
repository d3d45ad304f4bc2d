"""Data registry: in-memory sets, the torchvision loaders on tiny real-format files, held-out
validation, label noise reaching the data, and the "data not found" message."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import _fake_datasets as fake
from agnostic_sam.data import DATASETS, LabeledView, build_data, default_data_dir, list_datasets
from agnostic_sam.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from agnostic_sam.errors import UsageError


def _labels_of(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


# --- in-memory data sets -------------------------------------------------------------------


def test_digits_fixed_split_sizes_shapes_and_standardisation() -> None:
    b = build_data("digits")
    assert (len(b.train), len(b.test)) == (1437, 360)
    assert isinstance(b.train, TensorDataset) and isinstance(b.test, TensorDataset)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 8)
    x, y = b.train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, abs=1e-4)
    # stratified: every class has 35-37 test images (360 / 10 with sklearn's rounding)
    assert torch.bincount(b.test.tensors[1]).min() >= 35
    assert torch.equal(b.train_targets, y) and b.noise_rate_realized == 0.0


def test_digits_split_does_not_depend_on_the_run_seed() -> None:
    a, b = build_data("digits", seed=0), build_data("digits", seed=7)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])


def test_digits_image_size_resizes() -> None:
    b = build_data("digits", image_size=16)
    assert b.train[0][0].shape == (1, 16, 16) and b.image_size == 16


def test_synthetic_is_deterministic_by_seed_and_shaped_by_options() -> None:
    a = build_data("synthetic", seed=3, num_classes=102, in_channels=2, image_size=12,
                   train_size=40, test_size=10)
    b = build_data("synthetic", seed=3, num_classes=102, in_channels=2, image_size=12,
                   train_size=40, test_size=10)
    c = build_data("synthetic", seed=4, num_classes=102, in_channels=2, image_size=12,
                   train_size=40, test_size=10)
    assert a.train.tensors[0].shape == (40, 2, 12, 12) and len(a.test) == 10
    assert (a.num_classes, a.in_channels, a.image_size) == (102, 2, 12)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert a.train.tensors[1].max() < 102


def test_synthetic_defaults() -> None:
    b = build_data("synthetic")
    assert (len(b.train), len(b.test)) == (512, 256)
    assert b.train[0][0].shape == (3, 32, 32) and b.num_classes == 10


def test_registry_lists_the_paper_data_sets() -> None:
    expected = {"digits", "synthetic", "cifar10", "cifar100", "flowers102", "stanford_cars",
                "fgvc_aircraft", "oxford_pets", "imagefolder"}
    assert expected <= set(list_datasets()) and set(list_datasets()) == set(DATASETS)


def test_unknown_dataset_and_unused_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown dataset 'mnist'.*digits"):
        build_data("mnist")
    with pytest.raises(UsageError, match="num_classes=5 is not used by dataset 'digits'"):
        build_data("digits", num_classes=5)
    with pytest.raises(UsageError, match="train_size must be a positive integer"):
        build_data("synthetic", train_size=0)
    with pytest.raises(ValueError, match="noise_rate.*1.2"):
        build_data("digits", noise_rate=1.2)


def test_default_data_dir_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGNOSTIC_SAM_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("AGNOSTIC_SAM_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "agnostic-sam" / "data"


# --- label noise and held-out validation on the in-memory path -------------------------------


def test_noise_reaches_the_training_tensors_and_not_the_test_set() -> None:
    clean = build_data("digits")
    b = build_data("digits", noise_rate=0.4, seed=1)
    assert isinstance(b.train, TensorDataset)
    assert torch.equal(b.train.tensors[1], b.train_targets)
    assert int((b.train_targets != clean.train_targets).sum()) == round(0.4 * 1437)
    assert torch.equal(b.clean_train_targets, clean.train_targets)
    assert b.noise_rate_realized == pytest.approx(round(0.4 * 1437) / 1437)
    assert torch.equal(b.test.tensors[1], clean.test.tensors[1])


def test_holdout_is_stratified_disjoint_clean_and_the_same_for_every_seed() -> None:
    a = build_data("digits", val_fraction=0.2, noise_rate=0.3, seed=0)
    b = build_data("digits", val_fraction=0.2, noise_rate=0.3, seed=5)
    assert a.holdout and len(a.train) + len(a.test) == 1437 and len(a.test) == 288
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])  # same held-out for all seeds
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train_targets, b.train_targets)  # noise follows the seed
    # disjoint: no held-out image is a training image
    train_rows = {tuple(r.tolist()) for r in a.train.tensors[0].flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in a.test.tensors[0].flatten(1))
    # held-out labels are clean: they agree with the original labels of those images
    full = build_data("digits")
    index = {tuple(r.tolist()): int(y)
             for r, y in zip(full.train.tensors[0].flatten(1), full.train.tensors[1])}
    assert ([index[tuple(r.tolist())] for r in a.test.tensors[0].flatten(1)]
            == a.test.tensors[1].tolist())
    assert torch.bincount(a.test.tensors[1]).min() >= 28  # stratified: ~28.8 per class
    assert int((a.train_targets != a.clean_train_targets).sum()) == round(0.3 * len(a.train))


# --- torchvision loaders on tiny files in the real formats ----------------------------------


def test_cifar10_reads_pickled_batches_with_eval_normalisation(tmp_path: Path) -> None:
    written = fake.write_cifar10(tmp_path)
    b = build_data("cifar10", data_dir=tmp_path)
    assert (len(b.train), len(b.test), b.num_classes, b.image_size) == (30, 6, 10, 32)
    train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert b.train_targets.tolist() == train_labels.tolist() == _labels_of(b.train)
    data, labels = written["test_batch"]
    x, y = b.test[2]
    expected = torch.as_tensor(data[2], dtype=torch.float32).view(3, 32, 32) / 255
    expected = ((expected - torch.tensor(CIFAR10_MEAN).view(3, 1, 1))
                / torch.tensor(CIFAR10_STD).view(3, 1, 1))
    assert y == labels[2] and torch.allclose(x, expected, atol=1e-5)
    # the training transform is random (crop with padding, flip)
    torch.manual_seed(0)
    draws = torch.stack([b.train[0][0] for _ in range(8)])
    assert draws.shape == (8, 3, 32, 32)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    written = fake.write_cifar100(tmp_path)
    b = build_data("cifar100", data_dir=tmp_path)
    assert b.num_classes == 100
    assert b.train_targets.tolist() == written["train"][1].tolist()
    assert _labels_of(b.test) == written["test"][1].tolist()


def test_noise_on_a_torchvision_set_goes_through_the_label_override(tmp_path: Path) -> None:
    fake.write_cifar10(tmp_path, per_batch=20)
    b = build_data("cifar10", data_dir=tmp_path, noise_rate=0.5, seed=2)
    assert isinstance(b.train, LabeledView)
    assert _labels_of(b.train) == b.train_targets.tolist()
    assert int((b.train_targets != b.clean_train_targets).sum()) == 50


def test_holdout_never_opens_the_test_split(tmp_path: Path) -> None:
    fake.write_cifar10(tmp_path, per_batch=20)
    # A corrupt test batch: unpickling it would fail, so building must not read it.
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    b = build_data("cifar10", data_dir=tmp_path, val_fraction=0.1)
    assert (len(b.train), len(b.test)) == (90, 10)
    x1, y1 = b.test[0]
    x2, y2 = b.test[0]
    assert torch.equal(x1, x2) and y1 == y2  # eval transform: deterministic
    with pytest.raises(UsageError, match="cannot be read"):  # the real test split is unreadable
        build_data("cifar10", data_dir=tmp_path)


def test_oxford_pets_trainval_test_at_a_given_image_size(tmp_path: Path) -> None:
    labels = fake.write_oxford_pets(tmp_path)
    b = build_data("oxford_pets", data_dir=tmp_path, image_size=24)
    assert b.num_classes == 37 and b.image_size == 24
    assert b.train_targets.tolist() == labels["trainval"]
    x, y = b.test[1]
    assert x.shape == (3, 24, 24) and y == labels["test"][1]
    assert b.train[0][0].shape == (3, 24, 24)


def test_flowers102_trains_on_train_plus_val(tmp_path: Path) -> None:
    labels = fake.write_flowers102(tmp_path)
    b = build_data("flowers102", data_dir=tmp_path, image_size=16)
    assert b.train_targets.tolist() == labels["trnid"] + labels["valid"] == _labels_of(b.train)
    assert _labels_of(b.test) == labels["tstid"] and b.num_classes == 102


def test_fgvc_aircraft_and_stanford_cars(tmp_path: Path) -> None:
    air, cars = fake.write_fgvc_aircraft(tmp_path), fake.write_stanford_cars(tmp_path)
    a = build_data("fgvc_aircraft", data_dir=tmp_path, image_size=16)
    assert a.train_targets.tolist() == air["trainval"] and _labels_of(a.test) == air["test"]
    c = build_data("stanford_cars", data_dir=tmp_path, image_size=16)
    assert c.train_targets.tolist() == cars["train"] and _labels_of(c.test) == cars["test"]
    assert c.train[0][0].shape == (3, 16, 16) and (a.num_classes, c.num_classes) == (100, 196)


def test_imagefolder_takes_classes_from_train(tmp_path: Path) -> None:
    fake.write_imagefolder(tmp_path, train={"cat": 2, "dog": 3, "eel": 1},
                           test={"dog": 2, "eel": 1})
    b = build_data("imagefolder", data_dir=tmp_path, image_size=16)
    assert b.num_classes == 3 and b.train_targets.tolist() == [0, 0, 1, 1, 1, 2]
    assert _labels_of(b.test) == [1, 1, 2]  # indices of train/'s classes, not test/'s
    fake.write_imagefolder(tmp_path, train={}, test={"fox": 1})
    with pytest.raises(UsageError, match="fox"):
        build_data("imagefolder", data_dir=tmp_path)


# --- missing data ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "files"), [("cifar10", "cifar-10-batches-py"),
                                             ("cifar100", "cifar-100-python"),
                                             ("oxford_pets", "annotations/trainval.txt"),
                                             ("flowers102", "setid.mat"),
                                             ("fgvc_aircraft", "fgvc-aircraft-2013b")])
def test_missing_data_is_one_line_naming_folder_files_and_download(
    tmp_path: Path, name: str, files: str
) -> None:
    with pytest.raises(UsageError) as info:
        build_data(name, data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert files in message and "--download" in message


def test_missing_stanford_cars_says_it_cannot_be_downloaded(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot be downloaded.*by hand"):
        build_data("stanford_cars", data_dir=tmp_path)


def test_missing_imagefolder_names_the_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError, match=f"{tmp_path / 'test'}"):
        build_data("imagefolder", data_dir=tmp_path)
    shutil.rmtree(tmp_path / "train")


def test_val_noise_flips_the_held_out_labels_at_the_training_rate():
    from agnostic_sam.data import build_data

    clean = build_data("digits", val_fraction=0.1, noise_rate=0.4, seed=3)
    noisy = build_data("digits", val_fraction=0.1, noise_rate=0.4, seed=3, val_noise=True)
    y_clean, y_noisy = clean.test.tensors[1], noisy.test.tensors[1]
    flipped = (y_clean != y_noisy).float().mean().item()
    assert 0.3 < flipped < 0.5  # 144 held-out labels, 40% flipped (symmetric: never to itself)
    assert torch.equal(clean.train_targets, noisy.train_targets)  # training labels unchanged
    assert torch.equal(clean.test.tensors[0], noisy.test.tensors[0])  # the same images
