"""timm: the sharpness-aware optimizers in timm's optimizer registry, and the step for a
timm-style training loop.

    from agnostic_sam.integrations import timm as asam_timm
    asam_timm.register()
    opt = timm.optim.create_optimizer_v2(model, "agnostic-sam", lr=0.1, weight_decay=5e-4)
    for x, y in loader:
        asam_timm.train_step(opt, lambda b: criterion(model(b[0]), b[1]), (x, y), generator=gen)

`register()` adds every sharpness-aware method of the registry (`agnostic_sam.methods`) over
every base optimizer of the registry, with timm's weight-decay parameter groups (no decay for
biases and norms) and momentum 0.9 unless given; a method's settings are keywords of
`create_optimizer_v2` (``rho=``, ``alpha=``, ...):

    <method>-<base>      e.g. sam-sgd, agnostic-sam-adamw, gsam-sgd, looksam-adamw
    <method>             the same over SGD, for hyphenated names only (agnostic-sam, ...)

The names use hyphens because timm splits a name at "_" and keeps the last part (its
"lookahead_" prefix): "agnostic_sam" would look up "sam" and "agnostic_sam_adamw" would build a
plain AdamW. There is deliberately no bare one-word name ("sam", "gsam"), so "agnostic_sam" fails
in timm instead of building SAM; `create_optimizer` here refuses underscore spellings of these
names with the right name, but timm's own `create_optimizer_v2("agnostic_sam_adamw")` cannot be
intercepted.

timm's train loop calls ``optimizer.step()`` after its own backward (through its NativeScaler
too); these optimizers need the closure form and raise a one-line TypeError naming it. Use
`train_step` (closures, accumulation, the loss scaler and the split) in the loop instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from agnostic_sam.integrations._common import Batch, run_step
from agnostic_sam.methods import BASE_OPTIMIZERS, MethodInfo, get_method, list_methods

__all__ = ["NAMES", "create_optimizer", "register", "train_step"]


def _factory(info: MethodInfo, base: type[torch.optim.Optimizer]
             ) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        assert info.cls is not None
        return cast(Any, info.cls)(params, base, **info.fixed, **kwargs)  # a wrapper's signature

    make.__name__ = f"{info.name}_{base.__name__}"
    return make


def _entries() -> dict[str, tuple[Callable[..., torch.optim.Optimizer], str, str]]:
    """name -> (factory, description, base optimizer name), from the two registries."""
    out = {}
    default_base = next(iter(BASE_OPTIMIZERS))  # the first base optimizer: SGD
    for name in list_methods(lambda m: m.tune is not None and m.cls is not None):
        info = get_method(name)
        for base_name, base in BASE_OPTIMIZERS.items():
            entry = (_factory(info, base.cls), f"{info.description}; over {base_name}",
                     base_name)
            out[f"{name}-{base_name}"] = entry
            if "-" in name and base_name == default_base:
                out.setdefault(name, entry)
    return out


def names() -> tuple[str, ...]:
    """The timm names of every registered sharpness-aware method x base optimizer."""
    return tuple(_entries())


NAMES = names()


def register() -> tuple[str, ...]:
    """Add the methods to timm's default optimizer registry (idempotent); returns the names."""
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    entries = _entries()
    for name, (factory, description, base) in entries.items():
        known = default_registry._optimizers.get(name)
        if known is not None and getattr(known.opt_class, "__name__", "") == factory.__name__:
            continue
        # what timm may pass: the keywords the base optimizer's constructor takes
        takes = inspect.signature(BASE_OPTIMIZERS[base].cls).parameters
        default_registry.register(OptimInfo(
            name=name, opt_class=cast(Any, factory), description=description,  # a factory
            has_eps="eps" in takes, has_momentum="momentum" in takes, has_betas="betas" in takes,
        ))
    return tuple(entries)


def create_optimizer(model_or_params: Any, opt: str, **kwargs: Any) -> torch.optim.Optimizer:
    """`timm.optim.create_optimizer_v2` after `register()`, refusing the underscore spellings
    of these names (timm would silently build something else)."""
    from timm.optim import create_optimizer_v2

    spelled = opt.lower().replace("_", "-")
    for prefix in ("", "lookahead-"):
        if "_" in opt and spelled.startswith(prefix) and spelled[len(prefix):] in names():
            raise ValueError(
                f"timm splits optimizer names at '_' and keeps the last part, so {opt!r} would not "
                f"build {spelled[len(prefix):]}: use "
                f"{opt.lower()[:len(prefix)] + spelled[len(prefix):]!r}"
            )
    register()
    return create_optimizer_v2(model_or_params, opt, **kwargs)


def train_step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Batch], Tensor],
    batch: Batch,
    *,
    split_ratio: float = 0.7,
    generator: torch.Generator | None = None,
    micro_batches: int = 1,
    loss_scaler: Any = None,
    max_grad_norm: float | None = None,
) -> Tensor:
    """One sharpness-aware step on `batch` (a tensor or a tuple/dict of tensors) in place of
    timm's ``loss.backward(); optimizer.step()``.

    `loss_fn(part)` returns the mean loss of a part of the batch (run the model, under autocast
    if you use AMP). AgnosticSAM splits the batch into B^t/B^v with `split_batch`'s draw from
    `generator`; every pass runs `micro_batches` slices. `loss_scaler`: a torch.amp.GradScaler or
    timm's NativeScaler (its GradScaler is used; do not call the NativeScaler itself).
    Returns the loss at theta.
    """
    scaler = getattr(loss_scaler, "_scaler", loss_scaler)
    if scaler is not None and not hasattr(scaler, "unscale_"):
        raise TypeError("loss_scaler must be a torch.amp.GradScaler or timm's NativeScaler, got "
                        f"{type(loss_scaler).__name__}")
    from agnostic_sam.integrations._common import batch_len, take

    n = batch_len(batch)
    if (not isinstance(micro_batches, int) or isinstance(micro_batches, bool)
            or not 1 <= micro_batches <= n):
        raise ValueError(f"invalid micro_batches={micro_batches!r}: must be an int in [1, {n}]")
    # run_step joins given micro-batches and re-slices them in as many parts: hand it the slices.
    slices = [take(batch, idx) for idx in torch.arange(n).tensor_split(micro_batches)]
    return run_step(cast(Any, optimizer), loss_fn, slices, split_ratio=split_ratio,  # a method's
                    generator=generator,
                    grad_scaler=scaler, max_grad_norm=max_grad_norm)
