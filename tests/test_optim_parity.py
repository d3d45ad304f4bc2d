"""The fast step path against a frozen copy of the 0.2 step arithmetic (issue 21), and gradients
present at step entry that are zeros (issue 22, first row).

The reference below is the per-tensor arithmetic of the optimizers as they were before the flat
fast path (clone theta, take each gradient, per-tensor norms stacked in parameter order, group
by group perturbation, per-tensor restore): written out here, independent of the package. The
package must give the same weights bit for bit (the operations are the same, only batched),
and the same statistics; the one reduction whose order changed (the dot product behind
``cos_train_val``) agrees within 1e-12 in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from agnostic_sam import SAM, AgnosticSAM, Plain

STEPS = 8
EPS = 1e-12


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(),
        nn.Linear(16, 3),
    ).to(dtype)


def _groups(model: nn.Module, key_values: dict[str, tuple[float, float]]) -> list[dict]:
    """Two param groups with their own lr and radii (the radii are per group)."""
    ps = list(model.parameters())
    first = {"params": ps[:4], "lr": 0.1, **{k: v[0] for k, v in key_values.items()}}
    second = {"params": ps[4:], "lr": 0.05, **{k: v[1] for k, v in key_values.items()}}
    return [first, second]


def _batches(dtype: torch.dtype, n: int = STEPS):
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        x = torch.randn(24, 6, generator=g, dtype=dtype)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def run() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return run


# ---- the frozen reference ----------------------------------------------------------------------


def _flat_groups(base: torch.optim.Optimizer):
    params, groups = [], []
    for group in base.param_groups:
        for p in group["params"]:
            params.append(p)
            groups.append(group)
    return params, groups


def _pass(params, closure):
    for p in params:
        p.grad = None
    with torch.enable_grad():
        return closure().detach()


def _take(params):
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def _norm(tensors, weights=None):
    """Over the parameters that have a gradient, in parameter order."""
    if weights is not None:
        norms = [(w * t).norm() for w, t in zip(weights, tensors) if t is not None]
    else:
        norms = [t.norm() for t in tensors if t is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def _perturb(params, grads, theta, groups, key, sign, norm, adaptive):
    denom = norm + EPS
    by_group: dict[int, tuple[dict, list[int]]] = {}
    for i, group in enumerate(groups):
        by_group.setdefault(id(group), (group, []))[1].append(i)
    for group, idx in by_group.values():
        for i in idx:
            if grads[i] is None:
                continue
            if adaptive:
                grads[i].mul_(theta[i]).mul_(theta[i])
            grads[i].mul_((sign * group[key]) / denom)
            params[i].add_(grads[i])


def _restore(params, theta):
    for p, t in zip(params, theta):
        p.copy_(t)


@torch.no_grad()
def _ref_sam(base, closure, adaptive):
    params, groups = _flat_groups(base)
    loss = _pass(params, closure)
    theta = [p.detach().clone() for p in params]
    g = _take(params)
    norm = _norm(g, theta if adaptive else None)
    grad_norm = _norm(g) if adaptive else norm
    _perturb(params, g, theta, groups, "rho", 1.0, norm, adaptive)
    _pass(params, closure)
    _restore(params, theta)
    base.step()
    return {"loss_train": loss, "grad_norm_train": grad_norm}


@torch.no_grad()
def _ref_agnostic(base, train, val, variant, adaptive):
    params, groups = _flat_groups(base)
    theta = [p.detach().clone() for p in params]
    weights = theta if adaptive else None
    loss_val = _pass(params, val)
    gv = _take(params)
    norm_v = _norm(gv, weights)
    if variant == "full":
        _perturb(params, gv, theta, groups, "rho2", 1.0, norm_v, adaptive)
        _pass(params, val)
        _restore(params, theta)
        gv = _take(params)
        norm_v = _norm(gv, weights)
    grad_norm_val = _norm(gv) if adaptive else norm_v
    loss_train = _pass(params, train)
    gt = _take(params)
    norm_t = _norm(gt, weights)
    grad_norm_train = _norm(gt) if adaptive else norm_t
    dot = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(gt, gv)
                       if a is not None and b is not None]).sum()
    cos = dot / (grad_norm_train * grad_norm_val).clamp_min(torch.finfo(dot.dtype).tiny)
    _perturb(params, gt, theta, groups, "rho1", 1.0, norm_t, adaptive)
    _perturb(params, gv, theta, groups, "rho2", -1.0, norm_v, adaptive)
    _pass(params, train)
    _restore(params, theta)
    base.step()
    return {"loss_train": loss_train, "loss_val": loss_val, "grad_norm_train": grad_norm_train,
            "grad_norm_val": grad_norm_val, "cos_train_val": cos}


# ---- parity -------------------------------------------------------------------------------------

BASE = dict(momentum=0.9, weight_decay=5e-4)
CASES = [("sam", False), ("sam", True), ("full", False), ("full", True), ("simpler", False),
         ("simpler", True)]


def _pair(method: str, adaptive: bool, dtype: torch.dtype, foreach: bool | None):
    ref, model = _net(dtype), _net(dtype)
    if method == "sam":
        radii = {"rho": (0.3, 0.1)}
        opt = SAM(_groups(model, radii), torch.optim.SGD, adaptive=adaptive,
                  perturb_foreach=foreach, **BASE)
    else:
        radii = {"rho1": (0.4, 0.2), "rho2": (0.2, 0.05)}
        opt = AgnosticSAM(_groups(model, radii), torch.optim.SGD, variant=method,
                          adaptive=adaptive, perturb_foreach=foreach, **BASE)
    base = torch.optim.SGD(_groups(ref, radii), **BASE)
    return ref, base, model, opt


def _run_parity(method, adaptive, dtype, foreach, freeze=False) -> None:
    ref, base, model, opt = _pair(method, adaptive, dtype, foreach)
    if freeze:  # a parameter without a gradient: the list path, not the flat one
        for net in (ref, model):
            net[3].weight.requires_grad_(False)
    for x, y in _batches(dtype):
        n_t = 16
        if method == "sam":
            want = _ref_sam(base, _closure(ref, x, y), adaptive)
            opt.step(_closure(model, x, y))
        else:
            want = _ref_agnostic(base, _closure(ref, x[:n_t], y[:n_t]),
                                 _closure(ref, x[n_t:], y[n_t:]), method, adaptive)
            opt.step(_closure(model, x[:n_t], y[:n_t]), _closure(model, x[n_t:], y[n_t:]))
        for key, value in want.items():
            if key == "cos_train_val":  # one dot over the flat buffer: another summation order
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                torch.testing.assert_close(opt.stats[key], value, rtol=0, atol=tol)
            else:
                assert torch.equal(opt.stats[key], value), key
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
        if a.requires_grad:
            assert torch.equal(base.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"])


@pytest.mark.parametrize("foreach", [None, False], ids=["default", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("method", "adaptive"), CASES,
                         ids=[f"{m}-{'asam' if a else 'plain'}" for m, a in CASES])
def test_bit_identical_to_the_frozen_per_tensor_path(method, adaptive, dtype, foreach) -> None:
    _run_parity(method, adaptive, dtype, foreach)


@pytest.mark.parametrize(("method", "adaptive"), [("sam", True), ("full", True)])
def test_a_parameter_without_gradient_gives_the_same_bits(method, adaptive) -> None:
    _run_parity(method, adaptive, torch.float32, None, freeze=True)


def test_plain_equals_the_base_optimizer_bit_for_bit() -> None:
    ref, model = _net(torch.float32), _net(torch.float32)
    base = torch.optim.SGD(ref.parameters(), lr=0.1, **BASE)
    opt = Plain(model.parameters(), lr=0.1, **BASE)
    for x, y in _batches(torch.float32):
        base.zero_grad()
        _closure(ref, x, y)()
        norm = _norm([p.grad for p in ref.parameters()])
        base.step()
        opt.step(_closure(model, x, y))
        assert torch.equal(opt.stats["grad_norm_train"], norm)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))


def test_at_most_two_gradient_hooks_per_optimizer() -> None:
    """Backward passes are counted by two sentinel parameters, not by a hook on each one."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(30)])
    opt = SAM(model.parameters(), lr=0.1)
    hooked = [p for p in model.parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
    assert len(hooked) <= 2
    del opt


# ---- zeros present at step entry (issue 22, first row) -----------------------------------------


def _zero_by(how: str, model: nn.Module) -> None:
    if how == "model":
        model.zero_grad(set_to_none=False)
    else:  # another optimizer over the same parameters
        torch.optim.SGD(model.parameters(), lr=1.0).zero_grad(set_to_none=False)


@pytest.mark.parametrize("how", ["model", "other-optimizer"])
@pytest.mark.parametrize("method", ["sam", "full"])
def test_zeros_left_after_a_backward_are_no_gradient(method: str, how: str) -> None:
    """backward (e.g. to log a gradient norm), then zero_grad(set_to_none=False) of the model or
    of another optimizer, then the closure step: equal to the plain loop. 0.2 took the zeros for
    davda54's g(theta) (SAM: e = 0, a plain base step) or raised (AgnosticSAM)."""
    dtype = torch.float32
    radii = {"rho": (0.3, 0.3)} if method == "sam" else {"rho1": (0.4, 0.4), "rho2": (0.2, 0.2)}
    ref, model = _net(dtype), _net(dtype)
    if method == "sam":
        ref_opt = SAM(_groups(ref, radii), torch.optim.SGD, **BASE)
        opt = SAM(_groups(model, radii), torch.optim.SGD, **BASE)
    else:
        ref_opt = AgnosticSAM(_groups(ref, radii), torch.optim.SGD, **BASE)
        opt = AgnosticSAM(_groups(model, radii), torch.optim.SGD, **BASE)
    for x, y in _batches(dtype):
        closures = ((_closure(ref, x, y),) if method == "sam"
                    else (_closure(ref, x[:16], y[:16]), _closure(ref, x[16:], y[16:])))
        ref_opt.step(*closures)
        F.cross_entropy(model(x), y).backward()
        _zero_by(how, model)
        closures = ((_closure(model, x, y),) if method == "sam"
                    else (_closure(model, x[:16], y[:16]), _closure(model, x[16:], y[16:])))
        opt.step(*closures)
    worst = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.parameters()))
    assert worst <= 1e-5


def test_gradients_changed_after_their_backward_but_not_zero_stay_davda54s() -> None:
    """Clipped in place after the backward: still the one backward's g(theta), as in 0.2."""
    ref, model = _net(torch.float32), _net(torch.float32)
    ref_opt = SAM(ref.parameters(), lr=0.1, rho=0.2)
    opt = SAM(model.parameters(), lr=0.1, rho=0.2)
    for x, y in _batches(torch.float32, 3):
        for net, o in ((ref, ref_opt), (model, opt)):
            F.cross_entropy(net(x), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            o.step(_closure(net, x, y))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(ref.parameters(), _net(torch.float32)
                                                     .parameters()))
