"""A run directory written by 0.2 resumes bit for bit under this code, with the same run id.

tests/data/v0.2/<method>/ was written by agnostic-sam 0.2 (commit 857932f): `train` on digits,
mlp_mini, 3 epochs, 20% label noise, stopped after the first epoch's checkpoint (as a kill -9
would leave it). Its config.yaml spells every radius as 0.2 did (rho: 0.05, rho1: 0.1, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from agnostic_sam.train import load_checkpoint, load_config, train
from agnostic_sam.train.rundir import run_id

DATA = Path(__file__).parent / "data" / "v0.2"
# run_id() of each saved config, as 0.2 computed it.
IDS_0_2 = {"sam": "digits-mlp_mini-sam-seed0-abb241838f",
           "agnostic-sam": "digits-mlp_mini-agnostic-sam-seed0-cc552f0d1f"}


def _flags(method: str, **more) -> dict:
    """The run as a user would give it (no config file)."""
    return {"optimizer": method, "model": "mlp_mini", "epochs": 3, "threads": 1,
            "progress": False, "batch_size": 64, "noise_rate": 0.2, **more}


def _this_machines_epoch_1(tmp_path: Path, method: str, run: Path) -> None:
    """Put this machine's bits of epoch 1 into the 0.2 checkpoint of `run`: the weights and the
    optimizer's state tensors of a run of this code stopped where 0.2's was (`max_steps`, the same
    schedule), everything else (the keys, the config, the param groups, the RNG states) as 0.2
    wrote it. CPU models differ in the last bits of a float32 step (the fixture's machine and
    this one may), so only this way is "resumed" comparable bit for bit with "uninterrupted" on
    every machine; on the machine that wrote the fixture it changes nothing."""
    old = torch.load(run / "checkpoint.pt", weights_only=False)
    train(load_config(None, _flags(method, max_steps=old["step"], out=str(tmp_path / "first"))))
    mine = load_checkpoint(tmp_path / "first" / "checkpoint.pt")
    assert (mine["epoch"], mine["step"]) == (old["epoch"], old["step"])
    assert mine["model"].keys() == old["model"].keys()
    old["model"] = mine["model"]
    states = old["optimizer"]["state"]
    assert states.keys() == mine["optimizer"]["state"].keys()
    for index, state in states.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = mine["optimizer"]["state"][index][key]
    torch.save(old, run / "checkpoint.pt")


@pytest.mark.parametrize("method", sorted(IDS_0_2))
def test_a_0_2_run_resumes_bit_for_bit(tmp_path, method) -> None:
    run = tmp_path / "old"
    shutil.copytree(DATA / method, run)
    saved = load_config(run / "config.yaml")
    assert run_id(saved) == IDS_0_2[method]
    _this_machines_epoch_1(tmp_path, method, run)
    resumed = train(load_config(run / "config.yaml", {"out": str(run), "resume": True}))
    # the same run, uninterrupted, under this code (the flags a user would give, no config file)
    fresh = train(load_config(None, _flags(method, out=str(tmp_path / "new"))))
    assert resumed["final_test_acc"] == fresh["final_test_acc"]
    a = load_checkpoint(run / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "new" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert run_id(load_config(None, {"optimizer": method, "model": "mlp_mini", "epochs": 3,
                                     "batch_size": 64, "noise_rate": 0.2})) == IDS_0_2[method]


@pytest.mark.parametrize("method", sorted(IDS_0_2))
def test_the_0_2_checkpoint_as_written_resumes_on_this_machine(tmp_path, method) -> None:
    """The fixture untouched: it resumes and ends on the uninterrupted run's trajectory, within
    the last-bit differences between CPU models (bit for bit on the machine that wrote it)."""
    run = tmp_path / "old"
    shutil.copytree(DATA / method, run)
    train(load_config(run / "config.yaml", {"out": str(run), "resume": True}))
    train(load_config(None, _flags(method, out=str(tmp_path / "new"))))
    a = load_checkpoint(run / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "new" / "checkpoint.pt")
    assert max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]) < 1e-5
