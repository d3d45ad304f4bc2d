"""Host synchronizations inside a step, counted on the CPU for every registered method (issue 21):
exactly one (the finiteness check of the step's gradient norms) with ``check_finite=True``, none
with ``check_finite=False``.

A sync is any read of a tensor's value by Python: ``item``, ``tolist``, ``bool``/``if tensor``,
``float``/``int``/``index``, ``numpy``. They are counted by patching those methods of
`torch.Tensor` while the step runs (the closures' own work is not counted: they read nothing).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from agnostic_sam import LossScaler
from agnostic_sam.methods import create_optimizer, get_method, list_methods

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@contextlib.contextmanager
def counting_reads(counter: list[str]):
    """Count every read of a tensor's value made through Python while the block runs."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            counter.append(name)
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _closures(model: nn.Module, opt, info, x: torch.Tensor, y: torch.Tensor, counter: list):
    """The method's closures; their own reads (none expected) are set aside."""
    per_sample = info.closure == "per-sample"

    def make(xs, ys):
        def run(index=None, backward=True):
            before = len(counter)
            xb, yb = (xs, ys) if index is None else (xs[index], ys[index])
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            if backward:
                opt.backward(losses.mean())
            del counter[before:]  # the closure is the user's: only the optimizer's reads count
            return losses.detach() if per_sample else losses.mean()

        return run

    if info.splits_batch:
        return make(x[:12], y[:12]), make(x[12:], y[12:])
    return (make(x, y),)


@pytest.mark.parametrize("check_finite", [True, False, "loss-scaler"],
                         ids=["check", "no-check", "loss-scaler"])
@pytest.mark.parametrize("name", list_methods())
def test_one_host_sync_per_step(name: str, check_finite) -> None:
    """One sync reads every pass's finiteness (with a loss scaler: whether to skip the step)."""
    info = get_method(name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    scaler = LossScaler() if check_finite == "loss-scaler" else None
    opt = create_optimizer(name, model.parameters(), torch.optim.SGD,
                           {"lr": 0.05, "momentum": 0.9}, model=model,
                           check_finite=check_finite is not False, loss_scaler=scaler)
    g = torch.Generator().manual_seed(1)
    counts = []
    for step in range(6):  # several steps: methods whose steps differ (LookSAM's k) show all
        x = torch.randn(20, 5, generator=g)
        y = torch.randint(0, 3, (20,), generator=g)
        counter: list[str] = []
        closures = _closures(model, opt, info, x, y, counter)
        with counting_reads(counter):
            opt.step(*closures)
        counts.append((step, list(counter)))
    # plus what a method declares it reads of host data (ESAM's CPU draws), not a device sync
    want = (0 if check_finite is False else 1) + getattr(info.cls, "_host_reads_per_step", 0)
    bad = [(step, reads) for step, reads in counts if len(reads) != want]
    assert bad == [], f"{name}: expected {want} host read(s) per step, got {bad}"


def test_the_counter_sees_a_read() -> None:
    counter: list[str] = []
    with counting_reads(counter):
        bool(torch.ones(()) > 0)
        torch.zeros(2).tolist()
    assert counter == ["__bool__", "tolist"]
