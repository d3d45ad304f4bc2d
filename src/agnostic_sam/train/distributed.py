"""Data-parallel training under torchrun: process group, DDP wrapping, batch sharding, metric
reduction, gradient accumulation and the end-of-run replica check.

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; `init_distributed` reads them. Without them (or with a
world of one) everything here is a no-op and the single-process path runs unchanged.

Batches. Every rank draws the same global index matrix (steps, |B|) from a generator seeded by
(seed, epoch), so sampling is reseeded per epoch and needs no communication; `shard_columns`
gives each rank its |B| / world columns. The Agnostic-SAM family splits each rank's batch into
its share of B^t and B^v, so every rank holds |B^t| / world and |B^v| / world samples: DDP's
gradient mean over ranks is then exactly the mean over the global B^t (or B^v).

Perturbations (the optimizers' ``perturbation=``; see docs/distributed.md):
  * ``"local"``: ascent passes run forward and backward inside ``model.no_sync()``, each rank
    perturbing with its own shard (SAM's m-sharpness, m = |B| / world); one all-reduce per step.
  * ``"synced"``: every pass is all-reduced, so a step equals the single-process step on the
    global batch (to floating-point reduction order).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from agnostic_sam.errors import UsageError
from agnostic_sam.optim.split import split_sizes

__all__ = [
    "DistInfo",
    "accumulation_context",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "distributed_session",
    "gather_to_main",
    "global_split_sizes",
    "init_distributed",
    "is_main",
    "launch_rank",
    "launched_by_torchrun",
    "local_batch_size",
    "main_process_first",
    "replica_digest",
    "shard_bounds",
    "shard_columns",
    "verify_replicas",
    "wrap_model",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among `world_size`, its device, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "nccl" / "gloo"; None for a single process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- process group ---------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """True when RANK and WORLD_SIZE are in the environment (torchrun, or a launcher that
    mimics it)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """The global rank torchrun assigned to this process (0 when not launched by it); valid
    before and after the process group exists, e.g. to print a summary once."""
    return _env_int("RANK", default=0) if launched_by_torchrun() else 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UsageError(
                f"{name} is not set; launch with torchrun, which sets RANK, WORLD_SIZE and "
                "LOCAL_RANK"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 0:
        raise UsageError(f"environment variable {name}={value} must be >= 0")
    return value


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun process group, or describe a single process when not launched by it.

    Backend nccl on CUDA, gloo otherwise. On CUDA the process takes GPU ``LOCAL_RANK`` (select
    GPUs with CUDA_VISIBLE_DEVICES; an index in `device` is ignored under torchrun). A world of
    one is treated as a single process: no process group, no DDP. Reuses a group that is already
    initialized (a library user who set one up).
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not launched_by_torchrun():
        return DistInfo(device=device)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", default=rank)
    if world < 1 or rank >= world:
        raise UsageError(f"RANK={rank} is not below WORLD_SIZE={world}")
    if world == 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={local_rank} but this node has "
                f"{torch.cuda.device_count()} CUDA devices; "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(
            f"distributed training runs on cuda (nccl) or cpu (gloo), not on '{device}'"
        )
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UsageError(f"{name} is not set; launch with torchrun, which sets it")
        dist.init_process_group(backend, rank=rank, world_size=world)
    else:
        backend = str(dist.get_backend())
        if dist.get_rank() != rank or dist.get_world_size() != world:
            raise UsageError(
                f"an initialized process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                f"disagrees with RANK={rank}, WORLD_SIZE={world}"
            )
    return DistInfo(
        rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend
    )


def cleanup(barrier: bool = True) -> None:
    """Leave the process group (idempotent). After a normal end, a barrier first, so that no rank
    tears its communicator down while another still has collectives in flight (gloo aborts the
    process with "terminate called without an active exception" when that happens). After an
    error, no barrier: the other ranks may never arrive, and the failing rank must exit so that
    torchrun stops the rest."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str | torch.device = "auto") -> Iterator[DistInfo]:
    """`init_distributed`, then `cleanup` on the way out only if this call created the group."""
    owned = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    except BaseException:
        if owned:
            cleanup(barrier=False)
        raise
    if owned:
        cleanup()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, or a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if _active():
        dist.barrier()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None elsewhere. Collective.
    A single process gets ``[obj]``."""
    if not _active():
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, a cache), the other ranks after it finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# ---- the model -------------------------------------------------------------------------------

def wrap_model(model: nn.Module, info: DistInfo, *, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (already on ``info.device``) when distributed.

    ``sync_bn`` converts BatchNorm layers to SyncBatchNorm first, so batch statistics are taken
    over the global batch; a single process returns `model` unchanged (plain BatchNorm already
    sees the whole batch). DDP broadcasts rank 0's parameters at construction, so every replica
    starts equal, and keeps ``broadcast_buffers`` (rank 0's BatchNorm running statistics).
    """
    if not info.distributed:
        return model
    if sync_bn:
        if info.device.type != "cuda":
            raise UsageError(
                "--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel); drop it on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _state_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return list(module.state_dict(keep_vars=False).items())


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers only at the start of a synchronized forward, so after the last step
    each rank holds the statistics of its own shard; call this before evaluating or saving so
    every rank evaluates the model that rank 0 checkpoints (and a resume restarts from it).
    """
    if not _active():
        return
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def replica_digest(model: nn.Module) -> str:
    """SHA-256 of the bytes of every parameter and buffer, in state_dict order: equal digests
    mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, t in _state_tensors(model):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify_replicas(model: nn.Module) -> str:
    """Check that every rank holds bit-identical parameters and buffers; return the digest.

    Raises RuntimeError naming the ranks that differ from rank 0 (a bug: replicas must not
    drift). Collective: every rank must call it.
    """
    digest = replica_digest(model)
    if not _active():
        return digest
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RuntimeError(
            f"model replicas differ from rank 0 on ranks {bad}: training state diverged"
        )
    return digest


# ---- batches ---------------------------------------------------------------------------------

def local_batch_size(batch_size: int, world_size: int) -> int:
    """|B| / world, the samples each rank takes from every global batch."""
    if batch_size % world_size != 0:
        raise UsageError(
            f"batch_size {batch_size} is not divisible by the {world_size} processes; "
            f"the global batch is split evenly across ranks, so use a multiple of {world_size}"
        )
    return batch_size // world_size


def global_split_sizes(batch_size: int, ratio: float, world_size: int) -> tuple[int, int]:
    """(|B^t|, |B^v|) of the global batch when each rank splits its |B| / world samples
    (`agnostic_sam.split_sizes` with the world size), as a UsageError for the command line."""
    local_batch_size(batch_size, world_size)
    try:
        return split_sizes(batch_size, ratio, world_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items; the first n % world ranks take one more."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_columns(index: Tensor, info: DistInfo, parts: Sequence[int] | None = None) -> Tensor:
    """This rank's columns of a global batch-index matrix.

    Args:
        index: LongTensor (steps, |B|), the same on every rank (drawn from a seeded generator).
        parts: block widths when a row is a concatenation of blocks (e.g. ``(|B^t|, |B^v|)`` for
            the fixed S^t/S^v split); each block is sharded on its own and the shards are
            concatenated in block order. Default: one block of |B|.

    Returns:
        LongTensor (steps, |B| / world): rank r takes the r-th equal slice of every block, so the
        rank shards of a block partition it. Each block width must be divisible by world.
    """
    if not info.distributed:
        return index
    widths = list(parts) if parts is not None else [index.shape[1]]
    if sum(widths) != index.shape[1]:
        raise ValueError(f"parts {widths} do not add up to the batch width {index.shape[1]}")
    pieces, start = [], 0
    for w in widths:
        size = local_batch_size(w, info.world_size)
        lo = start + info.rank * size
        pieces.append(index[:, lo: lo + size])
        start += w
    return torch.cat(pieces, dim=1)


# ---- metrics and accumulation ----------------------------------------------------------------

def all_reduce_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum 0-d tensors over ranks in one collective (e.g. loss * count, correct, count).

    Returned as float64 0-d tensors on the input device (exact for counts below 2**53); the
    input dict is returned unchanged for a single process.
    """
    if not _active() or not values:
        return values
    keys = list(values)
    flat = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return dict(zip(keys, flat.unbind()))


def accumulation_context(
    model: nn.Module, micro: int, count: int
) -> contextlib.AbstractContextManager[Any]:
    """Context for micro-batch `micro` of `count` inside a closure: ``model.no_sync()`` for all
    but the last one, so DDP all-reduces the accumulated gradient once, on the last backward.

    The last micro-batch runs in whatever context the optimizer set: under a ``local``
    perturbation its ascent passes are already inside no_sync and stay silent.
    """
    if micro < count - 1 and hasattr(model, "no_sync"):
        return cast(Any, model).no_sync()  # DDP's
    return contextlib.nullcontext()
