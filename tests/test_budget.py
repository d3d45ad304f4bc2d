"""The compute budget: under ``budget: passes`` every method gets the forward + backward work of
the reference method in ``epochs`` epochs (SGD twice SAM's steps), its schedule stretched."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agnostic_sam.train import load_checkpoint, load_config, train
from agnostic_sam.train.build import lr_schedule, steps_per_epoch_of
from agnostic_sam.train.config import budget_factor, planned_steps
from agnostic_sam.train.rundir import run_id

BASE = {"model": "mlp_mini", "epochs": 1, "batch_size": 64, "threads": 1, "progress": False}


def _cfg(tmp_path, name, **kw):
    return load_config(None, {**BASE, "out": str(tmp_path / name), **kw})


def test_sgd_gets_twice_sams_steps_and_the_same_work(tmp_path) -> None:
    sgd = train(_cfg(tmp_path, "sgd", optimizer="sgd", budget="passes"))
    sam = train(_cfg(tmp_path, "sam", optimizer="sam", budget="passes"))
    spe = 1437 // 64  # digits: 1,437 training images, full batches of 64
    assert (sgd["steps"], sam["steps"]) == (2 * spe, spe)
    # the work counted by the trainer: one batch per SGD step, two per SAM step
    assert sgd["batch_equivalents"] == 1.0 and sam["batch_equivalents"] == 2.0
    assert sgd["steps"] * sgd["batch_equivalents"] == sam["steps"] * sam["batch_equivalents"]
    # two passes over the data, each evaluated; the schedule ends at lr 0 at its own end
    rows = [json.loads(line) for line in (tmp_path / "sgd" / "metrics.jsonl").open()]
    assert [r["steps"] for r in rows] == [spe, 2 * spe]
    lrs = load_checkpoint(tmp_path / "sgd" / "checkpoint.pt")["scheduler"]["_last_lr"]
    assert lrs == pytest.approx([0.0], abs=1e-12)


def test_the_reference_itself_trains_as_under_an_epochs_budget(tmp_path) -> None:
    a = _cfg(tmp_path, "a", optimizer="sam", budget="passes")
    b = _cfg(tmp_path, "b", optimizer="sam")
    train(a)
    train(b)
    wa = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same steps, so the same run (trained once, shared by both budgets' reports) ...
    assert run_id(a) == run_id(b)
    # ... while a budget that changes the steps is part of the identity
    sgd = _cfg(tmp_path, "c", optimizer="sgd")
    sgd_passes = _cfg(tmp_path, "c", optimizer="sgd", budget="passes")
    assert run_id(sgd) != run_id(sgd_passes)
    assert run_id(sgd_passes) != run_id(_cfg(tmp_path, "c", optimizer="sgd", budget="passes",
                                              budget_reference="agnostic-sam-simpler"))
    # under an epochs budget the reference does not matter
    c = _cfg(tmp_path, "b", optimizer="sam", budget_reference="sgd")
    assert run_id(c) == run_id(b)


def test_factor_from_the_registry_costs(tmp_path) -> None:
    cfg = _cfg(tmp_path, "x", optimizer="agnostic-sam-simpler", budget="passes")
    assert budget_factor(cfg) == pytest.approx(2.0 / 1.7)
    cfg = _cfg(tmp_path, "x", optimizer="sgd", budget="passes", budget_reference="agnostic-sam")
    assert budget_factor(cfg) == 2.0
    spe = steps_per_epoch_of(cfg)
    assert planned_steps(cfg, spe) == 2 * spe


def test_warmup_is_stretched(tmp_path) -> None:
    cfg = _cfg(tmp_path, "w", optimizer="sgd", budget="passes", epochs=2, warmup_epochs=1.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, cfg, 10)  # 10 steps per epoch -> 40 planned steps, 20 of warm-up
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[19] == pytest.approx(1.0) and lrs[18] == pytest.approx(19 / 20)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_a_bad_budget_is_one_line(tmp_path) -> None:
    from agnostic_sam.errors import UsageError

    with pytest.raises(UsageError, match="unknown budget 'steps'; choose from epochs, passes"):
        _cfg(tmp_path, "z", budget="steps")
    with pytest.raises(UsageError, match="unknown optimizer 'nope'"):
        _cfg(tmp_path, "z", budget="passes", budget_reference="nope")
