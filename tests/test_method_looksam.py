"""LookSAM against a reference written from Liu et al. (CVPR 2022), Algorithm 1, in float64, and
against pytorch_optimizer's LookSAM (a documented difference: it decomposes per layer)."""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
from tests._family import (
    BASES,
    batches,
    dot,
    groups,
    loss_of,
    make_model,
    max_diff,
    norm,
    run_method,
    run_reference,
)
from torch import Tensor, nn

from agnostic_sam import LossScaler
from agnostic_sam.methods import create_optimizer, get_method

EPS = 1e-12


def _looksam(rho_of, k: int, alpha: float):
    """The paper's rule: SAM steps at n % k == 0 store v = u / (||u|| + eps), u = g_s -
    <g_s, g> / (||g||^2 + eps) g (global); the others step with g + alpha ||g|| v."""
    kept: dict[str, list[Tensor]] = {}

    def direction(step, grad_at, theta, group_of):
        g = grad_at(theta, step)
        if step % k == 0:
            n = norm(g)
            e = [rho_of(group) * gi / (n + EPS) for gi, group in zip(g, group_of)]
            g_s = grad_at([t + ei for t, ei in zip(theta, e)], step)
            coef = dot(g_s, g) / (dot(g, g) + EPS)
            u = [gs - coef * gi for gs, gi in zip(g_s, g)]
            nu = norm(u)
            kept["v"] = [ui / (nu + EPS) for ui in u]
            return g_s
        n = norm(g)
        return [gi + alpha * n * vi for gi, vi in zip(g, kept["v"])]

    return direction


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_looksam_equals_the_papers_rule(base) -> None:
    settings = {"rho": 0.1, "k": 3, "alpha": 0.7}
    ours = run_method("looksam", base, settings, per_group={"rho": 0.2})
    ref = run_reference(_looksam(lambda group: group.get("rho", 0.1), 3, 0.7), base,
                        per_group={"rho": 0.2})
    diff = max_diff(ours, ref)
    print(f"looksam {base}: max |ours - reference| over 20 steps = {diff:.3g}")
    assert diff < 1e-9
    # and the reuse steps matter: alpha = 0 is a different run
    assert max_diff(run_method("looksam", base, {**settings, "alpha": 0.0},
                               per_group={"rho": 0.2}), ours) > 1e-4


def test_looksam_with_k_1_is_sam() -> None:
    sam = run_method("sam", "sgd", {"rho": 0.1})
    assert max_diff(run_method("looksam", "sgd", {"rho": 0.1, "k": 1}), sam) == 0.0


def _train(model: nn.Module, opt, data) -> None:
    for x, y in data:
        def closure(x=x, y=y) -> Tensor:
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)


@pytest.mark.parametrize("cut", [4, 6])  # after a reuse step / right after a SAM step (k = 3)
def test_looksam_resume_mid_run_is_bit_exact(cut) -> None:
    data = batches()
    cls, kwargs = BASES["sgd"]

    def build(seed: int):
        model = make_model(seed)
        return model, create_optimizer("looksam", groups(model), cls, kwargs,
                                       settings={"rho": 0.1, "k": 3})

    model, opt = build(0)
    _train(model, opt, data[:cut])
    saved = pickle.loads(pickle.dumps((model.state_dict(), opt.state_dict())))
    assert saved[1]["looksam_step"] == cut
    assert all("looksam_v" in s for s in saved[1]["state"].values())
    _train(model, opt, data[cut:])
    model2, opt2 = build(1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, data[cut:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_looksam_record_cost_and_passes() -> None:
    info = get_method("looksam")
    assert info.batch_equivalents(0.5, {"k": 4}) == 1.25
    assert info.batch_equivalents(0.5) == 1.2
    counted = []
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("looksam", model.parameters(), cls, kwargs, settings={"k": 4})
    for x, y in batches(steps=8):
        calls = [0]

        def closure(x=x, y=y, calls=calls) -> Tensor:
            calls[0] += 1
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
        counted.append(calls[0])
    assert counted == [2, 1, 1, 1, 2, 1, 1, 1]


# ---- the peer: pytorch_optimizer's LookSAM (float32) ------------------------------------------


def _peer_models(single: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if single:  # one parameter tensor: per layer = global
        model: nn.Module = nn.Sequential(nn.Linear(5, 3, bias=False))
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, copy.deepcopy(model)


def _run_peer(model: nn.Module, data, rho: float, k: int, alpha: float) -> int:
    """pytorch_optimizer's protocol: g computed before step(), the closure run inside it."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    opt = pytorch_optimizer.LookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=k,
                                    alpha=alpha, lr=0.1, momentum=0.9)
    calls = [0]
    for x, y in data:
        def closure(x=x, y=y) -> Tensor:
            calls[0] += 1
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()
        opt.step(closure)
    return calls[0]


def _run_ours(model: nn.Module, data, rho: float, k: int, alpha: float) -> int:
    opt = create_optimizer("looksam", model.parameters(), torch.optim.SGD,
                           {"lr": 0.1, "momentum": 0.9},
                           settings={"rho": rho, "k": k, "alpha": alpha})
    calls = [0]
    for x, y in data:
        def closure(x=x, y=y) -> Tensor:
            calls[0] += 1
            loss = nn.functional.cross_entropy(model(x), y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    return calls[0]


def _per_layer_reference(model: nn.Module, data, rho: float, k: int, alpha: float) -> None:
    """LookSAM decomposed per parameter tensor l, as pytorch_optimizer (and the authors' code)
    does: gv_l = g_s,l - <g_s,l, g_l> / ||g_l||^2 g_l, reuse d_l = g_l + alpha ||g_l|| gv_l /
    (||gv_l|| + 1e-8); the ascent uses the global norm."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    gv: list[Tensor] = []

    def grad_at(x, y) -> list[Tensor]:
        return list(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params))

    for step, (x, y) in enumerate(data):
        g = grad_at(x, y)
        if step % k == 0:
            n = torch.sqrt(sum((gi * gi).sum() for gi in g))
            theta = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (n + EPS))
            g_s = grad_at(x, y)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            gv = [gs - (gs * gi).sum() / (gi * gi).sum() * gi for gs, gi in zip(g_s, g)]
            d = g_s
        else:
            d = [gi + alpha * gi.norm() * v / (v.norm() + 1e-8) for gi, v in zip(g, gv)]
        for p, di in zip(params, d):
            p.grad = di
        opt.step()


def test_looksam_peer_differs_by_its_per_layer_decomposition() -> None:
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(12)]
    rho, k, alpha = 0.1, 3, 0.7
    peer, ours = _peer_models(single=False)
    per_layer = copy.deepcopy(peer)
    peer_calls = _run_peer(peer, data, rho, k, alpha)
    our_calls = _run_ours(ours, data, rho, k, alpha)
    _per_layer_reference(per_layer, data, rho, k, alpha)
    p, o, r = ([t.detach() for t in m.parameters()] for m in (peer, ours, per_layer))
    peer_vs_per_layer, ours_vs_peer = max_diff(p, r), max_diff(o, p)
    print(f"looksam peer: |pytorch_optimizer - per-layer rule| = {peer_vs_per_layer:.3g}, "
          f"|ours - pytorch_optimizer| = {ours_vs_peer:.3g} (two layers, 12 steps, float32)")
    assert peer_vs_per_layer < 1e-5  # the peer is the per-layer rule, to float32 precision
    assert ours_vs_peer > 1e-2  # and the global rule (ours) is another method
    # With one parameter tensor per layer = global: the two agree to float32 precision.
    peer1, ours1 = _peer_models(single=True)
    _run_peer(peer1, data, rho, k, alpha)
    _run_ours(ours1, data, rho, k, alpha)
    single = max_diff([t.detach() for t in peer1.parameters()],
                      [t.detach() for t in ours1.parameters()])
    print(f"looksam peer, one tensor: |ours - pytorch_optimizer| = {single:.3g}")
    assert single < 2e-5
    # Its protocol costs two passes on every step; ours one on the reuse steps.
    assert (peer_calls, our_calls) == (2 * len(data), len(data) + len(data) // k)


def test_looksam_failed_sam_step_keeps_v_and_count() -> None:
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("looksam", model.parameters(), cls, kwargs, settings={"k": 2})
    data = batches(steps=2)
    _train(model, opt, data)  # a SAM step and a reuse step: the next is a SAM step
    before = copy.deepcopy(opt.state_dict())
    x, y = data[0]
    with pytest.raises(FloatingPointError):
        _train(model, opt, [(x * float("nan"), y)])
    after = opt.state_dict()
    assert after["looksam_step"] == before["looksam_step"] == 2
    assert all(torch.equal(before["state"][i]["looksam_v"], s["looksam_v"])
               for i, s in after["state"].items())


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


@pytest.mark.parametrize("name", ["looksam", "sam"])
def test_looksam_synchronizes_every_pass_under_ddp(name) -> None:
    """v is state: g must be the all-reduced gradient, or the replicas' reuse steps differ."""
    model = _DDPLike()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer(name, model.parameters(), cls, kwargs, settings={"rho": 0.1},
                           model=model, perturbation="local")
    silenced: list[bool] = []
    for x, y in batches(steps=3):
        def closure(x=x, y=y) -> Tensor:
            silenced.append(model.silenced)
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    # SAM's local ascent pass runs in no_sync; every LookSAM pass synchronizes
    assert silenced == ([False] * 4 if name == "looksam" else [True, False] * 3)


def test_looksam_sam_step_skipped_by_loss_scaling_keeps_v() -> None:
    model = make_model()
    cls, kwargs = BASES["sgd"]
    opt = create_optimizer("looksam", model.parameters(), cls, kwargs, settings={"k": 2},
                           loss_scaler=LossScaler())
    data = batches(steps=2)
    _train(model, opt, data)
    before = copy.deepcopy(opt.state_dict()["state"])
    x, y = data[0]
    _train(model, opt, [(x * float("nan"), y)])  # step 3: a SAM step, skipped
    assert float(opt.stats["skipped"]) == 1.0 and opt.looksam_step == 3
    after = opt.state_dict()["state"]
    assert all(torch.equal(s["looksam_v"], after[i]["looksam_v"]) for i, s in before.items())
