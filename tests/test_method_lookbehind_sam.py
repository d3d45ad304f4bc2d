"""Lookbehind-SAM against a reference written from Mordido et al. (ICML 2024), Algorithm 1, in
float64: slow weights phi, fast weights f, the accumulated ascent point p, k inner steps."""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
from tests._family import (
    BASES,
    STEPS,
    batches,
    groups,
    loss_of,
    make_model,
    max_diff,
    norm,
    run_method,
)
from torch import Tensor, nn

from agnostic_sam import LossScaler
from agnostic_sam.methods import create_optimizer

EPS = 1e-12


def _reference(base: str, rho_of, k: int, alpha: float | None,
               per_group: dict | None = None) -> list[Tensor]:
    """phi after `STEPS` inner steps: each ascends p += rho g(p) / (||g(p)|| + eps) and steps the
    fast weights with g(p) (a torch.optim base optimizer over them); every k steps phi += a (f -
    phi) with a = alpha, or (1 + cos(f_1 - phi, f_k - phi)) / 2 per tensor; f, p = phi."""
    model = make_model()
    phi = [p.detach().clone() for p in model.parameters()]
    fast_model = copy.deepcopy(model)
    fast = list(fast_model.parameters())
    cls, kwargs = BASES[base]
    opt = cls(groups(fast_model, per_group), **kwargs)
    group_of = [g for g in opt.param_groups for _ in g["params"]]
    data = batches()

    def grad_at(weights: list[Tensor], step: int) -> list[Tensor]:
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        return list(torch.autograd.grad(loss_of(probe, *data[step]), list(probe.parameters())))

    point = [t.clone() for t in phi]
    first: list[Tensor] = []
    for step in range(STEPS):
        g_a = grad_at(point, step)
        n = norm(g_a)
        point = [q + rho_of(group) * g / (n + EPS) for q, g, group in zip(point, g_a, group_of)]
        for f, g in zip(fast, grad_at(point, step)):
            f.grad = g
        opt.step()
        if step % k == 0:
            first = [f.detach().clone() for f in fast]
        if step % k == k - 1:
            new = []
            for ph, f, f1 in zip(phi, fast, first):
                a = alpha
                if a is None:
                    x, y = f1 - ph, f.detach() - ph
                    cos = (x * y).sum() / (x.norm().clamp_min(1e-8) * y.norm().clamp_min(1e-8))
                    a = (1 + cos) / 2
                new.append(ph + a * (f.detach() - ph))
            phi = new
            with torch.no_grad():
                for f, ph in zip(fast, phi):
                    f.copy_(ph)
            point = [t.clone() for t in phi]
    return phi


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("k, alpha", [(2, 0.5), (3, None), (3, 0.8)])
def test_lookbehind_equals_the_papers_rule(base, k, alpha) -> None:
    settings = {"rho": 0.1, "k": k, "alpha": alpha}
    ours = run_method("lookbehind-sam", base, settings, per_group={"rho": 0.2})
    ref = _reference(base, lambda group: group.get("rho", 0.1), k, alpha, per_group={"rho": 0.2})
    diff = max_diff(ours, ref)
    print(f"lookbehind-sam {base} k={k} alpha={alpha}: max |ours - reference| = {diff:.3g}")
    assert diff < 1e-9


def test_lookbehind_k_1_alpha_1_is_sam() -> None:
    sam = run_method("sam", "sgd", {"rho": 0.1})
    ours = run_method("lookbehind-sam", "sgd", {"rho": 0.1, "k": 1, "alpha": 1.0})
    assert max_diff(ours, sam) == 0.0


def _train(model: nn.Module, opt, data, passes: list[int] | None = None) -> None:
    for x, y in data:
        def closure(x=x, y=y) -> Tensor:
            if passes is not None:
                passes.append(int(opt.at_theta))
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)


@pytest.mark.parametrize("cut", [4, 5, 6])  # k = 3: after inner step 1, 2, and a cycle's end
def test_lookbehind_resume_mid_cycle_is_bit_exact(cut) -> None:
    data = batches()
    cls, kwargs = BASES["adamw"]

    def build(seed: int):
        model = make_model(seed)
        return model, create_optimizer("lookbehind-sam", groups(model), cls, kwargs,
                                       settings={"rho": 0.1, "k": 3, "alpha": None})

    model, opt = build(0)
    _train(model, opt, data[:cut])
    saved = pickle.loads(pickle.dumps((model.state_dict(), opt.state_dict())))
    assert saved[1]["lookbehind_step"] == cut
    keys = set().union(*(s.keys() for s in saved[1]["state"].values()))
    assert {"lookbehind_fast", "lookbehind_point", "lookbehind_first"} <= keys or cut % 3 == 0
    _train(model, opt, data[cut:])
    model2, opt2 = build(1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, data[cut:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_lookbehind_model_holds_phi_and_one_pass_per_step_is_at_theta() -> None:
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("lookbehind-sam", model.parameters(), cls, kwargs,
                           settings={"rho": 0.1, "k": 3})
    start = [p.detach().clone() for p in model.parameters()]
    passes: list[int] = []
    _train(model, opt, batches(steps=2), passes)  # mid-cycle: phi has not moved
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start))
    assert passes == [1, 0, 1, 0]
    _train(model, opt, batches(steps=1))  # the cycle's end: phi moves
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), start))
    assert all("lookbehind_fast" not in s for s in opt.state.values())


def test_lookbehind_failed_step_leaves_phi_and_state() -> None:
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("lookbehind-sam", model.parameters(), cls, kwargs,
                           settings={"rho": 0.1, "k": 3})
    data = batches(steps=1)
    _train(model, opt, data)
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = data[0]
    with pytest.raises(FloatingPointError):
        _train(model, opt, [(x * float("nan"), y)])
    after = opt.state_dict()
    assert after["lookbehind_step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert all(torch.equal(v, after["state"][i][key]) for i, s in before["state"].items()
               for key, v in s.items())


class _DDPLike(nn.Module):
    """A model with DDP's no_sync(): records whether each forward ran without synchronization."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_model()
        self.silenced = False

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.silenced = True
        try:
            yield
        finally:
            self.silenced = False


def test_lookbehind_synchronizes_both_passes_under_ddp() -> None:
    """p is state (rank 0's checkpoint holds it): its ascents must use all-reduced gradients."""
    model = _DDPLike()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("lookbehind-sam", model.parameters(), cls, kwargs,
                           settings={"rho": 0.1}, model=model, perturbation="local")
    silenced: list[bool] = []
    for x, y in batches(steps=3):
        def closure(x=x, y=y) -> Tensor:
            silenced.append(model.silenced)
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    assert silenced == [False] * 6


def test_lookbehind_step_skipped_by_loss_scaling_keeps_f_and_p() -> None:
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("lookbehind-sam", model.parameters(), cls, kwargs,
                           settings={"rho": 0.1, "k": 3}, loss_scaler=LossScaler())
    data = batches(steps=2)
    _train(model, opt, data[:1])
    before = copy.deepcopy(opt.state_dict()["state"])
    x, y = data[1]
    _train(model, opt, [(x * float("nan"), y)])
    assert float(opt.stats["skipped"]) == 1.0 and opt.lookbehind_step == 2
    after = opt.state_dict()["state"]
    for i, s in before.items():
        for key in ("lookbehind_fast", "lookbehind_point"):
            assert torch.equal(s[key], after[i][key])
