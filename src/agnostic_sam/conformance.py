r"""The conformance suite: what every registered method must do, checked from its record alone.

As torch's ``optim_db`` runs every optimizer through the same state-dict, dtype and hook tests,
`check_method(name)` runs a registered method through every check in `CHECKS`, with no
per-method code: the record says how to build it, its step shape, its "off" settings and which
setting is per group. A method of your own (registered from ``$AGNOSTIC_SAM_PLUGINS``) is checked
with one call::

    from agnostic_sam.conformance import check_method
    check_method("my-method")        # AssertionError naming the first check that fails

The project's tests parametrize `CHECKS` x `list_methods()` (tests/test_conformance.py). Each
check builds small CPU models (float64 where arithmetic is compared) and compares weights bit for
bit where the operations are the same.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.methods import MethodInfo, create_optimizer, get_method
from agnostic_sam.methods.step import step_closures
from agnostic_sam.optim import accumulate, split_batch

__all__ = ["CHECKS", "check_method"]

_BASE: tuple[type[torch.optim.Optimizer], dict[str, Any]] = (
    torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3})
_STEPS = 6


def _mlp(dtype: torch.dtype = torch.float64, seed: int = 0,
         batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 10)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(10))
    layers += [nn.Tanh(), nn.Linear(10, 4)]
    return nn.Sequential(*layers).to(dtype)


def _data(dtype: torch.dtype = torch.float64, steps: int = _STEPS,
          size: int = 20) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(size, 6, generator=gen).to(dtype), torch.randint(0, 4, (size,),
                                                                           generator=gen))
            for _ in range(steps)]


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def _closure(info: MethodInfo, model: nn.Module, batch: tuple[Tensor, Tensor],
             backward: Callable[[Tensor], None], micro: int = 1) -> Callable[..., Tensor]:
    """A closure of the record's protocol on ``batch``: mean loss (``micro`` micro-batches),
    or per-sample losses for ``closure="per-sample"``."""
    x, y = batch
    if info.closure == "per-sample":
        def per_sample(index: Tensor | None = None, backward_: bool = True, **kw: Any) -> Tensor:
            do_backward = kw.get("backward", backward_)
            xs, ys = (x, y) if index is None else (x[index], y[index])
            losses = F.cross_entropy(_logits(model, xs), ys, reduction="none")
            if do_backward:
                backward(losses.mean())
            return losses.detach()

        return per_sample
    return accumulate(lambda a, b: F.cross_entropy(_logits(model, a), b), (x, y), micro, backward)


class _Run:
    """One method over ``model``, stepping batches the way every consumer does."""

    def __init__(self, name: str, net: nn.Module, settings: dict[str, Any] | None = None,
                 groups: Any = None, **options: Any) -> None:
        self.info = get_method(name)
        self.model = net
        cls, kwargs = _BASE
        params = groups if groups is not None else net.parameters()
        options.setdefault("model", net)  # as the trainer does: BatchNorm, parameter names
        self.opt = create_optimizer(name, params, cls, kwargs, settings=settings or {},
                                    **options)
        self.gen = torch.Generator().manual_seed(3)

    def step(self, batch: tuple[Tensor, Tensor], *, micro: int = 1, scaler: Any = None) -> None:
        backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else \
            self.opt.backward  # type: ignore[attr-defined]

        def split(b: tuple[Tensor, Tensor]) -> tuple[Any, Any]:
            x_t, y_t, x_v, y_v = split_batch(*b, ratio=0.7, generator=self.gen)
            return (x_t, y_t), (x_v, y_v)

        closures = step_closures(self.info, lambda b: _closure(self.info, self.model, b, backward,
                                                               micro), batch, split=split)
        if scaler is not None:
            scaler.scale(torch.zeros(()))  # a fresh GradScaler makes its scale in scale()
            scaler.step(self.opt, *closures)
            scaler.update()
        else:
            self.opt.step(*closures)

    def weights(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


# ---- the checks: each takes the method's name and raises AssertionError ------------------------

def check_off(name: str) -> None:
    """The method's "off" settings give the base optimizer's step on the last pass's batch (B, or
    B^t for a method that splits it), bit for bit."""
    info = get_method(name)
    run = _Run(name, _mlp(), info.off_settings)
    ref_model = _mlp()
    cls, kwargs = _BASE
    ref = cls(ref_model.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(3)
    for batch in _data():
        part = batch
        if info.splits_batch:
            x_t, y_t, _, _ = split_batch(*batch, ratio=0.7, generator=gen)
            part = (x_t, y_t)
        run.step(batch)
        ref.zero_grad()
        F.cross_entropy(ref_model(part[0]), part[1]).backward()
        ref.step()
    assert _equal(run.weights(), [p.detach() for p in ref_model.parameters()]), (
        f"{name} with {info.off_settings} differs from the base optimizer by "
        f"{_max_diff(run.weights(), list(ref_model.parameters()))}")


def check_state_dict_resume(name: str) -> None:
    """Saving model + optimizer (+ the generator of the split) after 3 steps and loading them
    into fresh objects continues exactly as the uninterrupted run."""
    data = _data()
    whole = _Run(name, _mlp())
    for batch in data[:3]:
        whole.step(batch)
    saved = (copy.deepcopy(whole.model.state_dict()), copy.deepcopy(whole.opt.state_dict()),
             whole.gen.get_state())
    saved = pickle.loads(pickle.dumps(saved))  # as written to disk
    for batch in data[3:]:
        whole.step(batch)
    resumed = _Run(name, _mlp(seed=1))
    resumed.model.load_state_dict(saved[0])
    resumed.opt.load_state_dict(saved[1])
    resumed.gen.set_state(saved[2])
    for batch in data[3:]:
        resumed.step(batch)
    assert _equal(whole.weights(), resumed.weights()), (
        f"{name}: a state_dict round trip changes the run by "
        f"{_max_diff(whole.weights(), resumed.weights())}")


def check_batchnorm_at_theta(name: str) -> None:
    """With ``model=``, BatchNorm running statistics move only in passes at theta: the number of
    batches BatchNorm tracked equals the BatchNorm calls made while ``opt.at_theta``."""
    model = _mlp(batchnorm=True)
    run = _Run(name, model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    calls = {"theta": 0}

    def count(module: nn.Module, args: Any) -> None:
        if run.opt.at_theta:  # type: ignore[attr-defined]
            calls["theta"] += 1

    bn.register_forward_pre_hook(count)
    for batch in _data(steps=3):
        run.step(batch)
    tracked = int(cast(Tensor, bn.num_batches_tracked))  # track_running_stats: a tensor
    assert tracked == calls["theta"], (
        f"{name}: BatchNorm tracked {tracked} batches, but only "
        f"{calls['theta']} passes ran at theta")


def check_loss_scalers_agree(name: str) -> None:
    """fp16 loss scaling through `LossScaler` and through ``torch.amp.GradScaler.step(opt,
    closure)`` give the same weights (float32 model, power-of-two scales)."""
    data = _data(torch.float32, steps=4)
    a = _Run(name, _mlp(torch.float32), loss_scaler=LossScaler(init_scale=2.0**10))
    for batch in data:
        a.step(batch)
    b = _Run(name, _mlp(torch.float32))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in data:
        b.step(batch, scaler=scaler)
    assert _max_diff(a.weights(), b.weights()) <= 1e-6, (
        f"{name}: LossScaler and GradScaler differ by {_max_diff(a.weights(), b.weights())}")


def check_bf16(name: str) -> None:
    """Under bf16 autocast the method runs and stays finite (and close to float32)."""
    data = _data(torch.float32, steps=3)
    run = _Run(name, _mlp(torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in data:
            run.step(batch)
    assert all(torch.isfinite(w).all() for w in run.weights()), f"{name}: bf16 gave non-finite"


def check_accumulation(name: str) -> None:
    """K micro-batches of B/K in every pass equal one pass on B (a model without BatchNorm)."""
    one, four = _Run(name, _mlp()), _Run(name, _mlp())
    for batch in _data():
        one.step(batch)
        four.step(batch, micro=4)
    assert _max_diff(one.weights(), four.weights()) < 1e-12, (
        f"{name}: 4 x B/4 differs from 1 x B by {_max_diff(one.weights(), four.weights())}")


def check_clipping(name: str) -> None:
    """``max_grad_norm`` clips the gradient the base optimizer steps with."""
    run = _Run(name, _mlp(), max_grad_norm=0.01)
    seen: list[float] = []
    base = run.opt.base_optimizer  # type: ignore[attr-defined]

    def before(opt: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    base.register_step_pre_hook(before)
    for batch in _data(steps=3):
        run.step(batch)
    assert seen and all(n <= 0.01 * (1 + 1e-9) for n in seen), (
        f"{name}: the base optimizer stepped with gradient norms {seen}, above max_grad_norm 0.01")


def check_nonfinite(name: str) -> None:
    """A non-finite loss in a step raises FloatingPointError with the weights back at theta and
    the base optimizer's state untouched."""
    run = _Run(name, _mlp())
    data = _data(steps=3)
    run.step(data[0])
    before = run.weights()
    state = copy.deepcopy(run.opt.state_dict())
    x, y = data[1]
    try:
        run.step((x * float("nan"), y))
    except FloatingPointError:
        pass
    else:
        raise AssertionError(f"{name}: a NaN step did not raise FloatingPointError")
    assert _equal(run.weights(), before), f"{name}: the weights moved in a failed step"
    after = run.opt.state_dict()["state"]
    assert all(torch.equal(v, after[k][n]) for k, s in state["state"].items()
               for n, v in s.items() if isinstance(v, Tensor)), (
        f"{name}: the base optimizer's state changed in a failed step")


def check_frozen_and_unused(name: str) -> None:
    """Frozen parameters and parameters without a gradient are left bit for bit alone."""
    model = _mlp()
    first = cast(nn.Linear, model[0])
    first.bias.requires_grad_(False)
    # a parameter of the model its forward never uses (a head trained elsewhere, say)
    model.register_parameter("unused", nn.Parameter(torch.randn(3, dtype=torch.float64)))
    unused = cast(nn.Parameter, model.unused)
    run = _Run(name, model, groups=[{"params": list(model.parameters())}])
    frozen, spare = first.bias.detach().clone(), unused.detach().clone()
    for batch in _data(steps=3):
        run.step(batch)
    assert torch.equal(first.bias, frozen) and torch.equal(unused, spare), (
        f"{name}: a frozen or unused parameter moved")
    assert all(torch.isfinite(w).all() for w in run.weights())


def check_per_group(name: str) -> None:
    """Per-group values of the per-group settings are read: each group given the default
    explicitly equals the default run, and a group given the off value differs."""
    info = get_method(name)
    keys = [s.name for s in info.settings if s.per_group]
    if not keys:
        return
    data = _data(steps=3)
    default = _Run(name, _mlp())
    params = list(_mlp().parameters())
    explicit_model = _mlp()
    ps = list(explicit_model.parameters())
    values = {k: info.defaults[k] for k in keys}
    explicit = _Run(name, explicit_model, groups=[{"params": ps[:2], **values},
                                                  {"params": ps[2:], **values}])
    off_model = _mlp()
    ps = list(off_model.parameters())
    off = {k: v for k, v in info.off_settings.items() if k in keys}
    changed = _Run(name, off_model, groups=[{"params": ps[:2], **off}, {"params": ps[2:]}])
    for batch in data:
        default.step(batch)
        explicit.step(batch)
        changed.step(batch)
    del params
    assert _equal(default.weights(), explicit.weights()), f"{name}: explicit group values differ"
    if off:
        assert not _equal(default.weights(), changed.weights()), (
            f"{name}: a group's {', '.join(off)} was ignored")


def check_add_param_group(name: str) -> None:
    """A group added after construction is stepped, with the method's defaults."""
    model = _mlp()
    ps = list(model.parameters())
    run = _Run(name, model, groups=[{"params": ps[:2]}])
    run.opt.add_param_group({"params": ps[2:]})
    head = ps[2].detach().clone()
    for batch in _data(steps=2):
        run.step(batch)
    assert not torch.equal(ps[2], head), f"{name}: the added group was not stepped"


def check_deepcopy(name: str) -> None:
    """``copy.deepcopy((model, opt))`` is a working, equal optimizer over the copied model."""
    data = _data()
    run = _Run(name, _mlp())
    run.step(data[0])
    model2, opt2 = copy.deepcopy((run.model, run.opt))
    twin = _Run(name, _mlp())
    twin.model, twin.opt = model2, opt2
    twin.gen.set_state(run.gen.get_state())
    for batch in data[1:]:
        run.step(batch)
        twin.step(batch)
    assert _equal(run.weights(), twin.weights()), f"{name}: the deep copy trains differently"


CHECKS: dict[str, Callable[[str], None]] = {
    "off": check_off,
    "state_dict": check_state_dict_resume,
    "batchnorm": check_batchnorm_at_theta,
    "loss_scalers": check_loss_scalers_agree,
    "bf16": check_bf16,
    "accumulation": check_accumulation,
    "clipping": check_clipping,
    "non_finite": check_nonfinite,
    "frozen_unused": check_frozen_and_unused,
    "per_group": check_per_group,
    "add_param_group": check_add_param_group,
    "deepcopy": check_deepcopy,
}


def check_method(name: str) -> None:
    """Run every check of `CHECKS` on method ``name`` (AssertionError names the first failure)."""
    for check in CHECKS.values():
        check(name)
