"""TrainConfig: defaults < YAML < flags, rejection of unknown keys / bad types / bad values."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from agnostic_sam.cli.train import add_train_arguments, config_from_args
from agnostic_sam.errors import UsageError
from agnostic_sam.train.config import TrainConfig, load_config, save_config
from agnostic_sam.train.rundir import IDENTITY_FIELDS as RESULT_FIELDS

INTERFACE_FIELDS = [
    "dataset", "data_dir", "download", "model", "weights", "optimizer", "epochs", "batch_size",
    "lr", "momentum", "weight_decay", "nesterov", "label_smoothing", "rho", "rho1", "rho2",
    "adaptive", "split_ratio", "split", "noise_rate", "val_fraction", "seed", "device", "workers",
    "threads", "out", "resume", "amp", "compile", "channels_last", "check_finite", "perturbation",
    "sync_bn", "accumulate", "image_size", "num_classes", "train_size", "test_size", "max_steps",
    "progress",
    # 0.2: base optimizer settings, warm-up, clipping, loggers, the small-data subset
    "base_optimizer", "betas", "adam_eps", "warmup_epochs", "max_grad_norm", "log",
    "train_fraction",
    # 0.3: the method's own settings (checked against its registry record)
    "method_args",
    # 0.3: the compute budget (issue 20)
    "budget", "budget_reference",
    # 0.3: a held-out part as noisy as the training labels (the family study's tuning)
    "val_noise",
]


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_fields_match_the_shared_interface():
    assert sorted(f.name for f in dataclasses.fields(TrainConfig)) == sorted(INTERFACE_FIELDS)
    defaults = TrainConfig()
    assert (defaults.dataset, defaults.model, defaults.optimizer) == (
        "digits", "mlp", "agnostic-sam")
    assert (defaults.split_ratio, defaults.split, defaults.amp) == (0.7, "batch", "none")


def test_precedence_defaults_yaml_flags(tmp_path):
    path = write_yaml(tmp_path, {"lr": 0.2, "epochs": 7, "rho1": 0.3, "nesterov": True})
    cfg = parse(["--config", path, "--lr", "0.01", "--batch-size", "32"])
    assert cfg.lr == 0.01  # flag beats YAML
    assert cfg.epochs == 7 and cfg.rho1 == 0.3 and cfg.nesterov is True  # YAML beats defaults
    assert cfg.batch_size == 32  # flag beats default
    assert cfg.momentum == TrainConfig().momentum  # untouched default
    # A boolean flag not given keeps the YAML value; --no-X turns it off.
    assert parse(["--config", path, "--no-nesterov"]).nesterov is False


def test_negative_flags_and_out_default():
    cfg = parse(["--no-check-finite", "--no-progress", "--optimizer", "sam", "--seed", "3"])
    assert cfg.check_finite is False and cfg.progress is False
    assert cfg.out.endswith("digits-mlp-sam-seed3")
    full = parse([])
    assert full.check_finite is True and full.progress is True


def test_yaml_types_are_coerced_or_rejected(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; float fields accept it. ints are fine for floats.
    cfg = load_config(write_yaml(tmp_path, {"lr": "1e-3", "weight_decay": 0}), {})
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.weight_decay, float)
    with pytest.raises(UsageError, match="'epochs'"):
        load_config(write_yaml(tmp_path, {"epochs": 2.5}), {})
    with pytest.raises(UsageError, match="'nesterov'"):
        load_config(write_yaml(tmp_path, {"nesterov": "yes please"}), {})
    with pytest.raises(UsageError, match="'batch_size'"):
        load_config(write_yaml(tmp_path, {"batch_size": True}), {})
    with pytest.raises(UsageError, match="'model'"):
        load_config(write_yaml(tmp_path, {"model": None}), {})


def test_unknown_keys_and_bad_files(tmp_path):
    with pytest.raises(UsageError, match="unknown config key 'learning_rate'"):
        load_config(write_yaml(tmp_path, {"learning_rate": 0.1}), {})
    with pytest.raises(UsageError, match="unknown config key 'bogus'"):
        load_config(None, {"bogus": 1})
    with pytest.raises(UsageError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(bad, {})
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_config(bad, {})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"rho": -0.1}, "rho must be a radius"),
        ({"rho1": -1.0}, "rho1"),
        ({"rho2": -0.01}, "rho2"),
        ({"split_ratio": 0.0}, "split_ratio"),
        ({"split_ratio": 1.0}, "split_ratio"),
        ({"noise_rate": 1.0}, "noise_rate"),
        ({"noise_rate": -0.1}, "noise_rate"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "too small to split"),
        ({"batch_size": 3, "split_ratio": 0.9}, "too small to split"),
        ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
        ({"split": "random"}, "unknown split 'random'"),
        ({"amp": "fp8"}, "unknown amp mode 'fp8'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"perturbation": "global"}, "unknown perturbation"),
        ({"lr": 0.0}, "lr"),
        ({"accumulate": 0}, "accumulate"),
        ({"batch_size": 8, "accumulate": 3}, "accumulate 3 exceeds"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_values_raise_one_line(overrides, needle):
    with pytest.raises(UsageError, match=needle) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_small_batch_is_fine_without_a_split():
    # SAM and SGD use the whole batch: |B| = 1 is legal for them.
    assert load_config(None, {"optimizer": "sgd", "batch_size": 1}).batch_size == 1


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, {"lr": 0.3, "max_steps": 5, "out": str(tmp_path / "run")})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", {}) == cfg
    assert "out" not in RESULT_FIELDS and "lr" in RESULT_FIELDS


def test_resume_uses_the_saved_config_as_base(tmp_path):
    run = tmp_path / "run"
    saved = load_config(None, {"lr": 0.3, "epochs": 4, "out": str(run)})
    save_config(saved, run / "config.yaml")
    cfg = parse(["--out", str(run), "--resume"])
    assert (cfg.lr, cfg.epochs, cfg.resume) == (0.3, 4, True)
    # A flag given on the command line still wins (and train() then rejects a mismatch).
    assert parse(["--out", str(run), "--resume", "--lr", "0.1"]).lr == 0.1


def test_synthetic_shape_options_only_for_synthetic():
    cfg = parse(["--dataset", "synthetic", "--num-classes", "7", "--train-size", "64"])
    assert (cfg.num_classes, cfg.train_size, cfg.test_size) == (7, 64, None)
    with pytest.raises(UsageError, match="synthetic data set only"):
        parse(["--dataset", "digits", "--num-classes", "7"])
