"""VaSSO against a reference written from Li & Giannakis (NeurIPS 2023) in float64,
and its state d across a state_dict round trip and a skipped step."""

from __future__ import annotations

import pickle

import pytest
import torch
from tests._family import (
    BASES,
    batches,
    groups,
    loss_of,
    make_model,
    max_diff,
    norm,
    run_method,
    run_reference,
)

from agnostic_sam import LossScaler
from agnostic_sam.methods import create_optimizer

EPS = 1e-12
SETTINGS = {"rho": 0.1, "theta": 0.4}


def _vasso(theta: float, rho: float = 0.1):
    d: list[torch.Tensor] = []

    def direction(step, grad_at, weights, group_of):
        g = grad_at(weights, step)
        d[:] = [gi.clone() for gi in g] if not d else \
            [(1 - theta) * di + theta * gi for di, gi in zip(d, g)]
        n = norm(d)
        e = [group.get("rho", rho) * di / (n + EPS) for di, group in zip(d, group_of)]
        return grad_at([w + ei for w, ei in zip(weights, e)], step)

    return direction


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_vasso_equals_the_papers_rule(base) -> None:
    ours = run_method("vasso", base, SETTINGS, per_group={"rho": 0.2})
    ref = run_reference(_vasso(0.4), base, per_group={"rho": 0.2})
    diff = max_diff(ours, ref)
    print(f"vasso vs paper reference ({base}, float64, 20 steps): max diff {diff:.3g}")
    assert diff < 1e-9


def test_vasso_theta_one_is_sam() -> None:
    # theta = 1: d = g every step, e = rho g / (||g|| + eps): SAM's perturbation, same bits.
    sam = run_method("sam", "sgd", {"rho": 0.1}, per_group={"rho": 0.2})
    assert max_diff(run_method("vasso", "sgd", {"rho": 0.1, "theta": 1.0},
                               per_group={"rho": 0.2}), sam) == 0.0


def _optimizer(model, **options):
    return create_optimizer("vasso", groups(model, {"rho": 0.2}), *BASES["adamw"],
                            settings=SETTINGS, **options)


def _step(model, opt, step: int, factor: float = 1.0) -> None:
    x, y = batches()[step]

    def closure():
        loss = loss_of(model, x, y) * factor
        opt.backward(loss)
        return loss

    opt.step(closure)


def test_vasso_state_dict_round_trip_is_bit_exact() -> None:
    whole = make_model()
    opt = _optimizer(whole)
    for step in range(20):
        _step(whole, opt, step)
        if step == 9:
            saved = pickle.loads(pickle.dumps((whole.state_dict(), opt.state_dict())))
    assert all("vasso_d" in s for s in saved[1]["state"].values())  # d travels in the state
    resumed = make_model(seed=1)
    resumed.load_state_dict(saved[0])
    opt2 = _optimizer(resumed)
    opt2.load_state_dict(saved[1])
    for step in range(10, 20):
        _step(resumed, opt2, step)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_a_skipped_step_leaves_d_alone() -> None:
    model = make_model()
    opt = _optimizer(model, loss_scaler=LossScaler(init_scale=2.0**10))
    _step(model, opt, 0)
    first = next(model.parameters())
    before = {k: v.clone() for k, v in opt.state[first].items()}
    _step(model, opt, 1, factor=float("inf"))  # the loss scaler skips this step
    assert float(opt.stats["skipped"]) == 1.0
    assert all(torch.equal(before[k], opt.state[first][k]) for k in before)


def test_vasso_foreach_equals_the_loop() -> None:
    loop = run_method("vasso", "adamw", SETTINGS, per_group={"rho": 0.2}, perturb_foreach=False)
    multi = run_method("vasso", "adamw", SETTINGS, per_group={"rho": 0.2}, perturb_foreach=True)
    assert max_diff(loop, multi) < 1e-12
