"""One typed config per run: defaults < YAML file < command-line flags.

`TrainConfig` is the single source of truth for a training run; it is saved next to the results as
`config.yaml`. Which fields define *which run* it is (for `--resume`, `compare` and `reproduce`)
is decided in one place, `agnostic_sam.train.rundir.run_identity`. Method names and what each
method takes come from the method registry (`agnostic_sam.methods`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agnostic_sam.errors import UsageError
from agnostic_sam.yamlio import read_yaml

__all__ = [
    "LOGGERS",
    "TrainConfig",
    "config_to_dict",
    "config_yaml",
    "default_out",
    "load_config",
    "method_settings",
    "budget_factor",
    "planned_epochs",
    "planned_steps",
    "settings_text",
    "read_config_file",
    "save_config",
    "validate_config",
]

SPLITS = ("batch", "fixed")
BUDGETS = ("epochs", "passes")
AMP_MODES = ("none", "bf16", "fp16")
LOGGERS = ("tensorboard", "wandb")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Bounds for sizes no run here can use (a typo, not an experiment): they fail before any allocation.
MAX_IMAGE_SIZE = 2048
MAX_SEED = 2**32  # seeds in [0, 2**32): numpy's range


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults suit the `digits` demo (a few seconds
    on CPU)."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    noise_rate: float = 0.0  # fraction of training labels flipped (symmetric noise), in [0, 1)
    val_fraction: float = 0.0  # > 0: evaluate on a held-out part of the training set, never on test
    val_noise: bool = False  # the held-out labels carry the training labels' noise
    train_fraction: float = 1.0  # < 1: train on a stratified subset this size (small-data protocol)
    image_size: int | None = None  # None: the data set's native size
    # `synthetic` only (smoke runs and benchmarks shaped like a real data set); None: its defaults
    num_classes: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    # model
    model: str = "mlp"
    weights: str | None = None  # pretrained weights file for load_pretrained
    # method (agnostic_sam.methods) and its base optimizer
    optimizer: str = "agnostic-sam"
    base_optimizer: str = "sgd"  # sgd (momentum, nesterov) or adamw (betas, adam_eps)
    epochs: int = 30
    # Compute budget: "epochs" (this many epochs, whatever a step costs) or "passes" (the forward
    # + backward work of `budget_reference` in `epochs` epochs: a cheaper method trains
    # proportionally more steps, its schedule and warm-up stretched to its own length).
    budget: str = "epochs"
    budget_reference: str = "sam"
    batch_size: int = 64  # |B| = |B^t| + |B^v| for the Agnostic-SAM family
    lr: float = 0.05  # peak learning rate of the per-step cosine schedule
    # linear warm-up to the peak lr before the cosine (fractions allowed)
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # clip the final gradient (before the base step) to this norm
    max_grad_norm: float | None = None
    # The method's settings (`agnostic_sam.methods`: each record lists its own), checked against
    # the record; rho, rho1, rho2 and adaptive have fields (and flags) of their own. None: the
    # method's default (SAM rho 0.05; Agnostic-SAM rho1 0.1, rho2 0.05).
    method_args: dict[str, Any] = field(default_factory=dict)
    rho: float | None = None  # SAM's (and most of the family's) radius
    rho1: float | None = None  # Agnostic-SAM: radius of the B^t ascent
    rho2: float | None = None  # Agnostic-SAM: radius of the B^v ascent
    adaptive: bool = False  # ASAM-style scale-invariant radius (methods that have the setting)
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
    log: list[str] = field(default_factory=list)  # also log to: tensorboard, wandb
    progress: bool = True


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's annotation; ints are accepted for floats (the YAML
    reader reads ``1e-3`` as a float, YAML 1.2 style; a quoted string is not a number)."""
    if typing.get_origin(annotation) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"config key '{key}' must be a mapping of names to values, "
                             f"got {value!r}")
        return dict(value)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key '{key}' must be a list of {item.__name__}, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    allowed = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    )
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
    elif str in allowed:
        if isinstance(value, str):
            return value
    names = "/".join(t.__name__ for t in allowed if t is not type(None))
    shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
    raise UsageError(f"config key '{key}' must be {names}, got {shown}")


def _check_range(cfg: TrainConfig, key: str, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """UsageError unless ``low <= value <= high`` (open ends where asked) and finite."""
    value = getattr(cfg, key)
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise UsageError(f"{key} must be in {lo}{low:g}, {high:g}{hi}, got {value}")


def _registry() -> Any:
    """The method registry, imported when first needed: it imports torch, which reading a
    config (and `agnostic-sam train --help`) does not need."""
    import agnostic_sam.methods

    return agnostic_sam.methods


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Raise UsageError (one line, naming the key and value) for values no run can use."""
    try:
        method = _registry().get_method(cfg.optimizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _check_choices(cfg)
    _check_numbers(cfg)
    try:
        method_settings(cfg)
        _registry().get_method(cfg.budget_reference)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _check_sizes(cfg, method.splits_batch)
    return cfg


def _check_choices(cfg: TrainConfig) -> None:
    from agnostic_sam.optim import PERTURBATIONS

    base_optimizers = tuple(_registry().BASE_OPTIMIZERS)
    for key, value, choices in (("split", cfg.split, SPLITS), ("amp mode", cfg.amp, AMP_MODES),
                                ("budget", cfg.budget, BUDGETS),
                                ("perturbation", cfg.perturbation, PERTURBATIONS),
                                ("base optimizer", cfg.base_optimizer, base_optimizers)):
        if value not in choices:
            raise UsageError(f"unknown {key} '{value}'; choose from {', '.join(choices)}")
    unknown = [name for name in cfg.log if name not in LOGGERS]
    if unknown:
        raise UsageError(f"unknown logger '{unknown[0]}'; choose from {', '.join(LOGGERS)}")
    if not _DEVICE_RE.match(cfg.device):
        raise UsageError(f"unknown device '{cfg.device}'; use auto, cpu, cuda, cuda:N or mps")
    if cfg.out is not None and not cfg.out.strip():
        raise UsageError("--out must name a directory, got an empty string")


def _check_numbers(cfg: TrainConfig) -> None:
    """Every real-valued setting finite and in its range."""
    inf = math.inf
    for key in ("rho", "rho1", "rho2"):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{key} must be a radius >= 0, got {value}")
    _check_range(cfg, "split_ratio", 0, 1, low_open=True, high_open=True)
    for key in ("noise_rate", "val_fraction", "label_smoothing", "momentum"):
        _check_range(cfg, key, 0, 1, high_open=True)
    _check_range(cfg, "train_fraction", 0, 1, low_open=True)
    _check_range(cfg, "lr", 0, inf, low_open=True, high_open=True)
    _check_range(cfg, "weight_decay", 0, inf, high_open=True)
    _check_range(cfg, "adam_eps", 0, inf, low_open=True, high_open=True)
    _check_range(cfg, "max_grad_norm", 0, inf, low_open=True, high_open=True)
    _check_range(cfg, "warmup_epochs", 0, cfg.epochs)
    if len(cfg.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in cfg.betas):
        raise UsageError(f"betas must be two numbers in [0, 1), got {cfg.betas}")
    if cfg.nesterov and cfg.momentum == 0:
        raise UsageError("nesterov needs momentum > 0, got momentum 0")
    if not 0 <= cfg.seed < MAX_SEED:
        raise UsageError(f"seed must be in [0, 2**32), got {cfg.seed}")


def _check_sizes(cfg: TrainConfig, splits_batch: bool) -> None:
    """Counts and sizes: positive, below what any run here can use, and a batch that splits."""
    for key, high in (("epochs", 10**6), ("batch_size", 10**7), ("accumulate", 10**6),
                      ("threads", 4096), ("max_steps", 10**12), ("image_size", MAX_IMAGE_SIZE),
                      ("num_classes", 10**6), ("train_size", 10**8), ("test_size", 10**8)):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UsageError(f"{key} must be >= 1, got {value}")
        if value is not None and value > high:
            raise UsageError(f"{key} must be <= {high}, got {value}")
    if not 0 <= cfg.workers <= 1024:
        raise UsageError(f"workers must be in [0, 1024], got {cfg.workers}")
    if cfg.val_noise and cfg.val_fraction == 0:
        raise UsageError("val_noise needs a held-out part: set val_fraction > 0")
    if cfg.dataset != "synthetic":
        for key in ("num_classes", "train_size", "test_size"):
            if getattr(cfg, key) is not None:
                raise UsageError(
                    f"{key} applies to the synthetic data set only, not {cfg.dataset!r}"
                )
    if splits_batch:
        from agnostic_sam.optim import split_sizes

        try:
            n_t, n_v = split_sizes(cfg.batch_size, cfg.split_ratio)
        except ValueError as exc:
            raise UsageError(f"{exc}; use a larger batch") from None
        if min(n_t, n_v) < cfg.accumulate:
            raise UsageError(
                f"accumulate {cfg.accumulate} exceeds the smaller batch part "
                f"({min(n_t, n_v)} samples)"
            )
    elif cfg.batch_size < cfg.accumulate:
        raise UsageError(f"accumulate {cfg.accumulate} exceeds batch_size {cfg.batch_size}")


def method_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg.optimizer``'s method: the record's defaults < the shorthand fields
    it has (rho, rho1, rho2, adaptive; None keeps the default) < ``method_args``. ValueError
    naming the allowed settings for an unknown name or a bad value."""
    info = _registry().get_method(cfg.optimizer)
    shorthands = _registry().SHORTHANDS
    values: dict[str, Any] = {}
    for key in shorthands:
        if key in info.setting_names and getattr(cfg, key) is not None:
            values[key] = getattr(cfg, key)
    for key, value in cfg.method_args.items():
        if key in shorthands and key in values and value != values[key] and (
                key != "adaptive" or cfg.adaptive):
            raise ValueError(f"{key} is set twice: {values[key]!r} as --{key} and {value!r} in "
                             "method_args; set one of them")
        values[key] = value
    return info.resolve(values)


def budget_factor(cfg: TrainConfig) -> float:
    """Steps of this run over its epochs' steps: 1 for ``budget: epochs``; for ``budget:
    passes``, the reference method's cost per step over this method's (record costs in
    batch-equivalents at ``split_ratio``; the reference at its default settings)."""
    if cfg.budget == "epochs" or cfg.budget_reference == cfg.optimizer:
        return 1.0
    get_method = _registry().get_method
    own = get_method(cfg.optimizer).batch_equivalents(cfg.split_ratio, method_settings(cfg))
    ref = get_method(cfg.budget_reference).batch_equivalents(cfg.split_ratio)
    return ref / own


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run (before ``max_steps``): epochs x steps per epoch x
    `budget_factor`, rounded."""
    return max(1, round(cfg.epochs * steps_per_epoch * budget_factor(cfg)))


def planned_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Passes over the data the run starts (the last one may stop early)."""
    return math.ceil(planned_steps(cfg, steps_per_epoch) / steps_per_epoch)


def settings_text(cfg: TrainConfig) -> str:
    """The method's shown settings (its tuned setting and followers, and any set in
    method_args) for reports: ``"rho1=0.1, rho2=0.05"``; ``"-"`` for none."""
    info = _registry().get_method(cfg.optimizer)
    return info.settings_text(method_settings(cfg), extra=cfg.method_args)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (the strict reader of `agnostic_sam.yamlio`);
    UsageError (one line naming the file) otherwise."""
    return read_yaml(path)


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

    `base` is a saved run's config (used by `--resume` so that flags not given keep the saved
    values).
    Unknown keys and values of the wrong type raise UsageError naming the key.
    """
    values: dict[str, Any] = config_to_dict(TrainConfig())
    if base:
        _apply(values, base, "the saved config")
    if path is not None:
        _apply(values, read_config_file(path), str(path))
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


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (config.yaml)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (tmp file in the same folder, then replace)."""
    from agnostic_sam.train.checkpoint import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))
