"""Sharpness on a schedule ("<name>-sched", agnostic_sam.optim.schedule): the method's step on
steps k, 2k, ... (each with probability sharp_prob, a seeded draw), a plain base step otherwise;
against a float64 reference, for every scheduled record, and across a resume."""

from __future__ import annotations

import copy

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
    run_reference,
)

from agnostic_sam.methods import METHODS, create_optimizer, get_method, list_methods
from agnostic_sam.optim.schedule import SharpSchedule

EPS = 1e-12
SCHEDULED = list_methods(lambda m: m.cls is not None and issubclass(m.cls, SharpSchedule))


def _unscheduled(name: str) -> str:
    """The record the scheduled one was derived from (same class and fixed arguments)."""
    info = get_method(name)
    inner = info.cls._schedule_of  # type: ignore[union-attr]
    return next(n for n, m in METHODS.items() if m.cls is inner and m.fixed == info.fixed)


def _run(name: str, base: str, settings: dict, steps: int = 20, **options) -> list[torch.Tensor]:
    model = make_model()
    cls, kwargs = BASES[base]
    # model= gives names (asam) and changes nothing else here (no BatchNorm).
    opt = create_optimizer(name, groups(model, {"rho": 0.2}), cls, kwargs, settings=settings,
                           model=model, **options)
    for x, y in batches(steps=steps):
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _sam_on(sharp, rho_of):
    """SAM's direction on the steps where sharp(t) (t = 1, 2, ...), g(theta) on the others."""
    def direction(step, grad_at, theta, group_of):
        g = grad_at(theta, step)
        if not sharp(step + 1):
            return g
        n = norm(g)
        return grad_at([w + rho_of(gr) * gi / (n + EPS)
                        for w, gi, gr in zip(theta, g, group_of)], step)

    return direction


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_interval_equals_the_rule(base) -> None:
    ours = _run("sam-sched", base, {"rho": 0.1, "interval": 3})
    ref = run_reference(_sam_on(lambda t: t % 3 == 0, lambda gr: gr.get("rho", 0.1)), base,
                        per_group={"rho": 0.2})
    diff = max_diff(ours, ref)
    print(f"sam-sched interval=3 {base}: max |ours - reference| = {diff:.3g}")
    assert diff < 1e-9


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sharp_prob_equals_the_rule_with_the_same_draws(base) -> None:
    ours = _run("sam-sched", base, {"rho": 0.1, "interval": 2, "sharp_prob": 0.5}, seed=4)
    gen = torch.Generator().manual_seed(4)  # one draw per step t with t mod 2 == 0, in order
    draws = {t: float(torch.rand((), generator=gen)) for t in range(2, 21, 2)}
    sharp = {t for t, u in draws.items() if u < 0.5}
    assert 0 < len(sharp) < 10  # both kinds of steps occur
    ref = run_reference(_sam_on(lambda t: t in sharp, lambda gr: gr.get("rho", 0.1)), base,
                        per_group={"rho": 0.2})
    diff = max_diff(ours, ref)
    print(f"sam-sched sharp_prob=0.5 {base}: max |ours - reference| = {diff:.3g}")
    assert diff < 1e-9
    assert max_diff(_run("sam-sched", base, {"rho": 0.1, "interval": 2, "sharp_prob": 0.5},
                         seed=5), ref) > 1e-9  # the seed matters


@pytest.mark.parametrize("name", SCHEDULED)
def test_every_step_sharp_is_the_method_and_none_is_the_base_optimizer(name) -> None:
    inner = _unscheduled(name)
    assert max_diff(_run(name, "sgd", {"interval": 1}, steps=6),
                    _run(inner, "sgd", {}, steps=6)) == 0.0
    assert max_diff(_run(name, "sgd", {"interval": 1, "sharp_prob": 0.0}, steps=6),
                    _run("sgd", "sgd", {}, steps=6)) == 0.0


def test_draws_resume_bit_for_bit() -> None:
    data = batches(steps=12)
    settings = {"rho": 0.1, "interval": 1, "sharp_prob": 0.5}

    def build(model):
        return create_optimizer("sam-sched", model.parameters(), *BASES["sgd"],
                                settings=settings, seed=9)

    def train(opt, model, part):
        for x, y in part:
            def closure(x=x, y=y):
                loss = loss_of(model, x, y)
                opt.backward(loss)
                return loss

            opt.step(closure)

    whole = make_model()
    train(build(whole), whole, data)
    first = make_model()
    opt = build(first)
    train(opt, first, data[:5])
    state = copy.deepcopy(opt.state_dict())
    assert state["schedule"]["step"] == 5
    later = copy.deepcopy(first)
    opt2 = build(later)
    opt2.load_state_dict(state)
    train(opt2, later, data[5:])
    assert max_diff([p.detach() for p in whole.parameters()],
                    [p.detach() for p in later.parameters()]) == 0.0
    # Without the schedule's state the draws restart: other weights (the check can fail).
    fresh = copy.deepcopy(first)
    opt3 = build(fresh)
    state.pop("schedule")
    opt3.load_state_dict(state)
    train(opt3, fresh, data[5:])
    assert max_diff([p.detach() for p in whole.parameters()],
                    [p.detach() for p in fresh.parameters()]) > 1e-9


def test_sharp_fraction_and_cost() -> None:
    model = make_model()
    opt = create_optimizer("sam-sched", model.parameters(), *BASES["sgd"],
                           settings={"interval": 1, "sharp_prob": 0.3}, seed=1)
    n = 4000
    frac = sum(opt._sharp_now() for _ in range(n)) / n
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    info = get_method("sam-sched")
    assert info.batch_equivalents(0.5, {"interval": 4}) == 1.25  # 1 + 1/k
    assert info.batch_equivalents(0.5, {"interval": 1, "sharp_prob": 0.3}) == 1.3  # 1 + p
    # only methods without state across steps get a schedule (theirs would go stale between)
    assert "looksam-sched" not in list_methods() and "wsam-sched" in list_methods()
    assert info.random and "schedule" in info.state


def test_bad_schedule_settings_are_one_line() -> None:
    model = make_model()
    for bad in ({"interval": 0}, {"sharp_prob": 1.5}, {"interval": 2.5}):
        with pytest.raises(ValueError, match="interval|sharp_prob"):
            create_optimizer("sam-sched", model.parameters(), *BASES["sgd"], settings=bad)
