"""Never silently wrong, round 3 (issue 22): the command-line and file rows.

Each set-up below ended, before this round, with a different result and no word (exit 0) or with
a traceback. Every test runs the command as a user types it (in-process through
`agnostic_sam.cli.main`, or as a real process where an environment variable or the interpreter's
start matters) and checks: exit status 2, exactly one stderr line ``agnostic-sam: error: ...``
naming the problem, no traceback, and no file created, changed or lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agnostic_sam.cli import main
from test_bad_inputs import run_main, tree

SRC = Path(__file__).resolve().parents[1] / "src"
# A run of a few steps on digits: the smallest real run directory (config, checkpoint, metrics,
# result) the commands read.
TINY = ("--model", "mlp_mini", "--epochs", "1", "--max-steps", "2", "--batch-size", "32",
        "--no-progress", "--device", "cpu", "--threads", "1")


def one_error_line(rc: int, err: str, *needles: str) -> str:
    """The single stderr line of a refused command (exit 2, no traceback), checked for needles."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("agnostic-sam: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train_run(out: Path, capsys: pytest.CaptureFixture, *flags: str) -> Path:
    rc, err = run_main(["train", *TINY, "--out", str(out), *flags], capsys)
    assert rc == 0, err
    return out


def cli(*argv: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m agnostic_sam ARGV` as a real process (this checkout's sources first)."""
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = str(SRC) + os.pathsep + base.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "agnostic_sam", *argv], env=base, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished tiny runs (seeds 0 and 1), made once for the module; tests copy them."""
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            rc = main(["train", *TINY, "--seed", str(seed), "--out", str(root / f"seed{seed}")])
            assert rc == 0
    finally:
        torch.set_num_threads(before)
    return {"seed0": root / "seed0", "seed1": root / "seed1"}


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- train --weights: a file of another model stops, a skipped head is said ------------------


def _state_dict(model: str, num_classes: int = 10) -> dict[str, torch.Tensor]:
    from agnostic_sam.models import create_model

    torch.manual_seed(0)
    return create_model(model, num_classes=num_classes, in_channels=1, image_size=8).state_dict()


def test_weights_of_another_width_stop_naming_the_shapes(tmp_path, monkeypatch, capsys):
    # cnn_mini's names with cnn's shapes: only BatchNorm's shapeless counters used to "match".
    monkeypatch.chdir(tmp_path)
    torch.save(_state_dict("cnn"), tmp_path / "f.pt")
    before = tree(tmp_path)
    rc, err = run_main(["train", *TINY, "--model", "cnn_mini", "--weights", "f.pt",
                        "--out", "run"], capsys)
    one_error_line(rc, err, "f.pt", "features.1.weight", "(32,)", "(4,)")
    assert tree(tmp_path) == before


def test_weights_mismatching_inside_the_network_stop(tmp_path, monkeypatch, capsys):
    # Every parameter but one inner layer fits: loading the rest would train a hybrid.
    monkeypatch.chdir(tmp_path)
    state = _state_dict("cnn_mini")
    state["features.3.weight"] = torch.zeros(5, 4, 3, 3)
    torch.save(state, tmp_path / "f.pt")
    before = tree(tmp_path)
    rc, err = run_main(["train", *TINY, "--model", "cnn_mini", "--weights", "f.pt",
                        "--out", "run"], capsys)
    one_error_line(rc, err, "features.3.weight", "(5, 4, 3, 3)", "first layer and the classifier")
    assert tree(tmp_path) == before


def test_weights_with_a_head_of_another_class_count_load_and_say_so(tmp_path):
    # A real process: the library's warning reaches stderr without any logging set-up.
    torch.save(_state_dict("cnn_mini", num_classes=5), tmp_path / "h.pt")
    done = cli("train", *TINY, "--model", "cnn_mini", "--weights", str(tmp_path / "h.pt"),
               "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "skipped (shape mismatch): head.bias, head.weight" in done.stderr


# --- train --resume with another thread count -----------------------------------------------


def test_resume_with_more_threads_is_refused(tmp_path, capsys):
    run = train_run(tmp_path / "run", capsys, "--epochs", "2", "--max-steps", "2")
    before = tree(tmp_path)
    rc, err = run_main(["train", *TINY, "--epochs", "2", "--out", str(run), "--resume",
                        "--threads", "2"], capsys)
    one_error_line(rc, err, "1 CPU thread", "has 2", "--threads 1")
    assert tree(tmp_path) == before


def test_resume_under_omp_num_threads_is_refused(tmp_path):
    # Started without --threads (config.yaml says threads: null) under OMP_NUM_THREADS=1.
    run = tmp_path / "run"
    unthreaded = TINY[:-2]  # without "--threads 1"
    done = cli("train", *unthreaded, "--epochs", "2", "--out", str(run),
               env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    before = tree(tmp_path)
    done = cli("train", "--out", str(run), "--resume", "--no-progress", "--epochs", "2",
               env={"OMP_NUM_THREADS": "2"})
    one_error_line(done.returncode, done.stderr, "1 CPU thread", "has 2", "OMP_NUM_THREADS")
    assert tree(tmp_path) == before
    # the same command with the run's own count continues it
    done = cli("train", "--out", str(run), "--resume", "--no-progress", "--epochs", "2",
               env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "result.json").read_text())["threads"] == 1


# --- analysis of a run directory holding another run's checkpoint ----------------------------


@pytest.mark.parametrize("command", ["hessian", "landscape"])
def test_analysis_refuses_a_checkpoint_of_another_run(command, finished, tmp_path, capsys):
    run = copy_run(finished["seed0"], tmp_path / "a")
    (run / "checkpoint.pt").write_bytes((finished["seed1"] / "checkpoint.pt").read_bytes())
    before = tree(tmp_path)
    argv = [command, "--run", str(run), "--batches", "1", "--threads", "1", "--device", "cpu"]
    if command == "hessian":
        argv += ["--iters", "2", "--trace-samples", "0"]
    else:
        argv += ["--steps", "2"]
    rc, err = run_main(argv, capsys)
    one_error_line(rc, err, str(run / "checkpoint.pt"), "another run", "seed: 1")
    assert tree(tmp_path) == before
