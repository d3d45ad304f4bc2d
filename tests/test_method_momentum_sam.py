"""Momentum-SAM against a reference written from Becker et al. (2024) in float64: one gradient per
step, at theta - rho v / (||v|| + eps) with v the base optimizer's momentum."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from tests._family import BASES, STEPS, batches, groups, loss_of, make_model, max_diff, run_method
from torch import Tensor, nn

from agnostic_sam.methods import create_optimizer

EPS = 1e-12
KEYS = {"sgd": "momentum_buffer", "adamw": "exp_avg"}


def _reference(base: str, rho_of, per_group: dict | None = None) -> list[Tensor]:
    """theta after `STEPS` steps of a torch.optim base optimizer stepping with g(theta - rho v /
    (||v|| + eps)), v read from its state (no v yet: g(theta))."""
    model = make_model()
    params = list(model.parameters())
    cls, kwargs = BASES[base]
    opt = cls(groups(model, per_group), **kwargs)
    group_of = [g for g in opt.param_groups for _ in g["params"]]
    data = batches()
    for step in range(STEPS):
        theta = [p.detach().clone() for p in params]
        v = [opt.state[p].get(KEYS[base]) for p in params]
        point = theta
        if all(vi is not None for vi in v):
            n = torch.sqrt(sum((vi * vi).sum() for vi in v))
            point = [t - rho_of(group) * vi / (n + EPS) for t, vi, group in zip(theta, v, group_of)]
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, w in zip(probe.parameters(), point):
                p.copy_(w)
        grads = torch.autograd.grad(loss_of(probe, *data[step]), list(probe.parameters()))
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_momentum_sam_equals_the_papers_rule(base) -> None:
    ours = run_method("momentum-sam", base, {"rho": 0.5}, per_group={"rho": 1.0})
    ref = _reference(base, lambda group: group.get("rho", 0.5), per_group={"rho": 1.0})
    diff = max_diff(ours, ref)
    print(f"momentum-sam {base}: max |ours - reference| over 20 steps = {diff:.3g}")
    assert diff < 1e-9
    assert max_diff(ours, run_method("sgd", base)) > 1e-3  # the perturbation matters


@pytest.mark.parametrize("bad", [
    dict(base=torch.optim.SGD, kwargs={"lr": 0.1}),
    dict(base=torch.optim.SGD, kwargs={"lr": 0.1, "momentum": 0.0}),
    dict(base=torch.optim.Adagrad, kwargs={"lr": 0.1}),
])
def test_momentum_sam_refuses_a_base_without_momentum(bad) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="momentum") as info:
        create_optimizer("momentum-sam", model.parameters(), bad["base"], bad["kwargs"])
    assert "\n" not in str(info.value)


def test_momentum_sam_refuses_a_group_without_momentum() -> None:
    model = make_model()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="momentum > 0"):
        create_optimizer("momentum-sam", [{"params": ps[:2], "momentum": 0.0},
                                          {"params": ps[2:]}], torch.optim.SGD,
                         {"lr": 0.1, "momentum": 0.9})
    opt = create_optimizer("momentum-sam", ps[:2], torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="momentum > 0"):
        opt.add_param_group({"params": ps[2:], "momentum": 0.0})


def test_momentum_sam_one_pass_at_theta_then_perturbed() -> None:
    """Step 1 runs at theta (no v yet); later steps at theta - rho v / ||v||; one pass each,
    flagged at theta (BatchNorm statistics and accuracy in it), and the weights hold theta."""
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("momentum-sam", model.parameters(), cls, kwargs, settings={"rho": 0.5})
    seen: list[tuple[bool, list[Tensor]]] = []
    for x, y in batches(steps=3):
        def closure(x=x, y=y) -> Tensor:
            seen.append((opt.at_theta, [p.detach().clone() for p in model.parameters()]))
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        theta = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        at, weights = seen[-1]
        assert at
        if len(seen) == 1:
            assert all(torch.equal(w, t) for w, t in zip(weights, theta))
        else:
            moved = torch.sqrt(sum(((w - t) ** 2).sum() for w, t in zip(weights, theta)))
            assert abs(float(moved) - 0.5) < 1e-9
        assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))  # stepped
    assert len(seen) == 3


def _train(model: nn.Module, opt, data) -> None:
    for x, y in data:
        def closure(x=x, y=y) -> Tensor:
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)


def test_momentum_sam_resume_mid_run_is_bit_exact() -> None:
    data = batches()
    cls, kwargs = BASES["adamw"]

    def build(seed: int):
        model = make_model(seed)
        return model, create_optimizer("momentum-sam", groups(model), cls, kwargs)

    model, opt = build(0)
    _train(model, opt, data[:7])
    saved = pickle.loads(pickle.dumps((model.state_dict(), opt.state_dict())))
    _train(model, opt, data[7:])
    model2, opt2 = build(1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, data[7:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
