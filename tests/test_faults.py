"""Faults a real run meets, in real processes: a second writer, kill -9 in the middle of a write,
a full disk, a diverging run, the parent of `compare --jobs 2` killed.

Each trainer is `python -c HOOK train ...`: HOOK installs one deterministic fault (selected by
the FAULT environment variable) before calling `agnostic_sam.cli.main`, so the window a test
needs (a writer holding the lock, a process between writing a file and renaming it into place)
is reached every time, not by luck of timing. The runs are tiny (digits, mlp, 3 epochs of 22
steps) so each process costs its start-up, a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
FLAGS = ["--dataset", "digits", "--model", "mlp", "--epochs", "3", "--device", "cpu",
         "--threads", "1", "--no-progress"]
EPOCHS = 3
START_TIMEOUT = 180  # seconds for a child to reach its fault (start-up on a loaded 2-core box)

# Installed in the child before the CLI runs. FAULT selects one fault:
#   hang-replace  hang in the FAULT_CALL-th os.replace onto a file named FAULT_TARGET (after the
#                 temporary file is written and fsynced, before the rename): a kill -9 there is
#                 a kill in the middle of an atomic write
#   hold          pause in the first checkpoint save, holding the run's lock, until FAULT_GO exists
#   nan-after     from the first checkpoint on, the training loss is NaN (the run diverges in
#                 epoch 2, with epoch 1's checkpoint as the last good one)
# FAULT_MARK is written (with the child's PID) when the fault is reached.
HOOK = r"""
import os, sys, time
from pathlib import Path

def _install():
    mode = os.environ.get("FAULT")
    mark = Path(os.environ.get("FAULT_MARK", os.devnull))
    if mode == "hang-replace":
        target, nth, real, count = (os.environ["FAULT_TARGET"], int(os.environ["FAULT_CALL"]),
                                    os.replace, [0])
        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == target:
                count[0] += 1
                if count[0] == nth:
                    mark.write_text(str(os.getpid()))
                    while True:
                        time.sleep(1)
            return real(src, dst, *args, **kwargs)
        os.replace = replace
    elif mode in ("hold", "nan-after"):
        import torch
        from agnostic_sam.train.rundir import RunDir
        real_save, saved = RunDir.save_checkpoint, [0]
        def save(self, state):
            if mode == "hold" and not saved[0]:
                mark.write_text(str(os.getpid()))
                go, deadline = Path(os.environ["FAULT_GO"]), time.time() + 300
                while not go.exists() and time.time() < deadline:
                    time.sleep(0.05)
            real_save(self, state)
            saved[0] += 1
            if mode == "nan-after":
                mark.write_text(str(os.getpid()))
        RunDir.save_checkpoint = save
        if mode == "nan-after":
            real_forward = torch.nn.CrossEntropyLoss.forward
            def forward(self, input, target):
                loss = real_forward(self, input, target)
                return loss * float("nan") if saved[0] else loss
            torch.nn.CrossEntropyLoss.forward = forward

_install()
from agnostic_sam.cli import main
sys.exit(main(sys.argv[1:]))
"""

pytestmark = pytest.mark.slow


def env(**fault: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FAULT")}
    return {**base, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", **fault}


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", HOOK, *args]


def run(*args: str, timeout: float = 300, preexec_fn=None,
        **fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), env=env(**fault), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def start(*args: str, **fault: str) -> subprocess.Popen:
    return subprocess.Popen(command(*args), env=env(**fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited with {proc.returncode} before its fault:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child did not reach its fault in {timeout} s")
        time.sleep(0.05)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("agnostic-sam: error: ") and "Traceback" not in stderr
    return lines[0]


def _no_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_files(run_dir: Path) -> dict[str, list]:
    """Every .json / .jsonl file of the run parsed strictly (NaN, Infinity raise)."""
    parsed = {}
    for path in sorted(run_dir.iterdir()):
        if path.suffix == ".json":
            parsed[path.name] = [json.loads(path.read_text(), parse_constant=_no_constant)]
        elif path.suffix == ".jsonl":
            parsed[path.name] = [json.loads(line, parse_constant=_no_constant)
                                 for line in path.read_text().splitlines() if line.strip()]
    return parsed


def metrics(run_dir: Path) -> list[dict]:
    return strict_json_files(run_dir).get("metrics.jsonl", [])


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def temps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


def assert_same_tensors(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b


def assert_equals_uninterrupted(run_dir: Path, reference: Path) -> None:
    """Bit for bit: weights, optimizer and scheduler state, every recorded epoch."""
    mine, ref = checkpoint(run_dir), checkpoint(reference)
    for key in ("model", "optimizer", "scheduler", "epoch", "step"):
        assert_same_tensors(mine[key], ref[key])
    assert without_times(metrics(run_dir)) == without_times(metrics(reference))
    result = json.loads((run_dir / "result.json").read_text(), parse_constant=_no_constant)
    expected = json.loads((reference / "result.json").read_text(), parse_constant=_no_constant)
    assert result["status"] == "finished"
    assert result["final_test_acc"] == expected["final_test_acc"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run("train", *FLAGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def killed_in_second_checkpoint(out: Path, tmp_path: Path) -> None:
    """A run killed -9 while renaming epoch 2's checkpoint into place: epoch 1's is complete."""
    mark = tmp_path / "mark"
    proc = start("train", *FLAGS, "--out", str(out), FAULT="hang-replace",
                 FAULT_TARGET="checkpoint.pt", FAULT_CALL="2", FAULT_MARK=str(mark))
    wait_for(mark, proc)
    kill9(proc)


# --- one writer per run directory -------------------------------------------------------------

def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, reference):
    out, mark, go = tmp_path / "run", tmp_path / "mark", tmp_path / "go"
    first = start("train", *FLAGS, "--out", str(out), FAULT="hold", FAULT_MARK=str(mark),
                  FAULT_GO=str(go))
    try:
        wait_for(mark, first)  # holding the lock, about to write its first checkpoint
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
        for extra in ([], ["--resume"]):
            second = run("train", *FLAGS, "--out", str(out), *extra)
            assert second.returncode == 2
            line = one_error_line(second.stderr)
            assert f"PID {first.pid}" in line and str(out) in line
            assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
        go.touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    # The run the first process wrote is whole, and is the uninterrupted run.
    assert_equals_uninterrupted(out, reference)
    assert checkpoint(out)["epoch"] == EPOCHS == len(metrics(out))
    assert temps(out) == [] and not (out / ".lock").exists()
    ckpt_bytes = (out / "checkpoint.pt").read_bytes()
    again = run("train", *FLAGS, "--out", str(out), "--resume")  # resumable: nothing left to do
    assert again.returncode == 0, again.stderr
    assert (out / "checkpoint.pt").read_bytes() == ckpt_bytes
    assert_equals_uninterrupted(out, reference)


# --- kill -9 in the middle of a write -----------------------------------------------------------

@pytest.mark.parametrize(("target", "nth", "epoch_kept"), [
    ("checkpoint.pt", "2", 1),  # epoch 2's checkpoint written to its temp file, not renamed
    ("metrics.jsonl", "3", 2),  # epoch 2's checkpoint in place, its metrics line not yet
], ids=["during-checkpoint", "between-checkpoint-and-metrics"])
def test_kill_9_during_a_write_then_resume_equals_an_uninterrupted_run(tmp_path, reference, target,
                                                                     nth, epoch_kept):
    out, mark = tmp_path / "run", tmp_path / "mark"
    proc = start("train", *FLAGS, "--out", str(out), FAULT="hang-replace", FAULT_TARGET=target,
                 FAULT_CALL=nth, FAULT_MARK=str(mark))
    wait_for(mark, proc)
    kill9(proc)

    ckpt = checkpoint(out)  # the last complete checkpoint loads
    assert ckpt["epoch"] == epoch_kept
    assert len(metrics(out)) <= ckpt["epoch"]  # metrics never ahead of the checkpoint
    if target == "checkpoint.pt":
        assert any(name.startswith(".checkpoint.pt.") for name in temps(out))
    assert not (out / "result.json").exists()

    done = run("train", *FLAGS, "--out", str(out), "--resume")  # the lock died with the process
    assert done.returncode == 0, done.stderr
    assert temps(out) == []
    assert_equals_uninterrupted(out, reference)


def test_resume_without_config_yaml_rebuilds_it_from_the_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    killed_in_second_checkpoint(out, tmp_path)
    (out / "config.yaml").unlink()
    done = run("train", "--out", str(out), "--resume", "--no-progress", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert (out / "config.yaml").is_file()
    assert_equals_uninterrupted(out, reference)


# --- a full disk --------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    killed_in_second_checkpoint(out, tmp_path)
    size = (out / "checkpoint.pt").stat().st_size
    before = (out / "checkpoint.pt").read_bytes()

    def small_files() -> None:  # in the child: no file may grow past half a checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))

    full = run("train", *FLAGS, "--out", str(out), "--resume", preexec_fn=small_files)
    assert full.returncode == 2
    line = one_error_line(full.stderr)
    assert "checkpoint" in line and "cannot write" in line
    assert (out / "checkpoint.pt").read_bytes() == before  # the previous checkpoint, untouched
    ckpt = checkpoint(out)
    assert ckpt["epoch"] == 1
    assert without_times(metrics(out)) == without_times(ckpt["metrics"])  # agree, not ahead
    assert temps(out) == [] and not (out / "result.json").exists()

    done = run("train", *FLAGS, "--out", str(out), "--resume")  # space again: it continues
    assert done.returncode == 0, done.stderr
    assert_equals_uninterrupted(out, reference)


# --- divergence is a failed run -------------------------------------------------------------------

DIVERGED = re.compile(r"^agnostic-sam: error: training diverged at epoch (\d+), step (\d+): .*; "
                      r"lower --lr$")


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_a_huge_lr_diverges_with_exit_3_and_strict_json(tmp_path, amp):
    out = tmp_path / "run"
    done = run("train", *FLAGS, "--out", str(out), "--lr", "1e6", "--amp", amp)
    assert done.returncode == 3, done.stderr
    match = DIVERGED.match(one_error_line(done.stderr))
    assert match, done.stderr
    files = strict_json_files(out)
    (result,) = files["result.json"]
    assert result["status"] == "diverged" and result["final_test_acc"] is None
    assert result["epochs_completed"] == int(match.group(1)) - 1
    if (out / "checkpoint.pt").exists():  # the last good epoch, and result.json names it
        assert (checkpoint(out)["epoch"] == result["last_good_checkpoint_epoch"]
                == int(match.group(1)) - 1)
    else:
        assert result["last_good_checkpoint_epoch"] is None
    assert temps(out) == [] and not (out / ".lock").exists()


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_divergence_in_epoch_2_keeps_epoch_1_checkpoint_marked(tmp_path, amp):
    out = tmp_path / "run"
    done = run("train", *FLAGS, "--out", str(out), "--amp", amp, FAULT="nan-after",
               FAULT_MARK=str(tmp_path / "mark"))
    assert done.returncode == 3, done.stderr
    match = DIVERGED.match(one_error_line(done.stderr))
    assert match and match.group(1) == "2", done.stderr
    ckpt = checkpoint(out)  # intact: it loads and holds epoch 1
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    files = strict_json_files(out)
    (result,) = files["result.json"]
    assert result["status"] == "diverged" and result["last_good_checkpoint_epoch"] == 1
    assert without_times(files["metrics.jsonl"]) == without_times(ckpt["metrics"])
    assert len(files["metrics.jsonl"]) == 1


# --- compare --jobs: workers die with their parent ----------------------------------------------

def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process visible in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = _process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    table = _process_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_kill_9_of_compare_jobs_2_leaves_no_process(tmp_path):
    out = tmp_path / "cmp"
    proc = start("compare", "--dataset", "digits", "--model", "mlp", "--epochs", "400",
                 "--device", "cpu", "--threads", "1", "--no-progress", "--jobs", "2",
                 "--optimizers", "sgd", "sam", "--seeds", "0", "--out", str(out))
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # until both workers train (each has written its run's config.yaml)
            if proc.poll() is not None:
                pytest.fail(f"compare exited with {proc.returncode}: "
                            f"{proc.communicate()[1][-3000:]}")
            tree |= descendants(proc.pid)
            if len(list(out.glob("*/*/config.yaml"))) >= 2 and len(tree) >= 2:
                break
            assert time.monotonic() < deadline, "compare did not start two workers"
            time.sleep(0.1)
        tree |= descendants(proc.pid)
        kill9(proc)
        deadline = time.monotonic() + 5
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(tree) == set(), f"survived their parent's kill -9: {sorted(alive(tree))}"
    finally:
        for pid in alive(tree):  # never leave our own children behind
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            kill9(proc)
