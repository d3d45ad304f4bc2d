"""Bad input to `agnostic-sam train`: exit status 2, one line on stderr, no traceback, and no
half-written files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agnostic_sam.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"




def run_cli(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes ({} when `path` does not exist)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--dataset", "imagenet-xyz"], "unknown dataset 'imagenet-xyz'"),
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--rho1", "-0.1"], "rho1 must be a radius >= 0"),
        (["--optimizer", "sam", "--rho", "-1"], "rho must be a radius >= 0"),
        (["--split-ratio", "1.5"], "split_ratio must be in (0, 1)"),
        (["--split-ratio", "0"], "split_ratio must be in (0, 1)"),
        (["--noise-rate", "1.0"], "noise_rate must be in [0, 1)"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--batch-size", "1"], "too small to split"),
        (["--optimizer", "adamw"], "unknown optimizer 'adamw'"),
        (["--amp", "fp8"], "unknown amp mode"),
        (["--split", "halves"], "unknown split"),
        (["--device", "gpu0"], "unknown device"),
        (["--resume"], "no checkpoint at"),
        (["--batch-size", "5000"], "larger than the training set"),
    ],
)
def test_bad_flag_exits_2_with_one_line(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    rc, err = run_cli(["train", "--no-progress", "--out", str(out), *flags], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("agnostic-sam: error: ")
    assert needle in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written


def test_missing_data_dir_names_the_files_and_download(tmp_path, capsys):
    data = tmp_path / "nodata"
    out = tmp_path / "run"
    rc, err = run_cli(["train", "--dataset", "cifar10", "--model", "mlp_mini",
                       "--data-dir", str(data), "--out", str(out)], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "cifar-10-batches-py" in err and "download" in err and str(data) in err
    assert not out.exists()


def test_unknown_yaml_key_and_unreadable_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nlearning_rate: 0.1\n")
    rc, err = run_cli(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "unknown config key 'learning_rate'" in err and err.count("\n") == 1
    rc, err = run_cli(["train", "--config", str(tmp_path / "none.yaml")], capsys)
    assert rc == 2 and "cannot read config file" in err
    assert not (tmp_path / "run").exists()


def test_bad_flag_type_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "three"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'three'" in err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_checkpoint_exits_2_and_keeps_files(tmp_path, capsys, damage):
    out = tmp_path / "run"
    argv = ["train", "--device", "cpu", "--epochs", "1", "--max-steps", "2", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    ckpt = out / "checkpoint.pt"
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        torch.save({"model": {}}, ckpt)
    before = tree(out)
    rc, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(ckpt) in err and ("corrupt" in err or "incomplete" in err)
    assert tree(out) == before


@pytest.mark.slow
def test_real_process_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "agnostic_sam", "train", "--split-ratio", "2",
         "--out", str(tmp_path / "r")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == "agnostic-sam: error: split_ratio must be in (0, 1), got 2.0\n"
    assert not (tmp_path / "r").exists()
