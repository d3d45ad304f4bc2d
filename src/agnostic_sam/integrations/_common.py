"""What every framework adapter needs: batches as nested tensors (slice, join, split into B^t
and B^v), closures that accumulate micro-batches, and one sharpness-aware step driven by a
loss scaler or not. No framework is imported here."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.methods import method_of
from agnostic_sam.methods.step import step_closures
from agnostic_sam.optim import SharpnessOptimizer, split_sizes

__all__ = ["batch_len", "concat", "ensure_scale", "micro_closure", "run_step", "split", "take"]

Batch = Any  # a tensor, or a tuple / list / dict nesting tensors that share dim 0


def _leaves(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _leaves(v)]
    return []


def _map(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """Apply `fn` to every tensor of `batch`. Scalars (None, bool, int, float, str) are kept; a
    list or tuple without tensors (per-sample strings, lengths, ...) cannot be sliced per
    sample alongside the tensors, so it is refused rather than left whole."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)) and batch and not _leaves(batch):
        raise TypeError(
            f"the batch holds a {type(batch).__name__} without tensors (e.g. per-sample strings): "
            "a sharpness-aware step slices and splits batches per sample, so keep only tensors in "
            "it"
        )
    if isinstance(batch, dict):
        return type(batch)({k: _map(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def batch_len(batch: Batch) -> int:
    """The number of samples: dim 0 of the tensors of `batch` (which must agree)."""
    sizes = {t.shape[0] for t in _leaves(batch) if t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            "a batch must hold tensors that share their first dimension (the samples), "
            f"got first dimensions {sorted(sizes)}"
        )
    return sizes.pop()


def take(batch: Batch, index: Tensor) -> Batch:
    """The samples `index` of every tensor of `batch`."""
    return _map(batch, lambda t: t[index.to(t.device)] if t.dim() > 0 else t)


def concat(batches: Sequence[Batch]) -> Batch:
    """Join micro-batches of the same structure along the sample dimension."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    flat = [_leaves(b) for b in batches]
    if any(len(f) != len(flat[0]) for f in flat):
        raise ValueError("the accumulated micro-batches differ in structure: they cannot be joined")
    for i in range(len(flat[0])):
        shapes = {tuple(f[i].shape[1:]) for f in flat}
        if len(shapes) > 1:
            raise ValueError(
                "the accumulated micro-batches differ in shape beyond the sample dimension "
                f"{sorted(shapes)}: "
                "a sharpness-aware step re-runs them all in every pass, so pad them to one length "
                "(e.g. padding='max_length')"
            )
    joined = iter([torch.cat([f[i] for f in flat]) for i in range(len(flat[0]))])
    return _map(first, lambda t: next(joined))


def split(batch: Batch, ratio: float, generator: torch.Generator | None) -> tuple[Batch, Batch]:
    """(B^t, B^v) exactly as `agnostic_sam.split_batch` draws them from `generator`."""
    n = batch_len(batch)
    n_t, _ = split_sizes(n, ratio)
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=device)
    return take(batch, perm[:n_t]), take(batch, perm[n_t:])


def micro_closure(
    loss_fn: Callable[[Batch], Tensor],
    batch: Batch,
    micro_batches: int,
    backward: Callable[[Tensor], None],
    no_sync: Callable[[], Any] | None = None,
    *,
    per_sample: bool = False,
) -> Callable[..., Tensor]:
    """The closure of `agnostic_sam.accumulate` for nested batches: `micro_batches` slices
    (``tensor_split`` along dim 0), each loss weighted by |B_k| / |B| before `backward`.
    `no_sync` (e.g. DDP's) wraps all micro-batches but the last: one all-reduce per pass.

    With `per_sample` (a method whose record says ``closure="per-sample"``), `loss_fn` returns
    the loss of each sample and the closure is ``closure(index=None, backward=True)``: on the
    samples `index` of the batch (all when None), backward of their mean only when `backward`,
    returning the per-sample losses (shape (n,))."""
    run_backward = backward

    def closure(index: Tensor | None = None, backward: bool = True) -> Tensor:
        part = batch if index is None else take(batch, index)
        n = batch_len(part)
        bounds = [len(c) for c in torch.arange(n).tensor_split(min(micro_batches, n))]
        total: Tensor | None = None
        each: list[Tensor] = []
        start = 0
        for i, size in enumerate(bounds):
            micro = _map(part, _rows(start, size))
            start += size
            last = i == len(bounds) - 1
            loud = no_sync is not None and backward and not last
            with no_sync() if no_sync is not None and loud else contextlib.nullcontext():
                loss = _checked_loss(loss_fn(micro), size, per_sample)
                if per_sample:
                    each.append(loss.detach())
                    weighted = loss.sum() / n
                else:
                    weighted = loss * (size / n)
                if backward:
                    run_backward(weighted)
            total = weighted.detach() if total is None else total + weighted.detach()
        assert total is not None  # a batch has at least one sample
        return torch.cat(each) if per_sample else total

    return closure


def _rows(start: int, size: int) -> Callable[[Tensor], Tensor]:
    """Rows start .. start + size of a tensor (a 0-d one whole)."""
    return lambda t: t[start : start + size] if t.dim() > 0 else t


def _checked_loss(loss: Any, size: int, per_sample: bool) -> Tensor:
    if per_sample:
        if not isinstance(loss, Tensor) or tuple(loss.shape) != (size,):
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError("this method selects samples by their loss: the training step must "
                             "return the loss of each sample (reduction='none'), shape "
                             f"({size},), got {got}")
    elif not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("the training step must return the scalar mean loss of its batch")
    return loss


def ensure_scale(grad_scaler: Any, device: torch.device) -> None:
    """A fresh GradScaler creates its scale in its first `scale()`; `scaler.step` needs it before
    the closures run, so scale a zero once."""
    if getattr(grad_scaler, "_scale", None) is None:
        grad_scaler.scale(torch.zeros((), device=device))


def run_step(
    opt: SharpnessOptimizer,
    loss_fn: Callable[[Batch], Tensor],
    micro_batches: Sequence[Batch],
    *,
    split_ratio: float,
    generator: torch.Generator | None,
    grad_scaler: Any = None,
    max_grad_norm: float | None = None,
    backward: Callable[[Tensor], None] | None = None,
    no_sync: Callable[[], Any] | None = None,
) -> Tensor:
    """One step of `opt` on the union of `micro_batches`, each pass re-running them all.

    A method that splits the batch (its registry record says so) splits the joined batch into
    B^t/B^v (`split_batch`'s draw) and each part into as many micro-batches as were given; the
    others run the joined batch in as many slices.
    `grad_scaler` (a torch.amp.GradScaler) drives the step when given; `max_grad_norm` is set on
    the optimizer for this step (the final gradient is clipped). Returns the loss at theta.
    """
    info = method_of(opt)  # TypeError naming the registered methods for anything else
    if not micro_batches:
        raise RuntimeError("no micro-batch was recorded for this optimizer step")
    k = len(micro_batches)
    batch = concat(list(micro_batches))
    if backward is None:
        backward = ((lambda loss: grad_scaler.scale(loss).backward()) if grad_scaler is not None
                    else opt.backward)
    closures = step_closures(
        info, lambda part: micro_closure(loss_fn, part, k, backward, no_sync,
                                        per_sample=info.closure == "per-sample"), batch,
        split=lambda b: split(b, split_ratio, generator))
    saved = opt.max_grad_norm
    if max_grad_norm is not None and max_grad_norm > 0:
        if saved is not None and saved != max_grad_norm:
            raise ValueError(
                f"gradient clipping is set twice: the optimizer has max_grad_norm={saved} and the "
                f"framework {max_grad_norm}; set one of them"
            )
        opt.max_grad_norm = float(max_grad_norm)
    try:
        if grad_scaler is not None and grad_scaler.is_enabled():
            params = [p for g in opt.param_groups for p in g["params"]]
            ensure_scale(grad_scaler, params[0].device)
            with warnings.catch_warnings():
                # torch announces a change of the protocol the optimizers implement; not the user's.
                warnings.filterwarnings("ignore", "GradScaler is going to stop", FutureWarning)
                loss = grad_scaler.step(opt, *closures)
            grad_scaler.update()
        else:
            loss = opt.step(*closures)
    finally:
        opt.max_grad_norm = saved
    return loss
