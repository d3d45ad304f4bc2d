"""One typed config per run: defaults < YAML file < command-line flags.

`TrainConfig` is the single source of truth for a training run; it is saved next to the results as
`config.yaml`, and a resumed run must agree with it on every field in `RESULT_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agnostic_sam.errors import UsageError

__all__ = [
    "TrainConfig",
    "OPTIMIZERS",
    "AGNOSTIC_OPTIMIZERS",
    "RESULT_FIELDS",
    "load_config",
    "validate_config",
    "config_to_dict",
    "save_config",
    "split_sizes",
]

# Optimizer names accepted by `--optimizer`; the Agnostic-SAM family splits each batch into B^t/B^v.
OPTIMIZERS = ("sgd", "sam", "agnostic-sam", "agnostic-sam-simpler")
AGNOSTIC_OPTIMIZERS = ("agnostic-sam", "agnostic-sam-simpler")
SPLITS = ("batch", "fixed")
AMP_MODES = ("none", "bf16", "fp16")
PERTURBATIONS = ("local", "synced")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults suit the `digits` demo (a few seconds on CPU)."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    noise_rate: float = 0.0  # fraction of training labels flipped (symmetric noise), in [0, 1)
    val_fraction: float = 0.0  # > 0: evaluate on a held-out part of the training set, never on test
    image_size: int | None = None  # None: the data set's native size
    # `synthetic` only (smoke runs and benchmarks shaped like a real data set); None: its defaults
    num_classes: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    # model
    model: str = "mlp"
    weights: str | None = None  # pretrained weights file for load_pretrained
    # optimizer: base SGD settings shared by every method
    optimizer: str = "agnostic-sam"
    epochs: int = 30
    batch_size: int = 64  # |B| = |B^t| + |B^v| for the Agnostic-SAM family
    lr: float = 0.05  # peak learning rate of the per-step cosine schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    # sharpness radii: SAM uses rho; Agnostic-SAM uses rho1 (B^t ascent) and rho2 (B^v ascent)
    rho: float = 0.05
    rho1: float = 0.1
    rho2: float = 0.05
    adaptive: bool = False  # ASAM-style scale-invariant radius
    split_ratio: float = 0.7  # r = |B^t| / |B|
    split: str = "batch"  # "batch": split each mini-batch; "fixed": split the training set once
    # run
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    threads: int | None = None
    out: str | None = None  # None: runs/<dataset>-<model>-<optimizer>-seed<seed>
    resume: bool = False
    amp: str = "none"
    compile: bool = False
    channels_last: bool = False
    check_finite: bool = True
    perturbation: str = "local"
    sync_bn: bool = False
    accumulate: int = 1  # micro-batches per closure call
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    progress: bool = True


# Fields that do not change the numbers a run produces; every other field must match on --resume.
_NON_RESULT_FIELDS = {"data_dir", "download", "threads", "out", "resume", "progress"}
RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _NON_RESULT_FIELDS)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's annotation; ints are accepted for floats.

    Strings such as "1e-3" are accepted for float fields because PyYAML reads exponent notation
    without a dot as a string.
    """
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UsageError(f"config key '{key}' must not be empty (null)")
    if bool in allowed:
        if isinstance(value, bool):
            return value
    elif int in allowed:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif float in allowed:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif str in allowed:
        if isinstance(value, str):
            return value
    names = "/".join(t.__name__ for t in allowed if t is not type(None))
    raise UsageError(f"config key '{key}' must be {names}, got {value!r}")


def split_sizes(batch_size: int, ratio: float) -> tuple[int, int]:
    """(|B^t|, |B^v|) for one batch: |B^t| = round(r |B|), |B^v| = |B| - |B^t|."""
    n_t = int(round(ratio * batch_size))
    return n_t, batch_size - n_t


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Raise UsageError (one line, naming the key and value) for values no run can use."""
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{cfg.optimizer}'; choose from {', '.join(OPTIMIZERS)}")
    if cfg.split not in SPLITS:
        raise UsageError(f"unknown split '{cfg.split}'; choose from {', '.join(SPLITS)}")
    if cfg.amp not in AMP_MODES:
        raise UsageError(f"unknown amp mode '{cfg.amp}'; choose from {', '.join(AMP_MODES)}")
    if cfg.perturbation not in PERTURBATIONS:
        raise UsageError(f"unknown perturbation '{cfg.perturbation}'; choose from {', '.join(PERTURBATIONS)}")
    if not _DEVICE_RE.match(cfg.device):
        raise UsageError(f"unknown device '{cfg.device}'; use auto, cpu, cuda, cuda:N or mps")
    for key in ("rho", "rho1", "rho2"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{key} must be a radius >= 0, got {value}")
    if not (0.0 < cfg.split_ratio < 1.0):
        raise UsageError(f"split_ratio must be in (0, 1), got {cfg.split_ratio}")
    if not (0.0 <= cfg.noise_rate < 1.0):
        raise UsageError(f"noise_rate must be in [0, 1), got {cfg.noise_rate}")
    if not (0.0 <= cfg.val_fraction < 1.0):
        raise UsageError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if not (0.0 <= cfg.label_smoothing < 1.0):
        raise UsageError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.epochs < 1:
        raise UsageError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"lr must be > 0, got {cfg.lr}")
    if not (0.0 <= cfg.momentum < 1.0):
        raise UsageError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.nesterov and cfg.momentum == 0:
        raise UsageError("nesterov needs momentum > 0, got momentum 0")
    if cfg.weight_decay < 0:
        raise UsageError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.workers < 0:
        raise UsageError(f"workers must be >= 0, got {cfg.workers}")
    for key in ("threads", "max_steps", "image_size", "num_classes", "train_size", "test_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UsageError(f"{key} must be >= 1, got {value}")
    if cfg.dataset != "synthetic":
        for key in ("num_classes", "train_size", "test_size"):
            if getattr(cfg, key) is not None:
                raise UsageError(f"{key} applies to the synthetic data set only, not {cfg.dataset!r}")
    if cfg.accumulate < 1:
        raise UsageError(f"accumulate must be >= 1, got {cfg.accumulate}")
    if cfg.optimizer in AGNOSTIC_OPTIMIZERS:
        n_t, n_v = split_sizes(cfg.batch_size, cfg.split_ratio)
        if n_t == 0 or n_v == 0:
            raise UsageError(
                f"batch_size {cfg.batch_size} is too small to split with split_ratio {cfg.split_ratio} "
                f"(|B^t|={n_t}, |B^v|={n_v}); use a larger batch"
            )
        if min(n_t, n_v) < cfg.accumulate:
            raise UsageError(
                f"accumulate {cfg.accumulate} exceeds the smaller batch part ({min(n_t, n_v)} samples)"
            )
    elif cfg.batch_size < cfg.accumulate:
        raise UsageError(f"accumulate {cfg.accumulate} exceeds batch_size {cfg.batch_size}")
    return cfg


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UsageError(f"config file {path}{line} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values")
    return data


def _apply(values: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    types_ = _field_types()
    for key, value in layer.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise UsageError(f"unknown config key '{key}' in {source}")
        values[name] = _coerce(name, value, types_[name])


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Build a validated TrainConfig from defaults < `base` < YAML at `path` < `overrides`.

    `base` is a saved run's config (used by `--resume` so that flags not given keep the saved values).
    Unknown keys and values of the wrong type raise UsageError naming the key.
    """
    values: dict[str, Any] = config_to_dict(TrainConfig())
    if base:
        _apply(values, base, "the saved config")
    if path is not None:
        _apply(values, _read_yaml(path), str(path))
    if overrides:
        _apply(values, overrides, "the command line")
    cfg = TrainConfig(**values)
    if cfg.out is None:
        cfg.out = default_out(cfg)
    return validate_config(cfg)


def default_out(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{cfg.dataset}-{cfg.model}-{cfg.optimizer}-seed{cfg.seed}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (tmp file in the same folder, then replace)."""
    from agnostic_sam.train.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
