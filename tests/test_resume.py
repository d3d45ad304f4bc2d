"""Exact resume: an interrupted then resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agnostic_sam.errors import UsageError
from agnostic_sam.train import load_checkpoint, load_config, train
from agnostic_sam.train import rundir as rundir_module

SRC = Path(__file__).resolve().parents[1] / "src"




def metrics_without_time(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("epoch_seconds")
    return rows


def assert_same_run(a: Path, b: Path) -> None:
    wa = load_checkpoint(a / "checkpoint.pt")
    wb = load_checkpoint(b / "checkpoint.pt")
    for key, value in wa["model"].items():
        assert torch.equal(value, wb["model"][key]), key
    for pid, state in wa["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], wb["optimizer"]["state"][pid]["momentum_buffer"]
        )
    assert metrics_without_time(a) == metrics_without_time(b)


def interrupt_then_resume(cfg, monkeypatch, kill_at_save: int) -> None:
    """Run until the `kill_at_save`-th checkpoint save, die there (neither the checkpoint nor
    metrics.jsonl holds that epoch: the checkpoint is written first), then resume."""
    real_save = rundir_module.save_checkpoint
    calls = []

    def dying_save(path, obj):
        calls.append(obj["epoch"])
        if len(calls) == kill_at_save:
            raise KeyboardInterrupt
        real_save(path, obj)

    monkeypatch.setattr(rundir_module, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(rundir_module, "save_checkpoint", real_save)
    out = Path(cfg.out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == kill_at_save - 1
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == kill_at_save - 1
    assert not (out / "result.json").exists()
    train(dataclasses.replace(cfg, resume=True))


@pytest.mark.parametrize(
    "overrides",
    [
        {"split": "batch", "noise_rate": 0.1},
        {"split": "fixed"},
        {"optimizer": "sam", "model": "cnn_mini", "batch_size": 128},  # BatchNorm running stats
        {"optimizer": "agnostic-sam", "amp": "fp16", "model": "mlp_mini"},  # loss scaler state
    ],
    ids=["batch", "fixed", "sam-bn", "fp16"],
)
def test_in_process_resume_is_exact(tmp_path, monkeypatch, overrides):
    base = {"epochs": 4, "batch_size": 64, "threads": 1, "progress": False, "device": "cpu",
            **overrides}
    full = load_config(None, {**base, "out": str(tmp_path / "full")})
    cut = load_config(None, {**base, "out": str(tmp_path / "cut")})
    train(full)
    interrupt_then_resume(cut, monkeypatch, kill_at_save=3)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    r_full = json.loads((tmp_path / "full" / "result.json").read_text())
    r_cut = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert r_full["final_test_acc"] == r_cut["final_test_acc"] and r_full["steps"] == r_cut["steps"]


def _write_image_folder(root: Path, classes: int = 3, per_class: int = 10) -> None:
    """A real on-disk ImageFolder tree of 8x8 PNGs (train/ and test/)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8)
                pixels[..., c] = 255  # a learnable colour cue per class
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_resume_is_exact_through_the_dataloader(tmp_path, monkeypatch):
    # Random augmentation in a DataLoader: the transforms' RNG must be restored too.
    _write_image_folder(tmp_path / "data")
    base = {"dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "image_size": 8,
            "epochs": 3, "batch_size": 8, "threads": 1, "progress": False, "device": "cpu"}
    train(load_config(None, {**base, "out": str(tmp_path / "full")}))
    interrupt_then_resume(load_config(None, {**base, "out": str(tmp_path / "cut")}), monkeypatch, 2)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_resume_rejects_a_changed_setting_and_touches_nothing(tmp_path):
    cfg = load_config(None, {"epochs": 1, "max_steps": 2, "progress": False, "device": "cpu",
                             "out": str(tmp_path / "run")})
    train(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(UsageError, match="'lr' is 0.1 but the checkpoint was trained with 0.05"):
        train(dataclasses.replace(cfg, resume=True, lr=0.1))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    # Settings that do not change the numbers may differ.
    train(dataclasses.replace(cfg, resume=True, threads=1, progress=True))


def test_fresh_run_refuses_to_overwrite_a_run(tmp_path):
    cfg = load_config(None, {"epochs": 1, "max_steps": 1, "progress": False, "device": "cpu",
                             "out": str(tmp_path / "run")})
    train(cfg)
    with pytest.raises(UsageError, match="already holds a run"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["batch", "fixed"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, split):
    """A real `python -m agnostic_sam train` killed with SIGKILL after its first checkpoint,
    restarted with --resume, ends bit-for-bit where an uninterrupted run ends."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--epochs", "10", "--batch-size", "16", "--threads", "1", "--no-progress",
            "--split", split, "--device", "cpu"]

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "agnostic_sam", "train", *args, "--out", str(out), *extra]

    subprocess.run(cmd(tmp_path / "full"), env=env, check=True, capture_output=True, timeout=300)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (cut / "checkpoint.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "result.json").exists(), "killed too late: the run had already finished"
    done = load_checkpoint(cut / "checkpoint.pt")["epoch"]
    assert 1 <= done < 10

    resumed = subprocess.run(
        cmd(cut, "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "full", cut)
    assert not list(cut.glob(".*.tmp"))  # no temporary file survived the kill


def test_config_yaml_of_a_resumed_run_starts_anew_elsewhere(tmp_path):
    # config.yaml records the run, not how the last process started: `--config` of it into
    # another directory is a fresh run of the same settings.
    cfg = load_config(None, {"epochs": 2, "max_steps": 3, "progress": False, "device": "cpu",
                             "out": str(tmp_path / "run")})
    train(cfg)
    train(dataclasses.replace(cfg, resume=True, max_steps=3))
    saved = load_config(tmp_path / "run" / "config.yaml", {"out": str(tmp_path / "copy")})
    assert saved.resume is False
    train(saved)
    assert (tmp_path / "copy" / "result.json").is_file()
