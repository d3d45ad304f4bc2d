"""`train(cfg)`: the training loop, top to bottom, and `load_trained(run_dir)`.

One run = data -> model -> optimizer -> per-step cosine schedule -> epochs of (steps, evaluation,
metrics line, checkpoint) -> result.json. Under torchrun every process runs `train` and the model
is wrapped in DDP (see `agnostic_sam.train.distributed` and docs/distributed.md): each rank takes
its |B| / world columns of every batch, metrics are summed over ranks, only rank 0 writes files.

Batches. Every epoch is an index matrix of shape (steps, |B|) drawn from a generator seeded by
(seed, epoch), so an epoch's batches do not depend on what ran before it (exact resume):
  * split="batch": a permutation of the training set, cut into full batches of |B|; the
    Agnostic-SAM family splits each batch into B^t / B^v with `split_batch(ratio, generator)`.
  * split="fixed" (Agnostic-SAM family): the training set is split once into S^t / S^v by
    `fixed_split`; row k holds |B^t| = round(r |B|) indices of a pass over S^t, then
    |B^v| = |B| - |B^t| indices cycling through permutations of S^v. An epoch is one pass over S^t.
The last incomplete batch is dropped, so every step sees a full batch that can be split.
Under DDP each rank splits its own columns, so |B^t| = world * round(r |B| / world).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from agnostic_sam.amp import LossScaler
from agnostic_sam.data import build_data, fixed_split
from agnostic_sam.errors import UsageError
from agnostic_sam.models import create_model, load_pretrained
from agnostic_sam.optim import SAM, AgnosticSAM, split_batch
from agnostic_sam.train.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_json,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from agnostic_sam.train.config import (
    AGNOSTIC_OPTIMIZERS,
    RESULT_FIELDS,
    TrainConfig,
    config_to_dict,
    default_out,
    load_config,
    save_config,
    validate_config,
)
from agnostic_sam.train.distributed import (
    DistInfo,
    accumulation_context,
    all_reduce_sum,
    broadcast_buffers,
    distributed_session,
    gather_to_main,
    global_split_sizes,
    local_batch_size,
    main_process_first,
    shard_bounds,
    shard_columns,
    verify_replicas,
    wrap_model,
)

__all__ = ["train", "load_trained", "resolve_device"]

METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"
CONFIG_NAME = "config.yaml"
EVAL_BATCH = 512  # samples per evaluation forward pass
# Ranks > 0 offset their seeds by this (dropout, augmentation): the same stream on every rank would
# correlate them. Rank 0 keeps the single-process seeds.
RANK_SEED_STRIDE = 100_003


# ---- small helpers (process, device, randomness) --------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / (Distributed)DataParallel wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an unavailable device is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{name}' requested but MPS is not available; use --device cpu")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, epoch): epoch e's batches never depend on e-1.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds python `random` and torch in each worker; numpy must be seeded by hand.
    np.random.seed(torch.initial_seed() % 2**32)


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _check_same_run(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A resumed run must agree with the checkpoint on every field that changes the numbers."""
    now = config_to_dict(cfg)
    for key in RESULT_FIELDS:
        if key in saved and saved[key] != now[key]:
            raise UsageError(
                f"--resume: '{key}' is {now[key]!r} but the checkpoint was trained with {saved[key]!r}"
            )


# ---- batches ---------------------------------------------------------------------------------

def _epoch_index(cfg: TrainConfig, n: int, fixed: tuple[Tensor, Tensor] | None, epoch: int,
                 world: int = 1) -> Tensor:
    """LongTensor (steps, |B|) of training-set indices for `epoch` (see the module docstring),
    the same on every rank; `world` sets the global |B^t| / |B^v| of the fixed split."""
    g = _epoch_generator(cfg.seed, epoch)
    if fixed is None:
        steps = n // cfg.batch_size
        return torch.randperm(n, generator=g)[: steps * cfg.batch_size].view(steps, cfg.batch_size)
    idx_t, idx_v = fixed
    n_t, n_v = global_split_sizes(cfg.batch_size, cfg.split_ratio, world)
    steps = len(idx_t) // n_t
    rows_t = idx_t[torch.randperm(len(idx_t), generator=g)][: steps * n_t].view(steps, n_t)
    cycles = math.ceil(steps * n_v / len(idx_v))
    val = torch.cat([idx_v[torch.randperm(len(idx_v), generator=g)] for _ in range(cycles)])
    return torch.cat([rows_t, val[: steps * n_v].view(steps, n_v)], dim=1)


def _batches(train_set: Dataset, tensors: tuple[Tensor, Tensor] | None, index: Tensor,
             cfg: TrainConfig, epoch: int, device: torch.device,
             rank: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) on `device` for each row of `index` (this rank's columns)."""
    if tensors is not None:  # in-memory fast path: the whole training set already lives on device
        x_all, y_all = tensors
        rows = index.to(device)
        for row in rows:
            yield x_all[row], y_all[row]
        return
    loader = DataLoader(
        train_set, batch_sampler=index.tolist(), num_workers=cfg.workers,
        generator=_epoch_generator(cfg.seed + 1 + RANK_SEED_STRIDE * rank, epoch), worker_init_fn=_seed_worker,
        pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


@torch.no_grad()
def _evaluate(fwd: nn.Module, test_set: Dataset, device: torch.device,
              autocast: Callable[[], contextlib.AbstractContextManager[Any]],
              channels_last: bool, info: DistInfo) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) on `test_set`; one host sync at the end.
    Under DDP each rank evaluates its contiguous share and the sums are all-reduced."""
    fwd.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    lo, hi = shard_bounds(len(test_set), info.rank, info.world_size)
    if isinstance(test_set, TensorDataset):
        x_all, y_all = (t[lo:hi] for t in test_set.tensors)
        chunks: Any = zip(x_all.split(EVAL_BATCH), y_all.split(EVAL_BATCH))
    else:
        part = Subset(test_set, range(lo, hi)) if info.distributed else test_set
        chunks = DataLoader(part, batch_size=EVAL_BATCH, shuffle=False)
    for x, y in chunks:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = fwd(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    fwd.train()
    sums = all_reduce_sum({"loss": loss_sum, "correct": correct.to(loss_sum.dtype),
                           "count": torch.tensor(float(count), device=device)})
    loss, acc, count = torch.stack(list(sums.values())).tolist()
    return loss / max(count, 1), 100.0 * acc / max(count, 1)


# ---- the loop --------------------------------------------------------------------------------

def _synthetic_options(cfg: TrainConfig) -> dict[str, int]:
    """The shape options only `synthetic` takes; other data sets reject them."""
    keys = ("num_classes", "train_size", "test_size")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}


def _check_distributed(cfg: TrainConfig, world: int) -> None:
    """What a run over `world` processes cannot honour -> UsageError before any file is written."""
    local_batch_size(cfg.batch_size, world)
    agnostic = cfg.optimizer in AGNOSTIC_OPTIMIZERS
    parts = global_split_sizes(cfg.batch_size, cfg.split_ratio, world) if agnostic else (cfg.batch_size,)
    if min(parts) // world < cfg.accumulate:
        raise UsageError(
            f"accumulate {cfg.accumulate} exceeds the {min(parts) // world} samples each of the {world} "
            "processes holds of the smallest batch part"
        )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run as `cfg` says; write config.yaml, metrics.jsonl, checkpoint.pt, result.json
    into `cfg.out` and return the result.json content.

    Under torchrun every process calls this: it joins the process group (and leaves it at the
    end if it created it) and trains with DistributedDataParallel.
    """
    cfg = validate_config(dataclasses.replace(cfg))
    if cfg.out is None:
        cfg.out = default_out(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    with distributed_session(resolve_device(cfg.device)) as info:
        return _train(cfg, info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """The body of `train` on one process (rank `info.rank` of `info.world_size`)."""
    rank, world, is_main = info.rank, info.world_size, info.is_main
    out = Path(cfg.out)
    device = info.device  # under torchrun on CUDA: GPU LOCAL_RANK
    agnostic = cfg.optimizer in AGNOSTIC_OPTIMIZERS
    if info.distributed:
        _check_distributed(cfg, world)

    # Everything that can reject the input runs before the first file is written.
    ckpt_path = out / CHECKPOINT_NAME
    ckpt: dict[str, Any] | None = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        ckpt = load_checkpoint(ckpt_path)
        _check_same_run(ckpt["config"], cfg)
        if int(ckpt.get("world_size", 1)) != world:  # the batches depend on the world size
            raise UsageError(f"--resume: the checkpoint was written by {ckpt.get('world_size', 1)} "
                             f"process(es), this run has {world}; resume with the same number")
    elif ckpt_path.exists():
        raise UsageError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume or choose another --out")

    _seed_everything(cfg.seed)
    with main_process_first():  # under DDP rank 0 downloads / caches before the others read
        data = build_data(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                          noise_rate=cfg.noise_rate, seed=cfg.seed, val_fraction=cfg.val_fraction,
                          image_size=cfg.image_size, **_synthetic_options(cfg))
    n_train = len(data.train)
    fixed = None
    if agnostic and cfg.split == "fixed":
        try:
            fixed = fixed_split(n_train, cfg.split_ratio, cfg.seed)
        except ValueError as exc:
            raise UsageError(f"split 'fixed': {exc}") from None
        if len(fixed[0]) < global_split_sizes(cfg.batch_size, cfg.split_ratio, world)[0]:
            raise UsageError(f"batch_size {cfg.batch_size} is larger than S^t allows ({len(fixed[0])} samples)")
    elif n_train < cfg.batch_size:
        raise UsageError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train} samples)")
    model_meta = {"num_classes": data.num_classes, "in_channels": data.in_channels,
                  "image_size": data.image_size}
    model = create_model(cfg.model, **model_meta)
    if cfg.weights:
        load_pretrained(model, cfg.weights)
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # DDP for several processes (replicas start from rank 0's weights), the model itself for one.
    ddp = wrap_model(model, info, sync_bn=cfg.sync_bn)
    model = _unwrap(ddp)  # SyncBatchNorm conversion may replace the top module
    if rank > 0:
        _seed_everything(cfg.seed + RANK_SEED_STRIDE * rank)
    # TensorDatasets (no random augmentation) are indexed in memory on the device: no DataLoader.
    tensors = None
    if isinstance(data.train, TensorDataset):
        x_all, y_all = data.train.tensors
        tensors = (x_all.to(device), y_all.long().to(device))

    # Optimizer: SGD settings shared by every method; the SAM family wraps SGD.
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    loss_scaler = LossScaler(device=device) if cfg.amp == "fp16" and cfg.optimizer != "sgd" else None
    grad_scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" and cfg.optimizer == "sgd" else None
    sgd_kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    sharp_kwargs = dict(adaptive=cfg.adaptive, model=ddp, perturbation=cfg.perturbation,
                        loss_scaler=loss_scaler, check_finite=cfg.check_finite)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **sgd_kwargs)
    elif cfg.optimizer == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, **sharp_kwargs, **sgd_kwargs)
    else:
        variant = "simpler" if cfg.optimizer == "agnostic-sam-simpler" else "full"
        opt = AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=cfg.rho1, rho2=cfg.rho2,
                          variant=variant, **sharp_kwargs, **sgd_kwargs)
    steps_per_epoch = _epoch_index(cfg, n_train, fixed, 0, world).shape[0]
    total_steps = cfg.epochs * steps_per_epoch  # the cosine runs over the whole run, per step
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    fwd = torch.compile(ddp) if cfg.compile else ddp  # closures stay plain Python
    # Evaluation runs on the plain module under DDP: no DDP collectives in uneven test shards.
    eval_fwd = model if info.distributed else fwd

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    split_gen = torch.Generator().manual_seed(cfg.seed)  # B^t/B^v split in batch mode
    generators = {"split": split_gen}

    # State of a resumed run.
    start_epoch, step, elapsed, metrics = 0, 0, 0.0, []
    if ckpt is not None:
        _unwrap(model).load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if loss_scaler is not None and ckpt.get("loss_scaler") is not None:
            loss_scaler.load_state_dict(ckpt["loss_scaler"])
        if grad_scaler is not None and ckpt.get("grad_scaler") is not None:
            grad_scaler.load_state_dict(ckpt["grad_scaler"])
        restore_rng((ckpt.get("rng_ranks") or [ckpt["rng"]])[rank], generators)
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        elapsed, metrics = float(ckpt.get("elapsed", 0.0)), list(ckpt["metrics"])
    if is_main:
        save_config(cfg, out / CONFIG_NAME)
        # Rewritten from the checkpoint: a kill between metrics and checkpoint leaves no duplicate.
        atomic_write_text(out / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in metrics))

    def make_closure(x: Tensor, y: Tensor, meter: dict[str, Tensor]) -> Callable[[], Tensor]:
        """Forward + backward on (x, y) in `accumulate` micro-batches; the first call (at theta)
        also adds the summed loss and correct count to `meter`."""
        first = [True]
        n = len(y)

        def closure() -> Tensor:
            total = torch.zeros((), device=device)
            micro = zip(x.tensor_split(cfg.accumulate), y.tensor_split(cfg.accumulate))
            for i, (xm, ym) in enumerate(micro):
                # DDP: forward and backward in no_sync for all but the last micro-batch.
                with accumulation_context(ddp, i, cfg.accumulate):
                    with autocast():
                        logits = fwd(xm).float()
                    loss = criterion(logits, ym) * (len(ym) / n)  # micro mean -> share of part mean
                    if grad_scaler is not None:
                        grad_scaler.scale(loss).backward()
                    elif cfg.optimizer == "sgd":
                        loss.backward()
                    else:
                        opt.backward(loss)
                total += loss.detach()
                if first[0]:
                    meter["loss"] += loss.detach() * n
                    meter["correct"] += (logits.detach().argmax(1) == ym).sum()
            first[0] = False
            return total

        return closure

    # Global (|B^t|, |B^v|) blocks of a fixed-split row, sharded block by block.
    split_parts = global_split_sizes(cfg.batch_size, cfg.split_ratio, world) if fixed is not None else None
    segment_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        fwd.train()
        # Running sums stay on the device; one host sync per epoch.
        meter = {name: torch.zeros((), device=device) for name in ("loss", "correct", "cos", "skipped")}
        seen, epoch_steps = 0, 0
        index = _epoch_index(cfg, n_train, fixed, epoch, world)
        local = shard_columns(index, info, split_parts)  # (steps, |B| / world) for this rank
        bar = _progress(cfg, is_main, len(index), epoch)
        for x, y in _batches(data.train, tensors, local, cfg, epoch, device, rank):
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if cfg.optimizer == "sgd":
                opt.zero_grad(set_to_none=True)
                make_closure(x, y, meter)()
                if grad_scaler is not None:
                    scale_before = grad_scaler.get_scale()  # host sync, only for fp16 SGD
                    grad_scaler.step(opt)
                    grad_scaler.update()
                    meter["skipped"] += float(grad_scaler.get_scale() < scale_before)
                else:
                    opt.step()
            elif cfg.optimizer == "sam":
                opt.step(make_closure(x, y, meter))
                meter["skipped"] += opt.stats["skipped"]
            else:
                if fixed is not None:  # rows are [B^t from S^t | B^v from S^v]
                    n_t = split_parts[0] // world
                    x_t, y_t, x_v, y_v = x[:n_t], y[:n_t], x[n_t:], y[n_t:]
                else:
                    x_t, y_t, x_v, y_v = split_batch(x, y, ratio=cfg.split_ratio, generator=split_gen)
                opt.step(make_closure(x_t, y_t, meter), make_closure(x_v, y_v, meter))
                meter["cos"] += opt.stats["cos_train_val"]
                meter["skipped"] += opt.stats["skipped"]
            scheduler.step()
            seen += len(y)
            epoch_steps += 1
            step += 1
            bar.update(1)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        bar.close()
        meter["seen"] = torch.tensor(float(seen), device=device)
        totals = all_reduce_sum(meter)  # sums over ranks
        loss_sum, correct, cos_sum, skipped, seen = torch.stack(list(totals.values())).tolist()
        train_loss = loss_sum / max(seen, 1)
        if not math.isfinite(train_loss) and (not cfg.check_finite or (cfg.optimizer == "sgd" and grad_scaler is None)):
            raise UsageError(
                f"training diverged: epoch {epoch + 1} mean loss is {train_loss}; lower --lr"
                + ("" if cfg.check_finite else " or drop --no-check-finite")
            )
        broadcast_buffers(ddp)  # every rank evaluates (and rank 0 saves) rank 0's BatchNorm stats
        test_loss, test_acc = _evaluate(eval_fwd, data.test, device, autocast, cfg.channels_last, info)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": 100.0 * correct / max(seen, 1),
            "test_loss": test_loss, "test_acc": test_acc, "steps": step,
        }
        if agnostic:
            row["cos_train_val"] = cos_sum / max(epoch_steps * world, 1)  # mean over ranks too
        if cfg.amp == "fp16":
            row["skipped_steps"] = round(skipped / world)  # every rank skips the same steps
        row["epoch_seconds"] = time.perf_counter() - t0
        metrics.append(row)
        rng_ranks = gather_to_main(capture_rng(generators)) if info.distributed else None
        if is_main:
            if cfg.progress:
                bar.write(_format_row(row, cfg.epochs))
            atomic_write_text(out / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in metrics))
            save_checkpoint(ckpt_path, {
                "model": _unwrap(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loss_scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
                "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
                "epoch": epoch + 1,
                "step": step,
                "rng": capture_rng(generators),
                "rng_ranks": rng_ranks,  # every rank's streams (None for one process)
                "world_size": world,
                "config": config_to_dict(cfg),
                "metrics": metrics,
                "model_meta": model_meta,
                "elapsed": elapsed + time.perf_counter() - segment_start,
            })

    total_seconds = elapsed + time.perf_counter() - segment_start
    last = metrics[-1] if metrics else {}
    result = {
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max((m["test_acc"] for m in metrics), default=None),
        "final_test_loss": last.get("test_loss"),
        "final_train_acc": last.get("train_acc"),
        "final_train_loss": last.get("train_loss"),
        "eval_split": "holdout" if cfg.val_fraction > 0 else "test",
        "epochs_completed": len(metrics),
        "steps": step,
        "total_seconds": total_seconds,
        "noise_rate_realized": float(data.noise_rate_realized),
        "num_params": num_params,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "device": str(device),
        "world_size": world,
        "torch_version": torch.__version__,
        "git_commit": _git_commit(),
        "config": config_to_dict(cfg),
    }
    if info.distributed:  # all ranks must hold bit-identical weights; RuntimeError otherwise
        broadcast_buffers(ddp)
        result["replica_sha256"] = verify_replicas(ddp)
    if is_main:
        atomic_write_json(out / RESULT_NAME, result)
    return result


def _progress(cfg: TrainConfig, is_main: bool, total: int, epoch: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                disable=not (cfg.progress and is_main), dynamic_ncols=True)


def _format_row(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train {row['train_loss']:.4f} / "
            f"{row['train_acc']:.2f}%  test {row['test_loss']:.4f} / {row['test_acc']:.2f}%  "
            f"{row['epoch_seconds']:.1f}s")
    if "cos_train_val" in row:
        text += f"  cos {row['cos_train_val']:.3f}"
    return text


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The model of a finished (or interrupted) run, rebuilt from config.yaml with the
    checkpoint's weights, in eval mode on `device`; and its config."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(f"{run_dir} is not a run directory (no {CONFIG_NAME})")
    cfg = load_config(config_path, {})
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    meta = ckpt.get("model_meta")
    if meta is None:
        raise UsageError(f"checkpoint in {run_dir} lacks model_meta; it was not written by train()")
    model = create_model(cfg.model, **meta)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
