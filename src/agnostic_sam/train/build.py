"""Everything a run is built from, in one place: device and seeds, data, model (DDP-wrapped
under torchrun), the method from the registry over its base optimizer, the learning-rate
schedule, the loss, the loggers. `build_run(cfg, info)` returns them as one `RunParts`; the loop
(`loop.py`) only uses them."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.data import DataBundle, build_data, fixed_split
from agnostic_sam.errors import UsageError
from agnostic_sam.methods import MethodInfo, create_optimizer, get_base_optimizer, get_method
from agnostic_sam.models import create_model, load_pretrained
from agnostic_sam.train.batches import RANK_SEED_STRIDE, device_tensors, epoch_index
from agnostic_sam.train.config import (
    TrainConfig,
    budget_factor,
    config_to_dict,
    method_settings,
    planned_steps,
)
from agnostic_sam.train.distributed import (
    DistInfo,
    global_split_sizes,
    local_batch_size,
    main_process_first,
    wrap_model,
)

__all__ = [
    "RunParts",
    "build_run",
    "check_distributed",
    "lr_schedule",
    "resolve_device",
    "seed_everything",
    "steps_per_epoch_of",
    "unwrap",
]


@dataclass
class RunParts:
    """What one run trains with (built once; the loop's state lives in `loop.RunState`)."""

    cfg: TrainConfig
    info: DistInfo
    data: DataBundle
    method: MethodInfo
    model: nn.Module  # the plain module (its state_dict is checkpointed)
    ddp: nn.Module  # DistributedDataParallel around it, or the model itself
    fwd: Any  # the module's forward for training (torch.compile'd when cfg.compile)
    eval_fwd: Any  # forward for evaluation (plain module under DDP)
    # The method's optimizer: step(*closures), backward(loss), at_theta, stats (the registry's
    # classes; a plugin's may subclass torch.optim.Optimizer alone).
    opt: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    loss_scaler: LossScaler | None
    amp_dtype: torch.dtype | None
    tensors: tuple[Tensor, Tensor] | None  # in-memory training set on the device
    fixed: tuple[Tensor, Tensor] | None  # S^t / S^v indices of the fixed split
    split_parts: tuple[int, int] | None  # global (|B^t|, |B^v|) of a fixed-split row
    split_gen: torch.Generator  # B^t / B^v split of each batch (batch mode)
    steps_per_epoch: int
    num_params: int
    model_meta: dict[str, int]
    logger: Any  # agnostic_sam.train.loggers.Logger, or None without --log

    @property
    def device(self) -> torch.device:
        return self.info.device

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / (Distributed)DataParallel wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; a malformed or unavailable device is a
    UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device '{name}' requested but CUDA is not available; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{name}' requested but MPS is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def check_distributed(cfg: TrainConfig, world: int) -> None:
    """What a run over `world` processes cannot honour -> UsageError before any file is written."""
    local_batch_size(cfg.batch_size, world)
    split = get_method(cfg.optimizer).splits_batch
    parts = (
        global_split_sizes(cfg.batch_size, cfg.split_ratio, world) if split else (cfg.batch_size,)
    )
    if min(parts) // world < cfg.accumulate:
        raise UsageError(
            f"accumulate {cfg.accumulate} exceeds the {min(parts) // world} samples "
            f"each of the {world} processes holds of the smallest batch part"
        )


def lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig,
                steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step cosine from the peak lr to 0 over the run, after a linear warm-up of
    ``warmup_epochs`` (step t < w: lr = peak (t + 1) / w; then peak (1 + cos(pi (t - w) /
    (T - w))) / 2, with T = the run's planned steps (epochs * steps_per_epoch, times the budget
    factor under ``budget: passes``) and w = round(warmup_epochs * steps_per_epoch * factor)."""
    total = planned_steps(cfg, steps_per_epoch)
    stretch = budget_factor(cfg)
    warmup = (max(1, round(cfg.warmup_epochs * steps_per_epoch * stretch))
              if cfg.warmup_epochs > 0 else 0)
    if warmup == 0:  # torch's own cosine, as every run before warm-up existed
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    warmup = min(warmup, total)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _data(cfg: TrainConfig) -> DataBundle:
    synthetic = {k: getattr(cfg, k) for k in ("num_classes", "train_size", "test_size")
                 if getattr(cfg, k) is not None}
    with main_process_first():  # under DDP rank 0 downloads / caches before the others read
        return build_data(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                          noise_rate=cfg.noise_rate, seed=cfg.seed, val_fraction=cfg.val_fraction,
                          val_noise=cfg.val_noise,
                          train_fraction=cfg.train_fraction, image_size=cfg.image_size, **synthetic)


def _fixed_split(cfg: TrainConfig, method: MethodInfo, n_train: int,
                 world: int) -> tuple[tuple[Tensor, Tensor] | None, tuple[int, int] | None]:
    """The S^t / S^v split and the global (|B^t|, |B^v|) of a row, for split="fixed"."""
    if not (method.splits_batch and cfg.split == "fixed"):
        if n_train < cfg.batch_size:
            raise UsageError(f"batch_size {cfg.batch_size} is larger than the training set "
                             f"({n_train} samples)")
        return None, None
    try:
        fixed = fixed_split(n_train, cfg.split_ratio, cfg.seed)
    except ValueError as exc:
        raise UsageError(f"split 'fixed': {exc}") from None
    parts = global_split_sizes(cfg.batch_size, cfg.split_ratio, world)
    if len(fixed[0]) < parts[0]:
        raise UsageError(
            f"batch_size {cfg.batch_size} is larger than S^t allows ({len(fixed[0])} samples)"
        )
    return fixed, parts


def _model(
    cfg: TrainConfig, data: DataBundle, info: DistInfo
) -> tuple[nn.Module, nn.Module, dict, int]:
    meta = {"num_classes": data.num_classes, "in_channels": data.in_channels,
            "image_size": data.image_size}
    model = create_model(cfg.model, **meta)
    if cfg.weights:
        load_pretrained(model, cfg.weights)
    num_params = sum(p.numel() for p in model.parameters())
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # DDP for several processes (replicas start from rank 0's weights), the model itself for one.
    ddp = wrap_model(model, info, sync_bn=cfg.sync_bn)
    return unwrap(ddp), ddp, meta, num_params  # SyncBatchNorm may replace the top module


def _optimizer(cfg: TrainConfig, model: nn.Module, ddp: nn.Module,
               loss_scaler: LossScaler | None) -> torch.optim.Optimizer:
    """The method over its base optimizer, as the registry builds it."""
    base = get_base_optimizer(cfg.base_optimizer)
    options: dict[str, Any] = dict(model=ddp, perturbation=cfg.perturbation,
                                   loss_scaler=loss_scaler, check_finite=cfg.check_finite)
    if cfg.max_grad_norm is not None:
        options["max_grad_norm"] = cfg.max_grad_norm
    if get_method(cfg.optimizer).random:  # its generator, seeded by the run (and in checkpoints)
        options["seed"] = cfg.seed
    return create_optimizer(cfg.optimizer, model.parameters(), base.cls, base.kwargs(cfg),
                            settings=method_settings(cfg), **options)


def steps_per_epoch_of(cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps in one epoch of run `cfg` (loads the data set's index, not a model)."""
    data = _data(cfg)
    n = len(cast(Sized, data.train))
    fixed, _ = _fixed_split(cfg, get_method(cfg.optimizer), n, world)
    return int(epoch_index(cfg, n, fixed, 0, world).shape[0])


def build_run(cfg: TrainConfig, info: DistInfo) -> RunParts:
    """Data, model, optimizer, schedule and loggers of the run `cfg` on this process."""
    method = get_method(cfg.optimizer)
    seed_everything(cfg.seed)
    data = _data(cfg)
    fixed, split_parts = _fixed_split(cfg, method, len(cast(Sized, data.train)),
                                      info.world_size)
    model, ddp, meta, num_params = _model(cfg, data, info)
    if info.rank > 0:
        seed_everything(cfg.seed + RANK_SEED_STRIDE * info.rank)
    loss_scaler = LossScaler(device=info.device) if cfg.amp == "fp16" else None
    opt = _optimizer(cfg, model, ddp, loss_scaler)
    steps = epoch_index(cfg, len(cast(Sized, data.train)), fixed, 0, info.world_size).shape[0]
    fwd = torch.compile(ddp) if cfg.compile else ddp  # closures stay plain Python
    logger = None
    if cfg.log and info.is_main:  # TensorBoard / W&B are optional: imported only when asked for
        from agnostic_sam.train.loggers import make_logger

        logger = make_logger(cfg.log, cast(str, cfg.out), config_to_dict(cfg))  # set by now
    return RunParts(
        cfg=cfg, info=info, data=data, method=method, model=model, ddp=ddp, fwd=fwd,
        # Evaluation runs on the plain module under DDP: no DDP collectives in uneven test shards.
        eval_fwd=model if info.distributed else fwd,
        opt=opt, scheduler=lr_schedule(opt, cfg, steps),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        loss_scaler=loss_scaler,
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp),
        # TensorDatasets (no random augmentation) are indexed in memory on the device.
        tensors=device_tensors(data.train, info.device),
        fixed=fixed, split_parts=split_parts,
        split_gen=torch.Generator().manual_seed(cfg.seed),
        steps_per_epoch=steps, num_params=num_params, model_meta=meta, logger=logger,
    )
