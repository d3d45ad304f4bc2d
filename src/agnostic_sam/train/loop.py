"""`train(cfg)`: the training loop, top to bottom.

One run: take the run directory's lock, check what is there (start, or restore a checkpoint),
build data -> model -> method -> schedule (`build.py`), then epochs of (steps, evaluation,
checkpoint, metrics line) and finally result.json; what a checkpoint holds and restores is in
`state.py`. Every method has the same step shape: the registry's record says whether it takes
one closure (plain, SAM) or two (B^t, B^v); the loss comes back in the optimizer's `stats`, and
accuracy is counted in the passes the optimizer runs at theta (`opt.at_theta`).

A run whose training loss goes non-finite, or whose fp16 steps are (nearly) all skipped in an
epoch, fails: `TrainingDiverged` (exit status 3) with the last good checkpoint kept and
result.json saying ``"status": "diverged"``.

Under torchrun every process runs `train` and the model is wrapped in DDP (see
`agnostic_sam.train.distributed` and docs/distributed.md): each rank takes its |B| / world
columns of every batch, metrics are summed over ranks, only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sized
from typing import Any, cast

import torch
from torch import Tensor

from agnostic_sam.errors import TrainingDiverged, UsageError
from agnostic_sam.methods.step import step_closures
from agnostic_sam.optim import split_batch
from agnostic_sam.train.batches import batches, epoch_index
from agnostic_sam.train.build import RunParts, build_run, check_distributed, resolve_device
from agnostic_sam.train.checkpoint import capture_rng
from agnostic_sam.train.config import (
    TrainConfig,
    config_to_dict,
    default_out,
    load_config,
    method_settings,
    planned_epochs,
    planned_steps,
    validate_config,
)
from agnostic_sam.train.distributed import (
    DistInfo,
    accumulation_context,
    all_reduce_sum,
    broadcast_buffers,
    distributed_session,
    gather_to_main,
    shard_columns,
    verify_replicas,
)
from agnostic_sam.train.evaluate import evaluate
from agnostic_sam.train.records import format_row, git_commit, machine_info, progress
from agnostic_sam.train.rundir import RunDir
from agnostic_sam.train.state import RunState, checkpoint_state, restore_state

__all__ = ["train", "load_trained", "resolve_device"]

# An epoch of at least this many fp16 steps with at least SKIP_FRACTION of them skipped for
# non-finite gradients has diverged (the loss scale cannot recover); shorter epochs are judged
# by their loss only, since the scale may still be calibrating.
SKIP_MIN_STEPS = 10
SKIP_FRACTION = 0.9


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run as `cfg` says; write config.yaml, checkpoint.pt, metrics.jsonl and
    result.json into `cfg.out` and return the result.json content.

    Under torchrun every process calls this: it joins the process group (and leaves it at the
    end if it created it) and trains with DistributedDataParallel.
    """
    cfg = validate_config(dataclasses.replace(cfg))
    if cfg.out is None:
        cfg.out = default_out(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    with distributed_session(resolve_device(cfg.device)) as info:
        rundir = RunDir(cfg.out)
        # One writer per run directory: rank 0 holds the lock for the whole run.
        with rundir.lock() if info.is_main else contextlib.nullcontext():
            return _train(cfg, info, rundir)


def _train(cfg: TrainConfig, info: DistInfo, rundir: RunDir) -> dict[str, Any]:
    """The run on one process (rank `info.rank` of `info.world_size`)."""
    ckpt = _restore_or_start(cfg, info, rundir)  # every check that can refuse, before writing
    parts = build_run(cfg, info)
    state = restore_state(parts, ckpt)
    if info.is_main:
        rundir.write_config(cfg)
        # Rewritten from the checkpoint: a kill between checkpoint and metrics loses no line.
        rundir.write_metrics(state.metrics)
    try:
        for epoch in range(state.epoch, planned_epochs(cfg, parts.steps_per_epoch)):
            if state.step >= _last_step(parts):
                break
            started = time.perf_counter()
            totals = _train_epoch(parts, state, epoch)
            row = _evaluate(parts, state, epoch, totals, started)
            _record(parts, state, rundir, row)
    except TrainingDiverged as exc:
        if info.is_main:
            rundir.write_result(_result(parts, state, status="diverged", error=str(exc)))
        raise
    finally:
        if parts.logger is not None:
            parts.logger.close()
    return _finish(parts, state, rundir)


def _restore_or_start(cfg: TrainConfig, info: DistInfo, rundir: RunDir) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a fresh run), after every check that can refuse
    the run: a fresh run never overwrites another, a resumed one must be the same run."""
    if info.distributed:
        check_distributed(cfg, info.world_size)
    if info.is_main:
        rundir.remove_stale_temps()
    if not cfg.resume:
        if info.is_main:
            rundir.check_fresh(cfg)
        return None
    if not rundir.checkpoint_path.is_file():
        raise UsageError(f"--resume: no checkpoint at {rundir.checkpoint_path}; "
                         "run without --resume to start")
    ckpt = rundir.load_checkpoint()
    rundir.check_holds(cfg, load_config(None, {}, base=ckpt["config"]), resume=True)
    if int(ckpt.get("world_size", 1)) != info.world_size:  # the batches depend on the world
        raise UsageError(f"--resume: the checkpoint was written by {ckpt.get('world_size', 1)} "
                         f"process(es), this run has {info.world_size}; "
                         "resume with the same number")
    # CPU reductions depend on the thread count, and result.json records one count for the run.
    threads = ckpt.get("threads")
    if threads is not None and int(threads) != torch.get_num_threads():
        raise UsageError(f"--resume: the run was computed with {threads} CPU thread(s), this "
                         f"process has {torch.get_num_threads()} (--threads or OMP_NUM_THREADS); "
                         f"resume with --threads {threads}")
    return ckpt


def _closure(parts: RunParts, x: Tensor, y: Tensor,
             meter: dict[str, Tensor]) -> Callable[..., Tensor]:
    """Forward + backward on (x, y) in `accumulate` micro-batches (each loss weighted by its
    share, so their gradients sum to the part's mean); counts correct predictions in the passes
    the optimizer runs at theta. For a method whose record says ``closure="per-sample"``:
    ``closure(index=None, backward=True)`` runs on the rows ``index`` of (x, y) (all when None),
    backward only when ``backward``, and returns the per-sample losses (shape (n,))."""
    cfg, opt = parts.cfg, parts.opt
    per_sample = parts.method.closure == "per-sample"

    def closure(index: Tensor | None = None, backward: bool = True) -> Tensor:
        xs, ys = (x, y) if index is None else (x[index], y[index])
        if backward:
            meter["samples"] += len(ys)  # images through forward + backward (no host sync)
        total = torch.zeros((), device=parts.device)
        each: list[Tensor] = []
        micro = zip(xs.tensor_split(cfg.accumulate), ys.tensor_split(cfg.accumulate))
        for i, (xm, ym) in enumerate(micro):
            # DDP: forward and backward in no_sync for all but the last micro-batch.
            with accumulation_context(parts.ddp, i, cfg.accumulate) if backward else \
                    contextlib.nullcontext():
                with parts.autocast():
                    logits = parts.fwd(xm).float()
                if per_sample:
                    losses = _per_sample_loss(parts.criterion, logits, ym)
                    each.append(losses.detach())
                    loss = losses.sum() / len(ys)
                else:
                    loss = parts.criterion(logits, ym) * (len(ym) / len(ys))
                if backward:
                    opt.backward(loss)
            total += loss.detach()
            if opt.at_theta:
                meter["correct"] += (logits.detach().argmax(1) == ym).sum()
        return torch.cat(each) if per_sample else total

    return closure


def _per_sample_loss(criterion: Any, logits: Tensor, y: Tensor) -> Tensor:
    """The criterion's loss of each sample (its ``reduction`` set to "none" for this call)."""
    saved = criterion.reduction
    criterion.reduction = "none"
    try:
        return criterion(logits, y)
    finally:
        criterion.reduction = saved


def _step(parts: RunParts, x: Tensor, y: Tensor, meter: dict[str, Tensor]) -> None:
    """One optimizer step on the batch (x, y), adding its loss and skip count to `meter`."""
    opt, fixed = parts.opt, None
    if parts.fixed is not None and parts.method.splits_batch:  # rows: [B^t from S^t | B^v]
        n_t = cast(tuple[int, int], parts.split_parts)[0] // parts.info.world_size
        fixed = ((x[:n_t], y[:n_t]), (x[n_t:], y[n_t:]))

    def split(batch: tuple[Tensor, Tensor]) -> tuple[Any, Any]:
        x_t, y_t, x_v, y_v = split_batch(*batch, ratio=parts.cfg.split_ratio,
                                         generator=parts.split_gen)
        return (x_t, y_t), (x_v, y_v)

    sizes: list[int] = []  # samples of each closure's part: B, or B^t then B^v

    def closure_of(batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
        sizes.append(len(batch[1]))
        return _closure(parts, *batch, meter)

    opt.step(*step_closures(parts.method, closure_of, (x, y), split=split, parts=fixed))
    if len(sizes) > 1:
        meter["loss"] += opt.stats["loss_val"] * sizes[1]  # B^v at theta (it ran first)
    meter["loss"] += opt.stats["loss_train"] * sizes[0]
    if "cos_train_val" in opt.stats:
        meter["cos"] += opt.stats["cos_train_val"]
    meter["skipped"] += opt.stats["skipped"]


def _last_step(parts: RunParts) -> int:
    """The step count at which the run stops: its planned steps, or ``max_steps`` if fewer."""
    planned = planned_steps(parts.cfg, parts.steps_per_epoch)
    return planned if parts.cfg.max_steps is None else min(planned, parts.cfg.max_steps)


def _train_epoch(parts: RunParts, state: RunState, epoch: int) -> dict[str, float]:
    """The steps of one epoch; returns its sums over ranks (one host sync)."""
    cfg, info = parts.cfg, parts.info
    parts.fwd.train()
    meter = {k: torch.zeros((), device=parts.device)
             for k in ("loss", "correct", "cos", "skipped", "samples")}
    seen = steps = 0
    index = epoch_index(cfg, len(cast(Sized, parts.data.train)), parts.fixed, epoch,
                        info.world_size)
    local = shard_columns(index, info, parts.split_parts)  # (steps, |B| / world) for this rank
    bar = progress(cfg, info.is_main, len(index), epoch)
    epoch_lr = parts.opt.param_groups[0]["lr"]
    rows = batches(parts.data.train, parts.tensors, local, cfg, epoch, parts.device, info.rank)
    for x, y in rows:
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = parts.opt.param_groups[0]["lr"]
        try:
            _step(parts, x, y, meter)
        except FloatingPointError as exc:
            raise TrainingDiverged(f"training diverged at epoch {epoch + 1}, "
                                   f"step {state.step + 1}: {exc}; lower --lr") from None
        parts.scheduler.step()
        seen, steps, state.step = seen + len(y), steps + 1, state.step + 1
        if parts.logger is not None:  # a host sync per step, only when logging
            stats = {k: float(v) for k, v in parts.opt.stats.items()}
            parts.logger.log_step(state.step, {"lr": lr, **stats})
        bar.update(1)
        if state.step >= _last_step(parts):
            break
    bar.close()
    meter["seen"] = torch.tensor(float(seen), device=parts.device)
    meter["steps"] = torch.tensor(float(steps), device=parts.device)
    totals = all_reduce_sum(meter)  # sums over ranks
    return {"lr": epoch_lr, **dict(zip(totals, torch.stack(list(totals.values())).tolist()))}


def _evaluate(parts: RunParts, state: RunState, epoch: int, totals: dict[str, float],
              started: float) -> dict[str, Any]:
    """The epoch's metrics row (train sums, then test loss and accuracy), or TrainingDiverged."""
    cfg, world = parts.cfg, parts.info.world_size
    seen = max(totals["seen"], 1)
    train_loss = totals["loss"] / seen
    steps, skipped = totals["steps"] / world, totals["skipped"] / world  # every rank skips alike
    where = f"training diverged at epoch {epoch + 1}, step {state.step}"
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"{where}: the mean training loss is {train_loss}; lower --lr")
    if steps >= SKIP_MIN_STEPS and skipped >= SKIP_FRACTION * steps:
        raise TrainingDiverged(f"{where}: {round(skipped)} of {round(steps)} fp16 steps were "
                               "skipped for non-finite gradients; lower --lr")
    broadcast_buffers(parts.ddp)  # every rank evaluates (and rank 0 saves) rank 0's BatchNorm stats
    test_loss, test_acc = evaluate(parts.eval_fwd, parts.data.test, parts.device, parts.autocast,
                                   cfg.channels_last, parts.info)
    row: dict[str, Any] = {
        "epoch": epoch + 1, "lr": totals["lr"], "train_loss": train_loss,
        "train_acc": 100.0 * totals["correct"] / seen, "test_loss": test_loss,
        "test_acc": test_acc, "steps": state.step,
    }
    if parts.method.splits_batch:
        row["cos_train_val"] = totals["cos"] / max(steps * world, 1)  # mean over ranks too
    if cfg.amp == "fp16":
        row["skipped_steps"] = round(skipped)
    # forward + backward work per step counted in this epoch, in batches (SAM: 2.0)
    row["batch_equivalents"] = totals["samples"] / seen
    row["epoch_seconds"] = time.perf_counter() - started
    return row


def _record(parts: RunParts, state: RunState, rundir: RunDir, row: dict[str, Any]) -> None:
    """Keep the epoch: checkpoint first, then metrics.jsonl (so it is never ahead of the
    checkpoint), the progress line and the loggers. Only rank 0 writes."""
    state.metrics.append(row)
    state.epoch = row["epoch"]
    info = parts.info
    rng = capture_rng({"split": parts.split_gen})
    rng_ranks = gather_to_main(rng) if info.distributed else None
    if not info.is_main:
        return
    rundir.save_checkpoint(checkpoint_state(parts, state, rng, rng_ranks))
    rundir.write_metrics(state.metrics)
    if parts.cfg.progress:
        from tqdm.auto import tqdm

        tqdm.write(format_row(row, planned_epochs(parts.cfg, parts.steps_per_epoch)))
    if parts.logger is not None:
        parts.logger.log_epoch(state.epoch, row)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _result(parts: RunParts, state: RunState, *, status: str,
            error: str | None = None) -> dict[str, Any]:
    """result.json: the run's summary. A diverged run reports no accuracy: its last good epoch
    is in the checkpoint and metrics.jsonl."""
    cfg, last = parts.cfg, (state.metrics[-1] if state.metrics else {})
    finished = status == "finished"
    best = max((m["test_acc"] for m in state.metrics), default=None)
    result: dict[str, Any] = {
        "status": status,
        "final_test_acc": last.get("test_acc") if finished else None,
        "best_test_acc": best if finished else None,
        "final_test_loss": last.get("test_loss") if finished else None,
        "final_train_acc": last.get("train_acc") if finished else None,
        "final_train_loss": last.get("train_loss") if finished else None,
        "eval_split": "holdout" if cfg.val_fraction > 0 else "test",
        "epochs_completed": len(state.metrics),
        "steps": state.step,
        "total_seconds": state.seconds(),
        "noise_rate_realized": float(parts.data.noise_rate_realized),
        "num_params": parts.num_params,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "optimizer": cfg.optimizer,
        "method_settings": method_settings(cfg),
        # forward + backward work per step, counted, in batches: mean over the epochs
        # (epochs written by 0.2 did not count it)
        "batch_equivalents": _mean([m["batch_equivalents"] for m in state.metrics
                                    if "batch_equivalents" in m]),
        "seed": cfg.seed,
        "device": str(parts.device),
        "world_size": parts.info.world_size,
        **machine_info(),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "config": config_to_dict(cfg),
    }
    if error is not None:
        result["error"] = error
        # checkpoint.pt holds this epoch (None: it diverged before the first checkpoint)
        result["last_good_checkpoint_epoch"] = state.epoch or None
    return result


def _finish(parts: RunParts, state: RunState, rundir: RunDir) -> dict[str, Any]:
    """result.json, after checking that every rank holds the same weights."""
    result = _result(parts, state, status="finished")
    if parts.info.distributed:  # all ranks must hold bit-identical weights; RuntimeError otherwise
        broadcast_buffers(parts.ddp)
        result["replica_sha256"] = verify_replicas(parts.ddp)
    if parts.info.is_main:
        rundir.write_result(result)
    return result


def load_trained(run_dir: Any, device: str | torch.device = "cpu") -> tuple[Any, TrainConfig]:
    """The model of a finished (or interrupted) run, rebuilt from its config with the
    checkpoint's weights, in eval mode on `device`; and its config."""
    return RunDir(run_dir).load_trained(device)
