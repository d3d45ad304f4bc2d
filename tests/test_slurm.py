"""`--launcher slurm` against a real SLURM cluster (`make slurm-up`: one node, slurmctld, slurmd,
slurmdbd for sacct), as a user drives it: job arrays bit-identical to inline runs, a requeued
task resuming, a cancelled task rerun, resource flags reaching the job, bad values refused in
one line with nothing submitted, a killed launcher's array adopted by the rerun, and
`--report-only` naming each missing run with its job's state.

Marked ``slurm`` (not in the default suite); skipped in one line when no cluster answers. The
runs are tiny digits runs with one thread; tasks ask for one CPU each."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from agnostic_sam.cli import main


def _cluster_answers() -> str | None:
    """None when a SLURM cluster answers here, else why not (the skip reason)."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (sinfo not on PATH): bring a one-node cluster up with make slurm-up"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=10)
    except subprocess.TimeoutExpired:
        return "the SLURM controller does not answer (sinfo timed out): make slurm-up"
    states = done.stdout.split()
    if done.returncode or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated")
                                  for s in states):
        return f"no SLURM node is up (sinfo: {done.stdout.strip() or done.stderr.strip()!r})"
    return None


_WHY_NOT = _cluster_answers()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]
pytest.importorskip("submitit")

TIMEOUT = 180  # s: a test's wait for a job on 2 busy cores
# compare on digits with one thread a run and one CPU a task (the node has 2)
COMPARE = ["compare", "--optimizers", "sgd", "--model", "mlp", "--threads", "1", "--no-progress"]
SLURM = ["--launcher", "slurm", "--cpus-per-run", "1"]
# 15 s (a quiet Intel Xeon) to about a minute (2 busy cores) of training a run: an interrupted
# task's process lives on for up to ~7 s after SIGTERM (SLURM's kill) and must not finish the
# run meanwhile (40 epochs, 6 s here once the base step took its multi-tensor form, did)
LONG = ["--epochs", "100", "--batch-size", "32"]


def _sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout


def _wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _ledger(out: Path) -> dict[str, str]:
    """Run directory -> job id, as the launcher recorded it (in the submitit folder next to the
    runs: OUT/submitit, or OUT/sgd/submitit when all runs are sgd's)."""
    ledger: dict[str, str] = {}
    for path in out.rglob("launch.json"):
        ledger.update(json.loads(path.read_text()))
    return ledger


def _logs(out: Path, job: str) -> str:
    """The stdout log of array task ``job``."""
    return "".join(p.read_text() for p in out.rglob(f"{job}_0_log.out"))


def _job(out: Path, run: str) -> str:
    return _ledger(out)[str((out / run).resolve())]


def _sacct(array: str) -> dict[str, str]:
    """Array task -> its state in SLURM's accounting (every record, requeues included: -D)."""
    rows = _sh("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", array).splitlines()
    out: dict[str, str] = {}
    for row in rows:
        job, state = row.split("|")
        state = state.split()[0]  # "CANCELLED by 0"
        out[job] = f"{out[job]},{state}" if job in out else state
    return out


def _queued() -> dict[str, str]:
    """Job (array task) -> state, for everything in the queue now."""
    return dict(line.split("|") for line in
                _sh("squeue", "--array", "-h", "-o", "%i|%T").splitlines())


def _lock_pid(run: Path) -> int | None:
    try:
        text = (run / ".lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _training(run: Path) -> bool:
    """The run has written its first checkpoint and a process still holds it."""
    return (run / "checkpoint.pt").exists() and _lock_pid(run) is not None


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), (a, b, key)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(autouse=True)
def _cancel_what_the_test_submitted(tmp_path):
    """Every job a test submitted (its ledgers) whose run has not finished is cancelled when the
    test ends, pass or fail (a finished run's job may still be completing: left to end)."""
    yield
    jobs = {job for ledger in tmp_path.rglob("launch.json")
            for run, job in json.loads(ledger.read_text()).items()
            if not (Path(run) / "result.json").exists()}
    if jobs:
        subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def inline_long(tmp_path_factory) -> Path:
    """The reference: seeds 0 and 1 of the LONG compare, trained inline in this process."""
    out = tmp_path_factory.mktemp("inline") / "cmp"
    assert main([*COMPARE, *LONG, "--seeds", "0", "1", "--launcher", "inline",
                 "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- arrays = inline


def test_compare_job_array_equals_inline(tmp_path, capsys):
    """A compare becomes one job array (sacct lists its tasks, named agnostic-sam, completed);
    every run's weights and the comparison's numbers equal --launcher inline bit for bit. The
    default --gpus-per-run suits a cluster without GPUs (no gpu GRES here)."""
    common = [*COMPARE, "--seeds", "0", "1", "--epochs", "1", "--max-steps", "5"]
    assert main([*common, "--launcher", "inline", "--out", str(tmp_path / "inline")]) == 0
    rc, _, err = _cli([*common, *SLURM, "--wait", "--out", str(tmp_path / "slurm")], capsys)
    assert rc == 0, err
    array = _job(tmp_path / "slurm", "sgd/seed0").split("_")[0]
    assert f"submitted job array {array}: 2 task(s)" in err
    assert "(no GPUs: the default partition has no gpu GRES, as --gpus-per-run 0)" in err
    _wait_for(lambda: _sacct(array) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"},
              "sacct to list the array's tasks as completed", 30)
    assert _sh("sacct", "-X", "-n", "-P", "-o", "JobName", "-j", array).split() == \
        ["agnostic-sam"] * 2
    for seed in (0, 1):
        _assert_same_weights(tmp_path / "inline" / "sgd" / f"seed{seed}",
                             tmp_path / "slurm" / "sgd" / f"seed{seed}")
    summaries = [json.loads((tmp_path / k / "comparison.json").read_text())["summary"]
                 for k in ("inline", "slurm")]
    assert summaries[0]["sgd"]["per_seed"] == summaries[1]["sgd"]["per_seed"]


def _is_tuning_run(run: Path) -> bool:
    return (yaml.safe_load((run / "config.yaml").read_text()).get("val_fraction") or 0) > 0


@pytest.mark.parametrize("study", ["table2-digits", "family-digits"])
def test_reproduce_digits_smoke_arrays_equal_inline(tmp_path, capsys, study):
    """`reproduce <study> --smoke` with --launcher slurm --wait: its tuning phase and its final
    phase each become a job array (the final runs need the tuned settings), and the report
    equals the inline one. To keep it short the slurm folder starts from the inline runs less
    two tuning and two final runs: those four are trained on SLURM and must come out
    bit-identical. family-digits is the family study (every method, both budgets)."""
    common = ["reproduce", study, "--smoke", "--seeds", "0", "--tune-seeds", "0",
              "--threads", "1", "--no-progress"]
    assert main([*common, "--launcher", "inline", "--out", str(tmp_path / "inline")]) == 0
    shutil.copytree(tmp_path / "inline" / "runs", tmp_path / "slurm" / "runs")
    runs = sorted((tmp_path / "slurm" / "runs").iterdir())
    tuning = [r for r in runs if _is_tuning_run(r)]
    final = [r for r in runs if not _is_tuning_run(r)]
    redo = tuning[:2] + final[:2]
    for run in redo:
        shutil.rmtree(run)
    capsys.readouterr()
    rc, stdout, err = _cli([*common, *SLURM, "--wait", "--out", str(tmp_path / "slurm")], capsys)
    assert rc == 0, err
    arrays = re.findall(r"submitted job array (\d+): 2 task\(s\)", stdout)  # reproduce's log
    assert len(arrays) == 2, stdout  # one array per phase
    for array in arrays:
        _wait_for(lambda a=array: sorted(_sacct(a).values()) == ["COMPLETED"] * 2,
                  f"sacct to list array {array} as completed", 30)
    for run in redo:
        _assert_same_weights(tmp_path / "inline" / "runs" / run.name, run)

    def timeless(value):  # the report without its wall times
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if "second" not in k}
        return [timeless(v) for v in value] if isinstance(value, list) else value

    reports = [json.loads((tmp_path / kind / "report.json").read_text())["tables"]
               for kind in ("inline", "slurm")]
    assert timeless(reports[0]) == timeless(reports[1])
    assert reports[0][study]["panels"] and reports[0][study]["tuning"]


# ----------------------------------------------------------------------------- interruptions


def test_requeued_task_resumes_bit_identical_and_keeps_its_log(tmp_path, capsys, inline_long):
    """`scontrol requeue` of a running task (what a preemption does): SLURM kills it and runs
    it again; the task resumes from the run's checkpoint and ends bit-identical to the inline
    run; its log holds both starts (appended, not truncated)."""
    out = tmp_path / "cmp"
    rc, _, err = _cli([*COMPARE, *LONG, "--seeds", "0", *SLURM, "--out", str(out)], capsys)
    assert rc == 0, err
    run, job = out / "sgd" / "seed0", _job(out, "sgd/seed0")
    _wait_for(lambda: _training(run), "the task's first checkpoint")
    assert not (run / "result.json").exists()  # requeued mid-run
    _sh("scontrol", "requeue", job)
    _wait_for(lambda: (run / "result.json").exists() and job not in _queued(),
              "the requeued task to finish")
    _assert_same_weights(inline_long / "sgd" / "seed0", run)
    log = _logs(out, job)
    assert log.count(f"agnostic-sam: starting {run}") == 1, log
    assert log.count(f"agnostic-sam: resuming {run}") == 1, log
    assert log.index("starting") < log.index("resuming")
    _wait_for(lambda: _sacct(job).get(job) == "REQUEUED,COMPLETED", "sacct to show the requeue",
              30)
    rc, stdout, err = _cli([*COMPARE, *LONG, "--seeds", "0", *SLURM, "--out", str(out)], capsys)
    assert rc == 0 and "submitted" not in err and "final test acc" in stdout


def test_cancelled_task_is_reported_and_the_rerun_submits_only_it(tmp_path, capsys, inline_long):
    """`scancel` of one task of a waiting launcher: the launcher ends in one line naming the
    run; --report-only counts it missing and names it cancelled; the rerun submits one task
    and both runs end bit-identical to inline."""
    out = tmp_path / "cmp"
    argv = [*COMPARE, *LONG, "--seeds", "0", "1", *SLURM, "--out", str(out)]
    launcher = subprocess.Popen([sys.executable, "-m", "agnostic_sam", *argv, "--wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = out / "sgd" / "seed0"
    try:
        _wait_for(lambda: _training(victim), "seed0 to train")
        _sh("scancel", _job(out, "sgd/seed0"))
        _, stderr = launcher.communicate(timeout=TIMEOUT)
    finally:
        launcher.kill()
    assert launcher.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("agnostic-sam: error: 1 run(s) failed; the first, ") and \
        str(victim) in last, stderr
    _wait_for(lambda: _sacct(_job(out, "sgd/seed0")).get(_job(out, "sgd/seed0")) == "CANCELLED",
              "sacct to show the cancelled task", 30)
    rc, stdout, err = _cli([*argv, "--report-only"], capsys)
    assert rc == 0, err
    assert "1 of 2 final runs are missing" in stdout
    assert f"  cancelled (job {_job(out, 'sgd/seed0')}): {victim}" in stdout
    rc, _, err = _cli([*argv, "--wait"], capsys)
    assert rc == 0, err
    assert re.search(r"submitted job \d+: 1 task\(s\)", err), err
    for seed in (0, 1):
        _assert_same_weights(inline_long / "sgd" / f"seed{seed}", out / "sgd" / f"seed{seed}")


def test_killed_launcher_rerun_adopts_the_running_array(tmp_path, capsys, inline_long):
    """kill -9 of a --wait launcher: its array goes on. A rerun with the same arguments
    submits nothing and says which jobs hold the runs; with --wait it waits for them and
    builds the report. sacct shows the one array only; the runs equal inline."""
    out = tmp_path / "cmp"
    argv = [*COMPARE, *LONG, "--seeds", "0", "1", *SLURM, "--out", str(out)]
    launcher = subprocess.Popen([sys.executable, "-m", "agnostic_sam", *argv, "--wait"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: all(_training(out / "sgd" / f"seed{s}") for s in (0, 1)),
                  "both runs to train")
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    jobs = [_job(out, f"sgd/seed{s}") for s in (0, 1)]
    assert all(_queued().get(j) == "RUNNING" for j in jobs)  # the array goes on
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err
    assert "left to earlier jobs, not submitted again: 2 run(s): " in err
    assert f"{jobs[0]} (running) {out / 'sgd' / 'seed0'}" in err and "submitted job" not in err
    assert "2 runs on SLURM" in stdout
    rc, stdout, err = _cli([*argv, "--wait"], capsys)
    assert rc == 0, err
    assert "waiting for 0 task(s) submitted now and 2 earlier" in err and "submitted job" not in err
    assert (out / "comparison.json").exists() and "final test acc" in stdout
    array = jobs[0].split("_")[0]
    assert sorted(_sacct(array)) == jobs and len(_ledger(out)) == 2  # no duplicate submitted
    for seed in (0, 1):
        _assert_same_weights(inline_long / "sgd" / f"seed{seed}", out / "sgd" / f"seed{seed}")


def test_report_only_names_each_missing_run_and_its_state(tmp_path, capsys):
    """Six runs, two at a time: task 0's process killed (failed), task 1 cancelled, tasks 2-3
    running, 4-5 queued: --report-only names every one with its job and state."""
    out = tmp_path / "cmp"
    argv = [*COMPARE, "--epochs", "2000", "--seeds", *map(str, range(6)), *SLURM,
            "--max-parallel", "2", "--out", str(out)]
    rc, _, err = _cli(argv, capsys)
    assert rc == 0, err
    runs = [out / "sgd" / f"seed{s}" for s in range(6)]
    jobs = [_job(out, f"sgd/seed{s}") for s in range(6)]
    _wait_for(lambda: _training(runs[0]) and _training(runs[1]), "tasks 0 and 1 to train")
    os.kill(_lock_pid(runs[0]), signal.SIGKILL)
    _sh("scancel", jobs[1])
    _wait_for(lambda: [_queued().get(j) for j in jobs[2:]] == ["RUNNING"] * 2 + ["PENDING"] * 2
              and _sacct(jobs[0].split("_")[0]).get(jobs[0]) == "FAILED"
              and _sacct(jobs[0].split("_")[0]).get(jobs[1]) == "CANCELLED",
              "the failed, cancelled, running and queued tasks")
    rc, stdout, err = _cli([*argv, "--report-only"], capsys)
    assert rc == 2 and err.strip() == "agnostic-sam: error: no final run has finished yet: " \
                                      "nothing to report"
    assert "6 of 6 final runs are missing" in stdout
    words = ["failed (FAILED)", "cancelled", "running", "running", "queued", "queued"]
    for word, job, run in zip(words, jobs, runs):
        assert f"  {word} (job {job}): {run}\n" in stdout, stdout


# ----------------------------------------------------------------------------- flags


def test_resource_flags_reach_the_job(tmp_path, capsys):
    """--partition, --time, --mem-gb, --cpus-per-run, --gpus-per-run, --max-parallel and
    --sbatch as `scontrol show job` reports them."""
    out = tmp_path / "cmp"
    rc, _, err = _cli([*COMPARE, "--epochs", "2000", "--seeds", "0", "1", "2", *SLURM,
                       "--partition", "debug", "--time", "0-00:07:30", "--mem-gb", "1.5",
                       "--gpus-per-run", "0", "--max-parallel", "1",
                       "--sbatch", "comment=agsam-flags", "--out", str(out)], capsys)
    assert rc == 0, err
    array = _job(out, "sgd/seed0").split("_")[0]
    shown = _sh("scontrol", "show", "job", array)
    for field in ("Partition=debug", "TimeLimit=00:08:00", "MinMemoryNode=1.50G",
                  "NumCPUs=1", "Comment=agsam-flags", "JobName=agnostic-sam"):
        assert field in shown, field
    assert re.search(r"ArrayTaskThrottle=1\b", shown) and "gpu" not in shown.lower()
    _wait_for(lambda: sum(s == "RUNNING" for s in _queued().values()) == 1, "one task to run")
    time.sleep(2)  # the scheduler had time to start a second one, against --max-parallel 1
    assert sum(s == "RUNNING" for s in _queued().values()) == 1


@pytest.mark.parametrize("flags, needle", [
    (["--partition", "gpu"], "SLURM has no partition 'gpu'; choose from debug"),
    (["--gpus-per-run", "1"], "the nodes of the default partition have no GPUs (no gpu GRES), "
                              "and --gpus-per-run 1 asks for more: use --gpus-per-run 0"),
    (["--mem-gb", "4000"], "the nodes of the default partition have at most "),
    (["--cpus-per-run", "64"], "the nodes of the default partition have at most 2 CPUs, and "
                               "--cpus-per-run 64 asks for more: use --cpus-per-run 2"),
    (["--sbatch", "constraint=h200"], "sbatch refused the job array of 2 tasks (nothing was "
                                      "submitted): Batch job submission failed: Invalid feature "
                                      "specification; use --sbatch constraint=FEATURE"),
    (["--partition", "debug\n#SBATCH --wrap=id"], "launcher partition must be a partition name"),
    (["--sbatch", "comment=x\n#SBATCH --wrap=id"], "has a value an #SBATCH line must not hold"),
    (["--mem-gb", "nan"], "launcher mem_gb must be a number of GB"),
    (["--time", "1-99:99:99"], "launcher time must be minutes or one of SLURM's"),
])
def test_bad_values_are_one_line_and_submit_nothing(tmp_path, capsys, flags, needle):
    before = set(_queued())
    out = tmp_path / "cmp"
    rc, _, err = _cli([*COMPARE, "--epochs", "1", "--seeds", "0", "1", *SLURM, *flags,
                       "--out", str(out)], capsys)
    assert rc == 2 and err.startswith("agnostic-sam: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert set(_queued()) <= before  # nothing queued
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no ledger, pickle or script
