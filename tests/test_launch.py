"""Sweep launchers: runs are trained once by their state (finished skipped, partial resumed,
running left alone), every launcher gives the numbers of the inline one bit for bit (a
preempted or killed submitit task included), the SLURM dry run shows the array, and local
workers die with a killed launcher."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from agnostic_sam.cli.launcher import add_launcher_arguments, launcher_from_args
from agnostic_sam.errors import UsageError
from agnostic_sam.launch import LauncherConfig, launch, launcher_config
from agnostic_sam.train import TrainConfig
from agnostic_sam.train.rundir import RunDir


def _cfg(out: Path, seed: int = 0, **changes) -> TrainConfig:
    settings = dict(dataset="digits", model="mlp", epochs=2, batch_size=64, seed=seed, device="cpu",
                    threads=1, progress=False, out=str(out))
    return TrainConfig(**{**settings, **changes})


def _numbers(out: Path) -> tuple[list[dict], dict, dict]:
    """What a run computed: metrics rows (without wall times), result accuracies, final weights."""
    rows = [{k: v for k, v in row.items() if k != "epoch_seconds"}
            for row in RunDir(out).read_metrics()]
    result = RunDir(out).read_result()
    accuracies = {k: result[k] for k in ("status", "final_test_acc", "best_test_acc",
                                         "final_test_loss")}
    return rows, accuracies, RunDir(out).load_checkpoint()["model"]


def _assert_same_run(a: Path, b: Path) -> None:
    rows_a, result_a, weights_a = _numbers(a)
    rows_b, result_b, weights_b = _numbers(b)
    assert rows_a == rows_b and rows_a
    assert result_a == result_b and result_a["status"] == "finished"
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _lock_pid(out: Path) -> int | None:
    """The PID of the process training ``out`` (its lock file), None before it starts."""
    try:
        text = (out / ".lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ----------------------------------------------------------------------------- by state


def test_finished_run_is_not_rerun(tmp_path):
    out = tmp_path / "run"
    reported = []
    first = launch([_cfg(out, max_steps=5)], progress=False, on_done=reported.append)
    assert [(r.action, r.status) for r in first.runs] == [("trained", "finished")]
    assert reported == first.runs
    before = _mtimes(out)
    again = launch([_cfg(out, max_steps=5)], progress=False, on_done=reported.append)
    assert reported[1:] == again.runs
    assert ([(r.state, r.action, r.status) for r in again.runs]
            == [("finished", "skipped", "finished")])
    assert _mtimes(out) == before  # no file written, touched or added (not even a lock file)


def test_partial_run_is_resumed(tmp_path):
    out = tmp_path / "run"
    launch([_cfg(out, max_steps=5)], progress=False)
    expected = _numbers(out)[0]
    (out / "result.json").unlink()  # a checkpoint without a result: killed at the very end
    summary = launch([_cfg(out, max_steps=5)], progress=False)
    assert ([(r.state, r.action, r.status) for r in summary.runs]
            == [("partial", "resumed", "finished")])
    assert _numbers(out)[0] == expected


def test_running_run_is_left_alone(tmp_path):
    out = tmp_path / "run"
    with RunDir(out).lock():  # another writer holds the run
        summary = launch([_cfg(out)], progress=False)
    assert ([(r.state, r.action, r.status) for r in summary.runs]
            == [("running", "left running", None)])
    assert not (out / "config.yaml").exists()
    assert "another process is writing it" in summary.text()


def test_a_diverged_run_is_a_result_and_the_sweep_goes_on(tmp_path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    summary = launch([_cfg(bad, lr=1e12, epochs=1, max_steps=3), _cfg(good, max_steps=3)],
                     progress=False)
    assert [r.status for r in summary.runs] == ["diverged", "finished"]
    summary.raise_for_errors()  # diverging is not an error of the sweep
    again = launch([_cfg(bad, lr=1e12, epochs=1, max_steps=3)], progress=False)
    assert ([(r.state, r.action, r.status) for r in again.runs]
            == [("failed", "skipped", "diverged")])


def test_two_runs_in_one_directory_are_refused(tmp_path):
    with pytest.raises(UsageError, match="share the run directory"):
        launch([_cfg(tmp_path / "r", seed=0), _cfg(tmp_path / "r", seed=1)], progress=False)


def test_a_directory_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    launch([_cfg(out, max_steps=2)], progress=False)
    with pytest.raises(UsageError, match=r"holds a .*seed"):
        launch([_cfg(out, max_steps=2, seed=7)], progress=False)


def test_submitit_task_decides_resume_when_it_starts(tmp_path):
    """What a requeued array task does, by the state it finds: a task preempted before its
    first checkpoint starts afresh, a partial run resumes, a finished one is left as it is;
    `checkpoint` requeues the same call."""
    pytest.importorskip("submitit")
    from agnostic_sam.launch import SubmititRun

    out = tmp_path / "run"
    cfg = _cfg(out, max_steps=4)
    RunDir(out).path.mkdir()
    RunDir(out).write_config(cfg)  # what a kill in the first epoch leaves
    RunDir(out).write_metrics([])
    task = SubmititRun()
    assert task(cfg) == {"status": "finished", "error": None}
    expected = _numbers(out)[0]
    before = _mtimes(out)
    assert task(cfg)["status"] == "finished" and _mtimes(out) == before  # finished: untouched
    (out / "result.json").unlink()
    assert task(cfg)["status"] == "finished" and _numbers(out)[0] == expected  # resumed
    again = task.checkpoint(cfg)
    assert again.function is task and again.args == (cfg,)


# ----------------------------------------------------------------------------- configuration


def test_launcher_config_from_yaml_keys_and_flags():
    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    args = parser.parse_args(["--launcher", "slurm", "--partition", "gpu", "--time", "1-02:00:00",
                              "--gpus-per-run", "2", "--sbatch", "account=proj", "--sbatch",
                              "qos=high",
                              "--sbatch", "requeue"])
    lc = launcher_from_args(args,
                            {"cpus_per_run": 8, "mem_gb": 64, "sbatch": {"constraint": "h200"}})
    assert (lc.kind, lc.partition, lc.time, lc.gpus_per_run, lc.cpus_per_run, lc.mem_gb) == \
        ("slurm", "gpu", 26 * 60, 2, 8, 64)
    assert lc.sbatch == {"constraint": "h200", "account": "proj", "qos": "high", "requeue": True}
    local = launcher_from_args(parser.parse_args(["--jobs", "3"]))
    assert (local.kind, local.jobs) == ("local", 3)  # --jobs N alone means worker processes
    yaml_local = {"kind": "local", "jobs": 2}
    # a default --jobs 1
    assert launcher_from_args(argparse.Namespace(jobs=1), yaml_local).jobs == 2
    assert launcher_from_args(argparse.Namespace(jobs=1), {"kind": "slurm"}).kind == "slurm"
    assert launcher_config({"time": "02:30:00"}).time == 150
    assert launcher_config({"time": "90"}).time == 90


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("02:30", 3), ("0:59", 1), ("02:30:00", 150), ("25:00:00", 1500), ("1-02", 1560),
    ("1-02:30", 1590), ("1-02:30:15", 1591), ("0-23:59:59", 1440)])
def test_launcher_time_reads_slurm_formats(text, minutes):
    """SLURM's --time formats (sbatch(1)): MM:SS is minutes and seconds, not hours; seconds
    round up to a minute."""
    assert launcher_config({"time": text}).time == minutes


@pytest.mark.parametrize("values, message", [
    ({"kind": "pbs"}, "unknown launcher 'pbs'; choose from inline, local, slurm"),
    ({"kind": "local", "jobs": 0}, "launcher jobs must be an integer >= 1, got 0"),
    ({"kind": "slurm", "jobs": 2}, "--jobs is for --launcher local, not slurm"),
    ({"time": "soon"}, "launcher time must be minutes or one of SLURM's MM:SS, HH:MM:SS, "
                       "D-HH, D-HH:MM, D-HH:MM:SS, got 'soon'"),
    ({"time": "1-99:99:99"}, "launcher time must be minutes or one of SLURM's"),
    ({"time": "1-24:00"}, "launcher time must be minutes or one of SLURM's"),
    ({"time": "1:60:00"}, "launcher time must be minutes or one of SLURM's"),
    ({"time": "367-00"}, "launcher time must be at most a year (527040 minutes), got 528480"),
    ({"gpus_per_run": -1}, "launcher gpus_per_run must be an integer >= 0, got -1"),
    ({"mem_gb": 0}, "launcher mem_gb must be a number of GB from 0.001 (1 MB) to 65536, got 0"),
    ({"mem_gb": float("nan")}, "launcher mem_gb must be a number of GB from 0.001"),
    ({"mem_gb": float("inf")}, "launcher mem_gb must be a number of GB from 0.001"),
    ({"mem_gb": 1e30}, "launcher mem_gb must be a number of GB from 0.001"),
    ({"partition": "gpu\n#SBATCH --wrap=id"}, "launcher partition must be a partition name"),
    ({"partition": "gpu;id"}, "launcher partition must be a partition name"),
    ({"sbatch": {"account": "x\n#SBATCH --wrap=id"}},
     "launcher sbatch option 'account' has a value an #SBATCH line must not hold"),
    ({"sbatch": {"comment": "$(id)"}},
     "launcher sbatch option 'comment' has a value an #SBATCH line must not hold"),
    ({"sbatch": {"requeue\n#SBATCH --wrap=id": True}},
     "launcher sbatch option 'requeue\\n#SBATCH --wrap=id' is not an sbatch option name"),
    ({"folder": "logs\n#SBATCH --wrap=id"}, "launcher folder must be a path without control"),
    ({"sbatch": {"Bad Key": 1}}, "launcher sbatch option 'Bad Key' is not an sbatch option name"),
    ({"sbatch": "account=x"}, "launcher sbatch must map option names to values"),
    ({"sbatch": {"qos": None}},
     "launcher sbatch option 'qos' needs a value (or true for a bare flag)"),
    ({"gpu": 1}, "unknown launcher key 'gpu'; choose from kind, jobs, partition"),
])
def test_bad_launcher_settings_are_one_line(values, message):
    """Nothing that could add a line to the job script (a newline, a shell metacharacter)
    reaches an #SBATCH line; memory and time are finite, sane and in SLURM's formats."""
    with pytest.raises(UsageError) as info:
        launcher_config(values)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- slurm dry run


def test_slurm_dry_run_prints_the_job_array(tmp_path, capsys):
    pytest.importorskip("submitit")
    done = tmp_path / "runs" / "done"
    launch([_cfg(done, max_steps=2)], progress=False)
    cfgs = [_cfg(done, max_steps=2)] + [_cfg(tmp_path / "runs" / f"s{s}", seed=s)
                                        for s in (1, 2, 3)]
    lc = launcher_config({"kind": "slurm", "partition": "gpu", "time": 90, "gpus_per_run": 1,
                          "cpus_per_run": 8, "mem_gb": 32, "max_parallel": 2,
                          "sbatch": {"account": "proj", "requeue": True}})
    capsys.readouterr()
    summary = launch(cfgs, lc, dry_run=True, progress=False)
    printed = capsys.readouterr().out
    assert "slurm: job array of 3 tasks (of 4 runs; at most 2 at once)" in printed
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                 "#SBATCH --account=proj", "#SBATCH --requeue", "#SBATCH --signal=USR2@90"):
        assert line in printed, line
    for s in (1, 2, 3):
        assert f"task {s - 1}: {tmp_path / 'runs' / f's{s}'} (new -> trained)" in printed
    assert f"not submitted: {done} (finished -> skipped)" in printed
    assert [r.action for r in summary.runs] == ["skipped", "planned", "planned", "planned"]
    assert not (tmp_path / "runs" / "submitit").exists() and not (tmp_path / "runs" / "s1").exists()


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_local_workers_equal_inline(tmp_path):
    inline = [_cfg(tmp_path / "inline" / f"s{s}", seed=s) for s in (0, 1)]
    local = [_cfg(tmp_path / "local" / f"s{s}", seed=s) for s in (0, 1)]
    launch(inline, LauncherConfig(), progress=False)
    summary = launch(local, LauncherConfig(kind="local", jobs=2), progress=False)
    assert [(r.action, r.status) for r in summary.runs] == [("trained", "finished")] * 2
    for s in (0, 1):
        _assert_same_run(tmp_path / "inline" / f"s{s}", tmp_path / "local" / f"s{s}")


@pytest.mark.slow
def test_a_killed_worker_takes_only_its_run(tmp_path):
    """kill -9 of one local worker: its run is reported and stays partial, the other runs
    finish (a new worker takes the slot), and the next launch resumes the killed run."""
    import threading

    cfgs = [_cfg(tmp_path / f"s{s}", seed=s, epochs=8, batch_size=32) for s in (0, 1, 2)]
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault(
        "summary", launch(cfgs, LauncherConfig(kind="local", jobs=2), progress=False)))
    thread.start()
    victim = tmp_path / "s0"
    _wait_for(lambda: (victim / "checkpoint.pt").exists() and _lock_pid(victim), 240, "s0 to train")
    assert not (victim / "result.json").exists()
    os.kill(_lock_pid(victim), signal.SIGKILL)
    thread.join(300)
    summary = box["summary"]
    assert [r.status for r in summary.runs] == ["error", "finished", "finished"]
    assert "worker exited with status -9" in summary.runs[0].error
    with pytest.raises(UsageError, match="1 run\\(s\\) failed; the first, .*s0: worker exited"):
        summary.raise_for_errors()
    again = launch(cfgs, progress=False)
    assert [(r.state, r.action, r.status) for r in again.runs] == [
        ("partial", "resumed", "finished"), ("finished", "skipped", "finished"),
        ("finished", "skipped", "finished")]


@pytest.mark.slow
def test_submitit_preempted_and_killed_tasks_end_identical(tmp_path, monkeypatch):
    """submitit's LocalExecutor (real processes, the code path of SLURM without a scheduler):
    task 0 gets the preemption signal (USR2) after its first epoch and is requeued by submitit;
    task 1 is killed with kill -9 and relaunched. Both end bit-identical to inline runs."""
    pytest.importorskip("submitit")
    settings = dict(epochs=8, batch_size=32)
    reference = [_cfg(tmp_path / "inline" / f"s{s}", seed=s, **settings) for s in (0, 1)]
    launch(reference, LauncherConfig(), progress=False)
    outs = [tmp_path / "sweep" / f"s{s}" for s in (0, 1)]
    cfgs = [_cfg(out, seed=s, **settings) for s, out in enumerate(outs)]
    lc = launcher_config({"kind": "slurm", "submitit_cluster": "local", "gpus_per_run": 0,
                          "folder": str(tmp_path / "submitit")})
    slurm_calls = _fake_slurm(tmp_path, monkeypatch)  # SLURM's client here must change nothing
    submitted = launch(cfgs, lc, progress=False)
    assert [r.action for r in submitted.runs] == ["submitted", "submitted"]

    for out, sig in zip(outs, (signal.SIGUSR2, signal.SIGKILL)):
        _wait_for(lambda out=out: (out / "checkpoint.pt").exists() and _lock_pid(out), 240,
                  f"the first checkpoint of {out}")
        assert not (out / "result.json").exists()  # interrupted mid-run, not after it
        os.kill(_lock_pid(out), sig)
    # finished: its result written and its lock released (a moment later)
    _wait_for(lambda: (outs[0] / "result.json").exists() and not RunDir(outs[0]).locked_by_other(),
              240, "the requeued task to finish")
    _wait_for(lambda: not RunDir(outs[1]).locked_by_other(), 60, "the killed task's lock to go")
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "submitit").rglob("*_log.*"))
    assert "Requeued job" in logs  # submitit checkpointed and requeued the preempted task
    assert RunDir(outs[1]).state(cfgs[1]) == "partial"

    relaunched = launch(cfgs, launcher_config({**vars(lc), "wait": True}), progress=False)
    assert ([(r.action, r.status) for r in relaunched.runs]
            == [("skipped", "finished"), ("resumed", "finished")]), relaunched.text()
    for ref, out in zip(reference, outs):
        _assert_same_run(Path(ref.out), out)
    assert not slurm_calls.exists()


_KILLED_LAUNCHER = textwrap.dedent("""
    import sys
    from agnostic_sam.launch import LauncherConfig, launch
    from agnostic_sam.train import TrainConfig

    if __name__ == "__main__":
        root = sys.argv[1]
        cfgs = [TrainConfig(dataset="digits", model="mlp", epochs=10_000, seed=s, device="cpu",
                            threads=1, progress=False, out=f"{root}/s{s}") for s in (0, 1)]
        launch(cfgs, LauncherConfig(kind="local", jobs=2), progress=False)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_launcher_leaves_no_worker(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(_KILLED_LAUNCHER)
    outs = [tmp_path / "runs" / f"s{s}" for s in (0, 1)]
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs")])
    try:
        for out in outs:
            _wait_for(lambda out=out: (out / "checkpoint.pt").exists() and _lock_pid(out), 240,
                      f"{out} to train")
        workers = [_lock_pid(out) for out in outs]
        assert all(_alive(pid) for pid in workers) and parent.pid not in workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        time.sleep(5)
        assert [pid for pid in workers if _alive(pid)] == []
        before = {out: _mtimes(out) for out in outs}
        time.sleep(1)
        assert {out: _mtimes(out) for out in outs} == before  # nobody is writing
    finally:
        if parent.poll() is None:
            parent.kill()
    cfg = TrainConfig(dataset="digits", model="mlp", epochs=10_000, seed=0, device="cpu",
                      out=str(outs[0]))
    assert RunDir(outs[0]).state(cfg) == "partial"  # resumable: the lock went with the worker


def test_slurm_does_not_submit_a_queued_run_twice(tmp_path, capsys, monkeypatch):
    """A run submitted earlier whose job sacct still lists as pending is left to that job."""
    pytest.importorskip("submitit")
    import agnostic_sam.launch.slurm as launch_module

    folder = tmp_path / "submitit"
    folder.mkdir()
    queued, fresh = tmp_path / "runs" / "queued", tmp_path / "runs" / "fresh"
    (folder / "launch.json").write_text(json.dumps({str(queued.resolve()): "999_0"}))
    monkeypatch.setattr(launch_module, "job_states", lambda ids: {i: "PENDING" for i in ids})
    lc = launcher_config({"kind": "slurm", "folder": str(folder), "gpus_per_run": 0})
    summary = launch([_cfg(queued), _cfg(fresh, seed=1)], lc, dry_run=True, progress=False)
    printed = capsys.readouterr().out
    assert "slurm: job array of 1 task (of 2 runs" in printed
    assert f"not submitted: {queued} (new -> queued)" in printed
    assert "--gpus-per-node" not in printed  # no GPU asked for: no GPU line
    assert [(r.action, r.job_id) for r in summary.runs] == [("queued", "999_0"), ("planned", None)]


# ----------------------------------------------------------------------------- slurm, no cluster


def _fake_slurm(tmp_path: Path, monkeypatch, *, gres: str = "(null)",
                sbatch_error: str | None = None) -> Path:
    """sinfo/squeue/sacct/sbatch/srun stand-ins first on PATH: each call is appended to the file
    returned; sinfo has one partition, ``debug``, whose nodes have ``gres``; sbatch prints
    ``sbatch_error`` and fails (it never submits)."""
    bin_dir, calls = tmp_path / "fake-bin", tmp_path / "slurm-calls"
    bin_dir.mkdir()
    answers = {"sinfo": f'case "$*" in *%P*) echo "debug*";; *) echo "2|4096|{gres}";; esac',
               "sbatch": f'echo "{sbatch_error or "sbatch: error: refused"}" >&2; exit 1',
               "squeue": "true", "sacct": "true", "srun": "exit 1"}
    for tool, body in answers.items():
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n{body}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


_COMPARE = ["compare", "--optimizers", "sgd", "--seeds", "0", "1", "--epochs", "1",
            "--max-steps", "2", "--model", "mlp_mini", "--no-progress", "--launcher", "slurm"]


@pytest.mark.parametrize("flags, needle", [
    (["--partition", "gpu\n#SBATCH --wrap=id"], "launcher partition must be a partition name"),
    (["--sbatch", "account=x\n#SBATCH --wrap=id"],
     "launcher sbatch option 'account' has a value an #SBATCH line must not hold"),
    (["--sbatch", "requeue\n#SBATCH --wrap=id"], "is not an sbatch option name"),
    (["--mem-gb", "nan"], "launcher mem_gb must be a number of GB from 0.001 (1 MB) to 65536"),
    (["--mem-gb", "1e30"], "launcher mem_gb must be a number of GB from 0.001 (1 MB) to 65536"),
    (["--time", "1-99:99:99"], "launcher time must be minutes or one of SLURM's"),
])
def test_bad_slurm_flags_exit_2_before_anything_is_submitted(tmp_path, capsys, monkeypatch,
                                                            flags, needle):
    from agnostic_sam.cli import main

    calls = _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "cmp"
    assert main([*_COMPARE, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agnostic-sam: error: ") and err.count("\n") == 1 and needle in err
    assert not out.exists() and not calls.exists()  # no file, no SLURM command


@pytest.mark.parametrize("gres, flags, sbatch_error, needle", [
    ("(null)", ["--gpus-per-run", "1"], None,
     "the nodes of the default partition have no GPUs (no gpu GRES), and --gpus-per-run 1 asks "
     "for more: use --gpus-per-run 0"),
    ("gpu:2", ["--gpus-per-run", "4"], None, "have at most 2 GPUs, and --gpus-per-run 4 asks "
                                             "for more: use --gpus-per-run 2"),
    ("(null)", ["--cpus-per-run", "3"], None, "have at most 2 CPUs, and --cpus-per-run 3 asks "
                                              "for more: use --cpus-per-run 2"),
    ("(null)", ["--mem-gb", "4.5"], None, "have at most 4 GB, and --mem-gb 4.5 asks for more: "
                                          "use --mem-gb 4"),
    ("(null)", ["--partition", "gpu"], None, "SLURM has no partition 'gpu'; choose from debug"),
    ("(null)", ["--mem-gb", "2"],
     "sbatch: error: Memory specification can not be satisfied\\nsbatch: error: Batch job "
     "submission failed: Requested node configuration is not available",
     "sbatch refused the job array of 2 tasks (nothing was submitted): Batch job submission "
     "failed: Requested node configuration is not available; lower --mem-gb"),
])
def test_slurm_refusals_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, gres, flags,
                                                      sbatch_error, needle):
    """What sinfo shows is checked before sbatch runs; what sbatch refuses is one line (not
    submitit's traceback), and the files submitit wrote for the array are gone again."""
    pytest.importorskip("submitit")
    from agnostic_sam.cli import main

    calls = _fake_slurm(tmp_path, monkeypatch, gres=gres, sbatch_error=sbatch_error)
    out = tmp_path / "cmp"
    assert main([*_COMPARE, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agnostic-sam: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert ("sbatch " in calls.read_text()) == (sbatch_error is not None)
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no ledger, pickle or script


def test_no_gpus_on_the_cluster_means_no_gpu_line(tmp_path, capsys, monkeypatch):
    """The default --gpus-per-run follows the partition: none where sinfo shows no gpu GRES
    (the job script then asks for no GPU), 1 where it shows one."""
    pytest.importorskip("submitit")
    for gres, line in (("(null)", None), ("gpu:a100:4(S:0-1)", "#SBATCH --gpus-per-node=1")):
        root = tmp_path / f"gres{len(gres)}"  # the second stand-in comes first on PATH
        root.mkdir()
        _fake_slurm(root, monkeypatch, gres=gres)
        launch([_cfg(root / "r")], launcher_config({"kind": "slurm"}), dry_run=True,
               progress=False)
        printed = capsys.readouterr().out
        assert ("--gpus-per-node" not in printed) if line is None else (line in printed)


def test_local_runs_stay_local_where_the_slurm_client_is_installed(tmp_path, monkeypatch, capsys):
    """With SLURM's commands on PATH, submitit's AutoExecutor would pick SLURM by itself; the
    launcher names its executor, so submitit_cluster local (and --launcher local) ask SLURM
    nothing. (The slow test of submitit's LocalExecutor runs with the same stand-ins.)"""
    submitit = pytest.importorskip("submitit")
    calls = _fake_slurm(tmp_path, monkeypatch)
    assert submitit.AutoExecutor(folder=tmp_path / "auto").cluster == "slurm"  # the hazard
    lc = launcher_config({"kind": "slurm", "submitit_cluster": "local"})
    launch([_cfg(tmp_path / "r")], lc, dry_run=True, progress=False)
    launch([_cfg(tmp_path / "r")], launcher_config({"kind": "local"}), dry_run=True,
           progress=False)
    assert "#SBATCH" in capsys.readouterr().out and not calls.exists()
