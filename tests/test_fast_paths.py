"""Every registered method's flat fast path (`optim/_flat.py`: CPU float32/float64, every gradient
present) against its per-tensor list path, the arithmetic the methods had before the fast path
(issue 21): the same weights and optimizer state bit for bit, except where the fast path only
changes the order of a reduction (GSAM's dot products over one flat buffer), which
agree within 1e-12 in float64.

The list path is forced by making no dtype eligible for the flat buffers (`_flat._DTYPES`), on a
model of Linear (2-D), LayerNorm (1-D) and bias tensors, in two param groups with their own
radius, over several steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from agnostic_sam.methods import create_optimizer, get_method, list_methods
from agnostic_sam.methods.step import step_closures

# Methods whose fast path sums a dot product in another order than the list path.
REORDERED = {"gsam"}
STEPS = 6


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 12),
                         nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 4)).to(dtype)


def _groups(name: str, model: nn.Module) -> list[dict]:
    info = get_method(name)
    named = list(model.named_parameters())
    first = {"params": [p for _, p in named[:4]], "param_names": [n for n, _ in named[:4]]}
    rest = {"params": [p for _, p in named[4:]], "param_names": [n for n, _ in named[4:]]}
    tuned = info.tune
    if tuned is not None and info.setting(tuned).per_group:
        first[tuned] = 2 * (info.resolve({})[tuned] or 0.05)
    return [first, rest]


def _run(name: str, dtype: torch.dtype, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    with monkeypatch.context() as patch:
        if not fast:
            # white-box: the one switch of the fast path (no public option turns it off)
            patch.setattr("agnostic_sam.optim._flat._DTYPES", ())
        model = _model(dtype)
        info = get_method(name)
        opt = create_optimizer(name, _groups(name, model), torch.optim.SGD,
                               {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, model=model)
        layout = opt._layout() if hasattr(opt, "_layout") else None
        assert layout is None or layout.fast is fast
        gen = torch.Generator().manual_seed(1)
        per_sample = info.closure == "per-sample"

        def closure_of(batch):
            x, y = batch

            def closure(index=None, backward=True):
                xb, yb = (x, y) if index is None else (x[index], y[index])
                losses = F.cross_entropy(model(xb), yb, reduction="none")
                if backward:
                    opt.backward(losses.mean())
                return losses.detach() if per_sample else losses.mean().detach()

            return closure

        for _ in range(STEPS):
            x = torch.randn(24, 6, generator=gen, dtype=dtype)
            y = torch.randint(0, 4, (24,), generator=gen)
            closures = step_closures(info, closure_of, (x, y),
                                     split=lambda b: ((b[0][:16], b[1][:16]),
                                                      (b[0][16:], b[1][16:])))
            opt.step(*closures)
        weights = [p.detach().clone() for p in model.parameters()]
        buffers = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
        return weights, buffers


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list_methods())
def test_fast_path_gives_the_list_paths_result(name: str, dtype: torch.dtype,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fast_w, fast_b = _run(name, dtype, True, monkeypatch)
    list_w, list_b = _run(name, dtype, False, monkeypatch)
    if get_method(name).name in REORDERED:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert _max_diff(fast_w, list_w) < tol
        assert _max_diff(fast_b, list_b) < tol
        return
    assert all(torch.equal(a, b) for a, b in zip(fast_w, list_w))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(fast_b, list_b))


def test_packing_by_blocks_and_by_foreach_copy_give_the_same_step(monkeypatch) -> None:
    """Tensors of one size but different shapes (a (8, 4) weight and a (32,) bias) share a block
    that no torch.stack can fill: that layout packs with a foreach copy, and SAM's weights are the
    list path's, bit for bit, either way."""

    def weights(model, fast, classes):
        with monkeypatch.context() as patch:
            if not fast:
                patch.setattr("agnostic_sam.optim._flat._DTYPES", ())
            opt = create_optimizer("sam", model.parameters(), torch.optim.SGD,
                                   {"lr": 0.1, "momentum": 0.9}, model=model)
            gen = torch.Generator().manual_seed(3)
            for _ in range(4):
                x = torch.randn(8, 4, generator=gen)
                y = torch.randint(0, classes, (8,), generator=gen)

                def closure(x=x, y=y):
                    loss = F.cross_entropy(model(x), y)
                    opt.backward(loss)
                    return loss

                opt.step(closure)
            return opt._layout(), [p.detach().clone() for p in model.parameters()]

    for mixed in (True, False):
        torch.manual_seed(0)
        make = (lambda: nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 32))) if mixed else \
            (lambda: nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8)))
        torch.manual_seed(0)
        a = make()
        torch.manual_seed(0)
        b = make()
        classes = 32 if mixed else 8
        layout, fast = weights(a, True, classes)
        assert (layout.stack_plan is None) is mixed
        _, slow = weights(b, False, classes)
        assert all(torch.equal(x, y) for x, y in zip(fast, slow))
