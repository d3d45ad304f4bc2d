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


@pytest.mark.parametrize("method", sorted(IDS_0_2))
def test_a_0_2_run_resumes_bit_for_bit(tmp_path, method) -> None:
    run = tmp_path / "old"
    shutil.copytree(DATA / method, run)
    saved = load_config(run / "config.yaml")
    assert run_id(saved) == IDS_0_2[method]
    resumed = train(load_config(run / "config.yaml", {"out": str(run), "resume": True}))
    # the same run, uninterrupted, under this code (the flags a user would give, no config file)
    fresh = train(load_config(None, {
        "optimizer": method, "model": "mlp_mini", "epochs": 3, "threads": 1, "progress": False,
        "batch_size": 64, "noise_rate": 0.2, "out": str(tmp_path / "new")}))
    assert resumed["final_test_acc"] == fresh["final_test_acc"]
    a = load_checkpoint(run / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "new" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert run_id(load_config(None, {"optimizer": method, "model": "mlp_mini", "epochs": 3,
                                     "batch_size": 64, "noise_rate": 0.2})) == IDS_0_2[method]
