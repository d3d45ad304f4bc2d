"""AgnosticSAM and SAM against an independent functional reference of Algorithm 1.

The reference below is written with `torch.func` on a dict of tensors and shares no code with
the package: its own gradient, norm, perturbation and SGD (momentum, weight decay) arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from agnostic_sam import SAM, AgnosticSAM

STEPS = 24
LR, MOMENTUM, WD = 0.05, 0.9, 5e-3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def batches(n_steps: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_steps):
        x = torch.randn(20, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (20,), generator=g)
        out.append((x[:14], y[:14], x[14:], y[14:]))  # B^t (0.7), B^v (0.3)
    return out


# ---- the reference -------------------------------------------------------------------------

def ref_loss(model: nn.Module):
    def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def ref_norm(g: dict) -> torch.Tensor:
    return torch.sqrt(sum((v * v).sum() for v in g.values()))


def ref_direction(g: dict, theta: dict, rho: float, eps: float, adaptive: bool) -> dict:
    """rho * T^2 g / (||T g|| + eps), T = |theta| when adaptive (ASAM), else identity."""
    if adaptive:
        tg = {k: theta[k].abs() * g[k] for k in g}
        n = ref_norm(tg)
        return {k: rho * theta[k].abs() ** 2 * g[k] / (n + eps) for k in g}
    n = ref_norm(g)
    return {k: rho * g[k] / (n + eps) for k in g}


def ref_sgd(theta: dict, g: dict, buf: dict | None) -> tuple[dict, dict]:
    d = {k: g[k] + WD * theta[k] for k in g}
    buf = d if buf is None else {k: MOMENTUM * buf[k] + d[k] for k in g}
    return {k: theta[k] - LR * buf[k] for k in g}, buf


def reference_run(
    method: str, adaptive: bool, rho1: float, rho2: float, eps: float = 1e-12
) -> dict:
    model = make_model()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    dloss = grad(ref_loss(model))
    buf = None
    for xt, yt, xv, yv in batches(STEPS):
        if method == "sam":
            x, y = torch.cat([xt, xv]), torch.cat([yt, yv])
            e = ref_direction(dloss(theta, x, y), theta, rho1, eps, adaptive)
            g = dloss({k: theta[k] + e[k] for k in theta}, x, y)
        else:
            gv = dloss(theta, xv, yv)
            if method == "full":
                ev = ref_direction(gv, theta, rho2, eps, adaptive)
                gv = dloss({k: theta[k] + ev[k] for k in theta}, xv, yv)  # g_v(theta^v)
            et = ref_direction(dloss(theta, xt, yt), theta, rho1, eps, adaptive)
            dv = ref_direction(gv, theta, rho2, eps, adaptive)
            g = dloss({k: theta[k] + et[k] - dv[k] for k in theta}, xt, yt)  # g_t(theta^t)
        theta, buf = ref_sgd(theta, g, buf)
    return theta


# ---- the implementation ---------------------------------------------------------------------

def closure(model, opt, x, y):
    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.backward(loss)
        return loss

    return run


def package_run(method: str, adaptive: bool, rho1: float, rho2: float, foreach: bool) -> dict:
    model = make_model()
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, adaptive=adaptive,
              perturb_foreach=foreach, model=model)
    if method == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho1, **kw)
    else:
        opt = AgnosticSAM(
            model.parameters(), torch.optim.SGD, rho1=rho1, rho2=rho2, variant=method, **kw
        )
    for xt, yt, xv, yv in batches(STEPS):
        if method == "sam":
            x, y = torch.cat([xt, xv]), torch.cat([yt, yv])
            opt.step(closure(model, opt, x, y))
        else:
            opt.step(closure(model, opt, xt, yt), closure(model, opt, xv, yv))
    return {k: v.detach() for k, v in model.named_parameters()}


CASES = [
    ("full", False),
    ("simpler", False),
    ("full", True),
    ("simpler", True),
    ("sam", False),
    ("sam", True),
]


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize(
    ("method", "adaptive"), CASES, ids=[f"{m}-{'asam' if a else 'plain'}" for m, a in CASES]
)
def test_matches_functional_reference(method: str, adaptive: bool, foreach: bool) -> None:
    # Radii large enough that the perturbation visibly changes the trajectory.
    rho1, rho2 = (0.5, 0.25) if not adaptive else (1.0, 0.5)
    ref = reference_run(method, adaptive, rho1, rho2)
    got = package_run(method, adaptive, rho1, rho2, foreach)
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst <= 1e-9, f"worst parameter deviation {worst:.3e}"
    # The run must have moved away from a plain SGD trajectory, or the test proves nothing.
    plain = package_run("sam", False, 0.0, 0.0, foreach)
    assert max((plain[k] - got[k]).abs().max().item() for k in ref) > 1e-4


def test_foreach_and_loop_agree_in_float64() -> None:
    a = package_run("full", True, 0.3, 0.1, foreach=False)
    b = package_run("full", True, 0.3, 0.1, foreach=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-12


def test_per_group_radii_with_global_norm() -> None:
    """Two groups, different rho1/rho2: the norm stays global, the radius is the group's."""
    model = make_model()
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = AgnosticSAM(
        [{"params": first, "rho1": 0.4, "rho2": 0.1}, {"params": rest}],
        torch.optim.SGD, rho1=0.2, rho2=0.3, variant="simpler", lr=LR, perturb_foreach=False,
    )
    names = [k for k, _ in model.named_parameters()]
    rho1 = {k: (0.4 if i < 2 else 0.2) for i, k in enumerate(names)}
    rho2 = {k: (0.1 if i < 2 else 0.3) for i, k in enumerate(names)}
    xt, yt, xv, yv = batches(1)[0]
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    dloss = grad(ref_loss(model))
    gt, gv = dloss(theta, xt, yt), dloss(theta, xv, yv)
    nt, nv = ref_norm(gt), ref_norm(gv)
    pert = {
        k: theta[k] + rho1[k] * gt[k] / (nt + 1e-12) - rho2[k] * gv[k] / (nv + 1e-12)
        for k in theta
    }
    g = dloss(pert, xt, yt)
    expected = {k: theta[k] - LR * g[k] for k in theta}
    opt.step(closure(model, opt, xt, yt), closure(model, opt, xv, yv))
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=0, atol=1e-12)
