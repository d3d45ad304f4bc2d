"""RWP (m-RWP, Li et al. 2022 / TMLR 2024) against a float64 reference from its equations, with
the same seeded noise drawn in the documented order; the noise's scale; resume bit for bit."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tests._family import (
    BASES,
    batches,
    groups,
    loss_of,
    make_model,
    max_diff,
    run_method,
    run_reference,
)
from torch import nn

from agnostic_sam.methods import create_optimizer, get_method

SEED = 11


def _rwp(sigma_of, lmbda: float, seed: int):
    gen = torch.Generator().manual_seed(seed)  # the reference's own generator, same seed

    def row_norm(w):  # ||W_i|| per output row (broadcast), ||W|| for a 1-D tensor
        if w.dim() < 2:
            return torch.sqrt((w * w).sum())
        return torch.sqrt((w * w).sum(dim=tuple(range(1, w.dim())), keepdim=True))

    def direction(step, grad_at, theta, group_of):
        g = grad_at(theta, step)
        # One randn per parameter after pass 1, in param-group order.
        z = [torch.randn(w.shape, generator=gen, dtype=w.dtype) * sigma_of(gr) * row_norm(w)
             for w, gr in zip(theta, group_of)]
        g_z = grad_at([w + zi for w, zi in zip(theta, z)], step)
        return [lmbda * a + (1.0 - lmbda) * b for a, b in zip(g_z, g)]

    return direction


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rwp_equals_the_papers_rule_with_the_same_noise(base) -> None:
    ours = _run("rwp", base)
    ref = run_reference(_rwp(lambda group: group.get("sigma", 0.05), 0.3, SEED), base,
                        per_group={"sigma": 0.1})
    diff = max_diff(ours, ref)
    print(f"rwp {base}: max |ours - reference| = {diff:.3g}")
    assert diff < 1e-9
    # The noise matters: another seed, or no noise, gives other weights.
    assert max_diff(_run("rwp", base, seed=SEED + 1), ref) > 1e-6


def _run(name: str, base: str, seed: int = SEED) -> list[torch.Tensor]:
    # tests._family.run_method takes `seed=` for the model; the optimizer's seed is an option.
    model = make_model()
    cls, kwargs = BASES[base]
    opt = create_optimizer(name, groups(model, {"sigma": 0.1}), cls, kwargs,
                           settings={"sigma": 0.05, "lmbda": 0.3}, seed=seed)
    for x, y in batches():
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def test_rwp_off_is_the_base_optimizer() -> None:
    # sigma = 0: z = 0 and d = 0.5 g + 0.5 g = g exactly.
    assert max_diff(run_method("rwp", "sgd", {"sigma": 0.0}), run_method("sgd", "sgd")) == 0.0


def test_rwp_noise_has_the_row_scale() -> None:
    """z = (weights in pass 2) - theta: per row mean 0 and std sigma ||W_i||; for a 1-D tensor
    std sigma ||W||. 4000 draws per row: the std's standard error is about 1.1 %."""
    torch.manual_seed(0)
    lin = nn.Linear(4000, 6).double()
    with torch.no_grad():
        lin.weight.mul_(torch.arange(1, 7, dtype=torch.float64)[:, None])  # rows of unlike norm
    bias = nn.Parameter(torch.randn(4000, dtype=torch.float64))
    sigma = 0.02
    opt = create_optimizer("rwp", [lin.weight, lin.bias, bias], torch.optim.SGD, {"lr": 0.0},
                           settings={"sigma": sigma}, seed=5)
    seen = []

    def closure():
        seen.append((lin.weight.detach().clone(), bias.detach().clone()))
        loss = lin(bias[None, :]).square().sum()
        opt.backward(loss)
        return loss

    opt.step(closure)
    (w0, b0), (w1, b1) = seen
    z = w1 - w0
    scale = sigma * w0.norm(dim=1)
    ratio = z.std(dim=1) / scale
    assert ((ratio - 1).abs() < 0.05).all(), ratio
    assert (z.mean(dim=1).abs() < 4 * scale / 4000**0.5).all()
    zb = b1 - b0
    assert abs(float(zb.std() / (sigma * b0.norm())) - 1) < 0.05
    assert abs(float(zb.mean())) < 4 * float(sigma * b0.norm()) / 4000**0.5


def _train(opt, model, data):
    for x, y in data:
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)


def _w(model):
    return [p.detach() for p in model.parameters()]


def _build(model, seed=SEED):
    return create_optimizer("rwp", model.parameters(), *BASES["sgd"], settings={"sigma": 0.1},
                            seed=seed)


def test_rwp_resume_is_bit_exact() -> None:
    data = batches(steps=10)
    whole = make_model()
    _train(_build(whole), whole, data)

    first = make_model()
    opt = _build(first)
    _train(opt, first, data[:5])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert saved["opt"]["rwp_generator"] is not None
    resumed = make_model(seed=3)  # other weights, replaced by the checkpoint's
    resumed.load_state_dict(saved["model"])
    opt2 = _build(resumed, seed=SEED + 7)  # the saved generator wins over the seed
    opt2.load_state_dict(copy.deepcopy(saved["opt"]))
    _train(opt2, resumed, data[5:])
    assert max_diff(_w(whole), _w(resumed)) == 0.0

    # Without the generator's state the noise differs (the check can fail).
    fresh = make_model(seed=3)
    fresh.load_state_dict(saved["model"])
    opt3 = _build(fresh)
    state = copy.deepcopy(saved["opt"])
    state.pop("rwp_generator")
    opt3.load_state_dict(state)
    _train(opt3, fresh, data[5:])
    assert max_diff(_w(whole), _w(fresh)) > 1e-9


def test_rwp_record() -> None:
    info = get_method("rwp")
    assert info.random and info.tune == "sigma" and info.passes == ("B", "B")
    assert info.defaults == {"sigma": 0.015, "lmbda": 0.5}
    assert info.batch_equivalents(0.5) == 2.0
