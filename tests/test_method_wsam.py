"""WSAM against a reference written from Yue et al. (KDD 2023) in float64
(coupled and decoupled), and pytorch_optimizer's WSAM on the same steps."""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_optimizer import WSAM as PeerWSAM
from tests._family import (
    BASES,
    batches,
    groups,
    loss_of,
    make_model,
    max_diff,
    norm,
    run_method,
)

from agnostic_sam import LossScaler
from agnostic_sam.methods import create_optimizer

EPS = 1e-12
GAMMA = 0.6  # a = gamma / (1 - gamma) = 1.5


def _reference(base: str, decouple: bool, gamma: float = GAMMA, rho: float = 0.1):
    """The weights after 20 steps: the base optimizer steps with g_c + a s, or (decouple) with
    g_c followed by theta -= lr a s, s = g(theta + e) - g(theta), e = rho g_c / (||g_c|| + eps)."""
    a = gamma / (1 - gamma)
    model = make_model()
    params = list(model.parameters())
    cls, kwargs = BASES[base]
    opt = cls(groups(model, {"rho": 0.2}), **kwargs)
    group_of = [g for g in opt.param_groups for _ in g["params"]]
    data = batches()

    def grad_at(weights, step):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        return list(torch.autograd.grad(loss_of(probe, *data[step]), list(probe.parameters())))

    for step in range(len(data)):
        theta = [p.detach().clone() for p in params]
        g_c = grad_at(theta, step)
        n = norm(g_c)
        e = [group.get("rho", rho) * g / (n + EPS) for g, group in zip(g_c, group_of)]
        s = [gs - gc for gs, gc in zip(grad_at([t + ei for t, ei in zip(theta, e)], step), g_c)]
        for p, gc, si in zip(params, g_c, s):
            p.grad = gc.clone() if decouple else gc + a * si
        opt.step()
        if decouple:
            with torch.no_grad():
                for p, si, group in zip(params, s, group_of):
                    p.add_(-group["lr"] * a * si)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_wsam_equals_the_papers_rule(base, decouple) -> None:
    ours = run_method("wsam", base, {"rho": 0.1, "gamma": GAMMA, "decouple": decouple},
                      per_group={"rho": 0.2})
    ref = _reference(base, decouple)
    diff = max_diff(ours, ref)
    print(f"wsam vs paper reference ({base}, decouple={decouple}, float64, 20 steps): "
          f"max diff {diff:.3g}")
    assert diff < 1e-9


def test_wsam_gamma_half_coupled_is_sam() -> None:
    # a = 1: g_c + (g_s - g_c) = g_s up to rounding; the perturbation is SAM's, bit for bit.
    sam = run_method("sam", "sgd", {"rho": 0.1}, per_group={"rho": 0.2})
    ours = run_method("wsam", "sgd", {"rho": 0.1, "gamma": 0.5, "decouple": False},
                      per_group={"rho": 0.2})
    assert max_diff(ours, sam) < 1e-12


def _step_with(opt, model, factor_at_pass: dict[int, float]) -> None:
    x, y = batches()[0]
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(model, x, y) * factor_at_pass.get(calls[0], 1.0)
        opt.backward(loss)
        return loss

    opt.step(closure)


def test_a_non_finite_sharpness_gradient_refuses_the_step() -> None:
    # decouple=True steps with g_c (finite here); s = g_s - g_c is not: refused, not applied.
    model = make_model()
    opt = create_optimizer("wsam", groups(model), *BASES["sgd"], settings={"rho": 0.1})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="at theta \\+ e"):
        _step_with(opt, model, {2: float("inf")})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_skipped_step_makes_no_decoupled_move() -> None:
    model = make_model()
    opt = create_optimizer("wsam", groups(model), *BASES["sgd"], settings={"rho": 0.1},
                           loss_scaler=LossScaler(init_scale=2.0**10))
    before = [p.detach().clone() for p in model.parameters()]
    _step_with(opt, model, {2: float("inf")})
    assert float(opt.stats["skipped"]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _peer_run(decouple: bool) -> list[torch.Tensor]:
    """pytorch_optimizer's WSAM over the same model, groups and batches (its protocol: step(closure)
    runs the closure at theta and at theta + e)."""
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = PeerWSAM(model, groups(model, {"rho": 0.2}), cls, rho=0.1, gamma=GAMMA,
                   decouple=decouple, max_norm=None, foreach=False, **kwargs)
    for x, y in batches():
        opt.zero_grad()

        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("decouple", [True, False])
def test_pytorch_optimizer_wsam_differs_only_by_its_float32_norm(decouple) -> None:
    # Same rule, same weight decay (the base optimizer's, on g_c or g_c + a s) and the same
    # decoupled move (-lr a s after the base step); its ||g_c|| is summed in float32 even for
    # float64 weights, and it restores theta by subtracting e (not bit for bit).
    ours = run_method("wsam", "sgd", {"rho": 0.1, "gamma": GAMMA, "decouple": decouple},
                      per_group={"rho": 0.2})
    diff = max_diff(ours, _peer_run(decouple))
    print(f"wsam vs pytorch_optimizer 4.1 (decouple={decouple}, float64 weights, 20 steps): "
          f"max diff {diff:.3g}")
    assert diff < 1e-7


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_foreach_equals_the_loop(decouple) -> None:
    settings = {"rho": 0.1, "gamma": GAMMA, "decouple": decouple}
    loop = run_method("wsam", "adamw", settings, per_group={"rho": 0.2}, perturb_foreach=False)
    multi = run_method("wsam", "adamw", settings, per_group={"rho": 0.2}, perturb_foreach=True)
    assert max_diff(loop, multi) < 1e-12


def test_wsam_decoupled_move_reads_a_tensor_lr() -> None:
    weights = []
    for lr in (0.1, torch.tensor(0.1, dtype=torch.float64)):
        model = make_model()
        opt = create_optimizer("wsam", groups(model), torch.optim.SGD,
                               {"lr": lr, "momentum": 0.9, "foreach": False},
                               settings={"rho": 0.1, "gamma": GAMMA})
        for step in range(5):
            x, y = batches()[step]

            def closure(x=x, y=y, model=model, opt=opt):
                loss = loss_of(model, x, y)
                opt.backward(loss)
                return loss

            opt.step(closure)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert max_diff(*weights) < 1e-12


@pytest.mark.parametrize("decouple", [True, False])
def test_pytorch_optimizer_wsam_float32(monkeypatch, decouple) -> None:
    import tests.test_method_wsam as this
    from tests.test_method_friendly_sam import in_float32

    in_float32(monkeypatch, this)
    ours = run_method("wsam", "sgd", {"rho": 0.1, "gamma": GAMMA, "decouple": decouple},
                      per_group={"rho": 0.2})
    assert ours[0].dtype == torch.float32
    diff = max_diff(ours, _peer_run(decouple))
    print(f"wsam vs pytorch_optimizer 4.1 (decouple={decouple}, float32, 20 steps): max diff "
          f"{diff:.3g}")
    assert diff < 5e-7  # a few float32 ulps of weights below 1 (ulp(0.5) = 6e-8)
