"""Sweeps through the launchers end to end: `reproduce --smoke` and `compare` with local worker
processes give the same results, bit for bit, as inline."""

from __future__ import annotations

import json

import pytest
import torch

from agnostic_sam.cli import main


def _weights(root, name="runs"):
    out = {}
    for ckpt in sorted((root / name).glob("*/checkpoint.pt")):
        out[ckpt.parent.name] = torch.load(ckpt, weights_only=True)["model"]
    return out


@pytest.mark.slow
def test_reproduce_smoke_local_workers_equal_inline(tmp_path) -> None:
    for kind, extra in (("inline", []), ("local", ["--jobs", "2"])):
        assert main(["reproduce", "table3", "--smoke", "--launcher", kind, *extra, "--no-progress",
                     "--out", str(tmp_path / kind)]) == 0
    a, b = _weights(tmp_path / "inline"), _weights(tmp_path / "local")
    assert a.keys() == b.keys() and len(a) == 9
    for run in a:
        assert all(torch.equal(a[run][k], b[run][k]) for k in a[run]), run
    def cells(kind):  # every cell's numbers but its timing
        report = json.loads((tmp_path / kind / "report.json").read_text())
        return [{k: v for k, v in c.items() if k != "seconds_per_epoch"}
                for c in report["tables"]["table3"]["cells"]]

    assert cells("inline") == cells("local")


@pytest.mark.slow
def test_compare_local_workers_equal_inline(tmp_path) -> None:
    common = ["compare", "--optimizers", "sgd", "agnostic-sam", "--seeds", "0", "1",
              "--epochs", "1", "--max-steps", "5", "--model", "mlp_mini", "--no-progress"]
    assert main([*common, "--launcher", "inline", "--out", str(tmp_path / "inline")]) == 0
    local = ["--launcher", "local", "--jobs", "2", "--out", str(tmp_path / "local")]
    assert main([*common, *local]) == 0
    for method in ("sgd", "agnostic-sam"):
        for seed in (0, 1):
            a, b = (torch.load(tmp_path / kind / method / f"seed{seed}" / "checkpoint.pt",
                               weights_only=True) for kind in ("inline", "local"))
            assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            timeless = [[{k: v for k, v in m.items() if k != "epoch_seconds"} for m in c["metrics"]]
                        for c in (a, b)]
            assert timeless[0] == timeless[1]
    sa = json.loads((tmp_path / "inline" / "comparison.json").read_text())["summary"]
    sb = json.loads((tmp_path / "local" / "comparison.json").read_text())["summary"]
    for method in sa:
        assert sa[method]["per_seed"] == sb[method]["per_seed"]
