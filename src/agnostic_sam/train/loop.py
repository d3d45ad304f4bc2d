"""`train(cfg)`: the training loop, top to bottom.

One run = data -> model -> optimizer -> per-step cosine schedule -> epochs of (steps, evaluation,
metrics line, checkpoint) -> result.json. Under torchrun every process runs `train` and the model
is wrapped in DDP (see `agnostic_sam.train.distributed` and docs/distributed.md): each rank takes
its |B| / world columns of every batch, metrics are summed over ranks, only rank 0 writes files.

The loop's parts live next to it: `batches` (each epoch's index matrix and its (x, y) batches),
`evaluate` (test loss and accuracy), `setup` (device, seeds, checks before the first file) and
`records` (the run directory's files, the progress line, `load_trained`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.data import build_data, fixed_split
from agnostic_sam.errors import UsageError
from agnostic_sam.models import create_model, load_pretrained
from agnostic_sam.optim import SAM, AgnosticSAM, split_batch
from agnostic_sam.train.batches import RANK_SEED_STRIDE, batches, device_tensors
from agnostic_sam.train.batches import epoch_index as _epoch_index
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
    TrainConfig,
    config_to_dict,
    default_out,
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
    main_process_first,
    shard_columns,
    verify_replicas,
    wrap_model,
)
from agnostic_sam.train.evaluate import evaluate
from agnostic_sam.train.records import (
    CONFIG_NAME,
    METRICS_NAME,
    RESULT_NAME,
    format_row,
    git_commit,
    load_trained,
    metrics_text,
    progress,
)
from agnostic_sam.train.setup import check_distributed as _check_distributed
from agnostic_sam.train.setup import (
    check_same_run,
    resolve_device,
    seed_everything,
    synthetic_options,
    unwrap,
)

__all__ = ["train", "load_trained", "resolve_device"]


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
        check_same_run(ckpt["config"], cfg)
        if int(ckpt.get("world_size", 1)) != world:  # the batches depend on the world size
            raise UsageError(f"--resume: the checkpoint was written by {ckpt.get('world_size', 1)} "
                             f"process(es), this run has {world}; resume with the same number")
    elif ckpt_path.exists():
        raise UsageError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume or choose another --out")

    seed_everything(cfg.seed)
    with main_process_first():  # under DDP rank 0 downloads / caches before the others read
        data = build_data(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                          noise_rate=cfg.noise_rate, seed=cfg.seed, val_fraction=cfg.val_fraction,
                          image_size=cfg.image_size, **synthetic_options(cfg))
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
    model = unwrap(ddp)  # SyncBatchNorm conversion may replace the top module
    if rank > 0:
        seed_everything(cfg.seed + RANK_SEED_STRIDE * rank)
    # TensorDatasets (no random augmentation) are indexed in memory on the device: no DataLoader.
    tensors = device_tensors(data.train, device)

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
        unwrap(model).load_state_dict(ckpt["model"])
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
        atomic_write_text(out / METRICS_NAME, metrics_text(metrics))

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
        bar = progress(cfg, is_main, len(index), epoch)
        for x, y in batches(data.train, tensors, local, cfg, epoch, device, rank):
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
        test_loss, test_acc = evaluate(eval_fwd, data.test, device, autocast, cfg.channels_last, info)
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
                bar.write(format_row(row, cfg.epochs))
            atomic_write_text(out / METRICS_NAME, metrics_text(metrics))
            save_checkpoint(ckpt_path, {
                "model": unwrap(model).state_dict(),
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
        "git_commit": git_commit(),
        "config": config_to_dict(cfg),
    }
    if info.distributed:  # all ranks must hold bit-identical weights; RuntimeError otherwise
        broadcast_buffers(ddp)
        result["replica_sha256"] = verify_replicas(ddp)
    if is_main:
        atomic_write_json(out / RESULT_NAME, result)
    return result
