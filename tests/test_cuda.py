"""GPU-only checks: host synchronizations inside a step, and the multi-tensor path on CUDA.

Skipped without CUDA (the default suite is CPU-only); run them on a GPU machine with
`python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from agnostic_sam import SAM, AgnosticSAM, LossScaler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).to("cuda", dtype)


def _closure(model, opt, x, y):
    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.backward(loss)
        return loss

    return run


def _optimizer(kind: str, model: nn.Module, **kw):
    if kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model, **kw)
    return AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model,
                       variant=kind, **kw)


def _step(kind, model, opt, x, y):
    if kind == "sam":
        opt.step(_closure(model, opt, x, y))
    else:
        opt.step(_closure(model, opt, x[:11], y[:11]), _closure(model, opt, x[11:], y[11:]))


def _syncs_per_step(kind: str, **kw) -> int:
    """Host syncs in one step, in the steady state: the fewest over three measured steps, so a
    one-off lazy initialization in the process (seen once, in whichever test runs first) does
    not count, while a sync in the step's own code shows in every step."""
    model = _model()
    opt = _optimizer(kind, model, **kw)
    x = torch.randn(16, 3, 8, 8, device="cuda")
    y = torch.randint(0, 5, (16,), device="cuda")
    for _ in range(2):  # warm-up: lazy state (momentum buffers), allocations, library handles
        _step(kind, model, opt, x, y)
    torch.cuda.synchronize()
    counts = []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _step(kind, model, opt, x, y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return min(counts)


@pytest.mark.parametrize("kind", ["full", "simpler", "sam"])
def test_no_host_sync_inside_step_without_finite_check(kind: str) -> None:
    assert _syncs_per_step(kind, check_finite=False) == 0


@pytest.mark.parametrize("kind", ["full", "simpler", "sam"])
def test_one_host_sync_with_finite_check_or_loss_scaling(kind: str) -> None:
    assert _syncs_per_step(kind, check_finite=True) == 1
    assert _syncs_per_step(kind, check_finite=False, loss_scaler=LossScaler(device="cuda")) == 1


@pytest.mark.parametrize("kind", ["full", "simpler"])
def test_foreach_equals_loop_on_cuda_float64(kind: str) -> None:
    params = []
    x = torch.randn(16, 3, 8, 8, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 5, (16,), device="cuda")
    for foreach in (False, True):
        model = _model(torch.float64)
        opt = _optimizer(kind, model, perturb_foreach=foreach, adaptive=True)
        for _ in range(5):
            _step(kind, model, opt, x, y)
        params.append([p.detach() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
