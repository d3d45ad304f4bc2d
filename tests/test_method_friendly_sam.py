"""Friendly-SAM against a reference written from Li et al. (CVPR 2024) in float64; its
state across a state_dict round trip; and pytorch_optimizer's FriendlySAM on the same steps."""

from __future__ import annotations

import pickle

import pytest
import torch
from pytorch_optimizer import FriendlySAM as PeerFriendlySAM
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
SETTINGS = {"rho": 0.1, "sigma": 0.8, "lmbda": 0.7}


def _friendly(sigma: float, lmbda: float, raw: bool = True, rho: float = 0.1):
    """The paper's rule; ``raw=False`` updates m with the modified gradient d instead of g (what
    the issue says pytorch_optimizer does), to show that variant is told apart."""
    m: list[torch.Tensor] = []

    def direction(step, grad_at, theta, group_of):
        g = grad_at(theta, step)
        if not m:
            d = g
            m[:] = [gi.clone() for gi in g]
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
            new = g if raw else d
            m[:] = [lmbda * mi + (1 - lmbda) * ni for mi, ni in zip(m, new)]
        n = norm(d)
        e = [group.get("rho", rho) * di / (n + EPS) for di, group in zip(d, group_of)]
        return grad_at([t + ei for t, ei in zip(theta, e)], step)

    return direction


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_friendly_sam_equals_the_papers_rule(base) -> None:
    ours = run_method("friendly-sam", base, SETTINGS, per_group={"rho": 0.2})
    ref = run_reference(_friendly(0.8, 0.7), base, per_group={"rho": 0.2})
    diff = max_diff(ours, ref)
    print(f"friendly-sam vs paper reference ({base}, float64, 20 steps): max diff {diff:.3g}")
    assert diff < 1e-9


def _trained(steps: range, opt_state=None, model_state=None, base: str = "adamw"):
    model = make_model()
    cls, kwargs = BASES[base]
    opt = create_optimizer("friendly-sam", groups(model, {"rho": 0.2}), cls, kwargs,
                           settings=SETTINGS)
    if model_state is not None:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
    data = batches()
    for step in steps:
        x, y = data[step]

        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    return model, opt


def test_friendly_sam_state_dict_round_trip_is_bit_exact() -> None:
    whole, _ = _trained(range(20))
    half, opt = _trained(range(10))
    saved = pickle.loads(pickle.dumps((half.state_dict(), opt.state_dict())))
    assert all("fsam_m" in s for s in saved[1]["state"].values())  # m travels in the state
    resumed, _ = _trained(range(10, 20), opt_state=saved[1], model_state=saved[0])
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_friendly_sam_m_is_the_raw_gradients_average() -> None:
    # After two steps m = lmbda g_1 + (1 - lmbda) g_2, both at theta of their step.
    model, opt = _trained(range(1), base="sgd")
    ref = make_model()
    ref.load_state_dict(model.state_dict())
    x, y = batches()[1]
    g2 = torch.autograd.grad(loss_of(ref, x, y), list(ref.parameters()))
    m1 = [opt.state[p]["fsam_m"].clone() for p in model.parameters()]
    _trained_step(model, opt, 1)
    for p, a, b in zip(model.parameters(), m1, g2):
        torch.testing.assert_close(opt.state[p]["fsam_m"], 0.7 * a + 0.3 * b, rtol=0, atol=1e-15)


def _trained_step(model, opt, step: int) -> None:
    x, y = batches()[step]

    def closure():
        loss = loss_of(model, x, y)
        opt.backward(loss)
        return loss

    opt.step(closure)


def test_a_skipped_step_leaves_m_alone() -> None:
    model2 = make_model()
    scaler = LossScaler(init_scale=2.0**10)
    opt2 = create_optimizer("friendly-sam", groups(model2, {"rho": 0.2}), *BASES["sgd"],
                            settings=SETTINGS, loss_scaler=scaler)
    _trained_step(model2, opt2, 0)
    before = {k: v.clone() for k, v in opt2.state[next(model2.parameters())].items()}
    x, y = batches()[1]

    def overflowing():
        loss = loss_of(model2, x, y) * float("inf")
        opt2.backward(loss)
        return loss

    opt2.step(overflowing)
    assert float(opt2.stats["skipped"]) == 1.0
    after = opt2.state[next(model2.parameters())]
    assert all(torch.equal(before[k], after[k]) for k in before)


def _peer_run(settings: dict) -> list[torch.Tensor]:
    """pytorch_optimizer's FriendlySAM over the same model, groups and batches (its protocol:
    backward at theta, then step(closure) re-runs the closure at theta + e)."""
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = PeerFriendlySAM(groups(model, {"rho": 0.2}), cls, rho=settings["rho"],
                          sigma=settings["sigma"], lmbda=settings["lmbda"], foreach=False,
                          **kwargs)
    for x, y in batches():
        opt.zero_grad()
        loss_of(model, x, y).backward()

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def test_pytorch_optimizer_friendly_sam_differs_only_by_its_float32_norm() -> None:
    # pytorch_optimizer 4.1 takes the raw g into m (the "already-modified gradient" is
    # not what 4.1 does: the modified-m variant below is far from it); what remains is its
    # gradient norm, summed in float32 even for float64 weights.
    ours = run_method("friendly-sam", "sgd", SETTINGS, per_group={"rho": 0.2})
    peer = _peer_run(SETTINGS)
    modified = run_reference(_friendly(0.8, 0.7, raw=False), "sgd", per_group={"rho": 0.2})
    diff, other = max_diff(ours, peer), max_diff(modified, peer)
    print(f"friendly-sam vs pytorch_optimizer 4.1 (float64 weights, 20 steps): max diff "
          f"{diff:.3g}; the modified-m variant vs pytorch_optimizer: {other:.3g}")
    assert diff < 1e-7  # float32 rounding of ||d|| (relative 6e-8) carried through 20 steps
    assert other > 100 * diff


def test_friendly_sam_foreach_equals_the_loop() -> None:
    loop = run_method("friendly-sam", "adamw", SETTINGS, per_group={"rho": 0.2},
                      perturb_foreach=False)
    multi = run_method("friendly-sam", "adamw", SETTINGS, per_group={"rho": 0.2},
                       perturb_foreach=True)
    assert max_diff(loop, multi) < 1e-12


def in_float32(monkeypatch, module) -> None:
    """The harness's model and batches in float32 (pytorch_optimizer's own precision), for
    `tests._family` and for `module`, which imported them."""
    import tests._family as family

    model, data = family.make_model, family.batches

    def f32_model(seed: int = 0):
        return model(seed).float()

    def f32_data(*args, **kwargs):
        return [(x.float(), y) for x, y in data(*args, **kwargs)]

    for mod in (family, module):
        monkeypatch.setattr(mod, "make_model", f32_model)
        monkeypatch.setattr(mod, "batches", f32_data)


def test_pytorch_optimizer_friendly_sam_float32(monkeypatch) -> None:
    import tests.test_method_friendly_sam as this

    in_float32(monkeypatch, this)
    ours = run_method("friendly-sam", "sgd", SETTINGS, per_group={"rho": 0.2})
    assert ours[0].dtype == torch.float32
    diff = max_diff(ours, _peer_run(SETTINGS))
    print(f"friendly-sam vs pytorch_optimizer 4.1 (float32, 20 steps): max diff {diff:.3g}")
    assert diff < 5e-7  # a few float32 ulps of weights below 1 (ulp(0.5) = 6e-8)
