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
    assert lines[0].startswith("agnostic-sam") and ": error: " in lines[0], err
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


def test_weights_with_a_head_of_another_class_count_load_and_say_so(tmp_path, capsys, caplog):
    # A warning of the library's logger: without any logging set-up Python prints it on stderr
    # (the real-process test below shows it); here pytest's log capture holds it.
    torch.save(_state_dict("cnn_mini", num_classes=5), tmp_path / "h.pt")
    train_run(tmp_path / "run", capsys, "--model", "cnn_mini", "--weights",
              str(tmp_path / "h.pt"))
    (record,) = [r for r in caplog.records if r.name == "agnostic_sam.models.weights"]
    assert record.levelname == "WARNING"
    assert "skipped (shape mismatch): head.bias, head.weight" in record.getMessage()


@pytest.mark.slow
def test_a_skipped_head_is_said_on_stderr_of_a_real_process(tmp_path):
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


def test_resume_under_omp_num_threads_is_refused(tmp_path, capsys):
    # Started without --threads (config.yaml says threads: null) with 1 thread, as
    # OMP_NUM_THREADS=1 gives; resumed by a process that OMP_NUM_THREADS=2 gives two.
    run = tmp_path / "run"
    unthreaded = TINY[:-2]  # without "--threads 1"
    rc, err = run_main(["train", *unthreaded, "--epochs", "2", "--out", str(run)], capsys)
    assert rc == 0, err
    before = tree(tmp_path)
    done = cli("train", "--out", str(run), "--resume", "--no-progress", "--epochs", "2",
               env={"OMP_NUM_THREADS": "2"})
    one_error_line(done.returncode, done.stderr, "1 CPU thread", "has 2", "OMP_NUM_THREADS")
    assert tree(tmp_path) == before
    # with the run's own count (this process: 1 thread) it continues
    rc, err = run_main(["train", "--out", str(run), "--resume", "--no-progress", "--epochs", "2"],
                       capsys)
    assert rc == 0, err
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


# --- compare --report-only: result files read strictly, every unusable run named ---------------

COMPARE = ("compare", "--optimizers", "sgd", "sam", "--seeds", "0", "1", "--model", "mlp_mini",
           "--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--threads", "1",
           "--no-progress", "--device", "cpu")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished comparison (sgd and sam, seeds 0 and 1), made once; tests copy it."""
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*COMPARE, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# (file under <out>/sam/seed1, content; "<dir>" makes a folder) -> a word of the error line
DAMAGE = {
    "result-null": ("result.json", "null", "holds null"),
    "result-folder": ("result.json", "<dir>", "is a folder"),
    "result-list": ("result.json", "[1, 2]", "a JSON list"),
    "result-no-final-acc": ("result.json", '{"status": "finished", "best_test_acc": 50.0, '
                            '"total_seconds": 1.0}', "no final_test_acc"),
    "result-nan-literal": ("result.json", '{"status": "finished", "final_test_acc": NaN, '
                           '"best_test_acc": 50.0, "total_seconds": 1.0}', "NaN"),
    "result-acc-text": ("result.json", '{"status": "finished", "final_test_acc": "90%", '
                        '"best_test_acc": 50.0, "total_seconds": 1.0}', "'90%'"),
    "result-binary": ("result.json", b"\xff\xfe\x00garbage", "UTF-8"),
    "result-truncated": ("result.json", '{"status": "finished", "final_te', "not JSON"),
    "metrics-garbage": ("metrics.jsonl", "not json at all\n", "line 1 is not JSON"),
    "metrics-row-list": ("metrics.jsonl", "[1, 2]\n", "line 1 holds a JSON list"),
    "metrics-nan": ("metrics.jsonl", '{"epoch": 1, "test_acc": NaN}\n', "NaN"),
    "metrics-no-test-acc": ("metrics.jsonl", '{"epoch": 1}\n', "test_acc None"),
    "config-garbage": ("config.yaml", "lr: [0.1\n", "config.yaml"),
    "config-other-run": ("config.yaml", None, "different config"),
}


def damage(run: Path, name: str, content: str | bytes | None) -> None:
    path = run / name
    if content == "<dir>":
        path.unlink()
        path.mkdir()
    elif content is None:  # another run's config: the seed differs
        path.write_text(path.read_text().replace("seed: 1", "seed: 7"))
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("case", DAMAGE.values(), ids=DAMAGE.keys())
def test_report_only_names_a_damaged_run(case, comparison, tmp_path, capsys):
    name, content, needle = case
    out = copy_tree(comparison, tmp_path / "cmp")
    damage(out / "sam" / "seed1", name, content)
    before = tree(tmp_path)
    rc, err = run_main([*COMPARE, "--out", str(out), "--report-only"], capsys)
    one_error_line(rc, err, "1 run(s) cannot be used", str(out / "sam" / "seed1"), needle)
    assert "nan" not in err.replace("NaN", "")
    assert tree(tmp_path) == before  # comparison.json/md and the plot are the earlier ones


def test_report_only_names_every_damaged_run(comparison, tmp_path, capsys):
    out = copy_tree(comparison, tmp_path / "cmp")
    for run in ("sgd/seed0", "sgd/seed1", "sam/seed0", "sam/seed1"):
        (out / run / "result.json").write_text("null\n")
    rc, err = run_main([*COMPARE, "--out", str(out), "--report-only"], capsys)
    one_error_line(rc, err, "4 run(s) cannot be used", "and 1 more", str(out / "sam" / "seed1"))


def test_report_only_of_intact_runs_still_reports(comparison, tmp_path, capsys):
    out = copy_tree(comparison, tmp_path / "cmp")
    rc, err = run_main([*COMPARE, "--out", str(out), "--report-only"], capsys)
    assert rc == 0, err
    now, then = (json.loads((d / "comparison.json").read_text()) for d in (out, comparison))
    assert now["paired"] == then["paired"]
    for o in ("sgd", "sam"):
        assert now["summary"][o]["per_seed"] == then["summary"][o]["per_seed"]
        assert now["summary"][o]["final_test_acc"]["n"] == 2


@pytest.mark.parametrize("command", ["compare", "reproduce"])
def test_a_full_disk_while_writing_the_report_is_one_line(command, comparison, tmp_path,
                                                          monkeypatch, capsys):
    import errno

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if command == "compare":
        out = copy_tree(comparison, tmp_path / "cmp")
        monkeypatch.setattr("agnostic_sam.compare.report.atomic_write_text", full)
        argv = [*COMPARE, "--out", str(out), "--report-only"]
    else:
        out = tmp_path / "rep"
        monkeypatch.setattr("agnostic_sam.reproduce.report.atomic_write_text", full)
        argv = ["reproduce", "table1", "--report-only", "--device", "cpu", "--out", str(out)]
    before = tree(tmp_path)
    rc, err = run_main(argv, capsys)
    one_error_line(rc, err, "No space left on device", "the runs are intact", "--report-only")
    assert tree(tmp_path) == before


def test_a_second_compare_on_the_same_out_is_refused(comparison, tmp_path, capsys):
    from agnostic_sam.train.rundir import RunDir

    out = copy_tree(comparison, tmp_path / "cmp")
    with RunDir(out).lock():  # the first comparison, still running
        before = tree(tmp_path)
        for flags in ((), ("--report-only",)):
            rc, err = run_main([*COMPARE, "--out", str(out), *flags], capsys)
            one_error_line(rc, err, str(out), "in use by another agnostic-sam process",
                           f"PID {os.getpid()}")
            assert tree(tmp_path) == before


# --- reproduce: --report-only reads strictly, --seeds refuses repeats --------------------------


def _table1_run_dir(out: Path) -> Path:
    from agnostic_sam.reproduce.tables import plan

    run = plan("table1")[0]
    run.overrides["device"] = "cpu"  # as `reproduce --device cpu` plans it
    return out / "runs" / run.run_id


@pytest.mark.parametrize("content", ["null", "[1, 2]", '{"final_test_acc": NaN}',
                                     '{"status": "finished"}', "<dir>"],
                         ids=["null", "list", "nan", "no-metric", "folder"])
def test_reproduce_report_only_names_a_damaged_run(content, tmp_path, capsys):
    out = tmp_path / "rep"
    run_dir = _table1_run_dir(out)
    run_dir.mkdir(parents=True)
    if content == "<dir>":
        (run_dir / "result.json").mkdir()
    else:
        (run_dir / "result.json").write_text(content)
    before = tree(tmp_path)
    rc, err = run_main(["reproduce", "table1", "--report-only", "--device", "cpu",
                        "--out", str(out)], capsys)
    one_error_line(rc, err, "1 run(s) cannot be used", str(run_dir / "result.json"))
    assert tree(tmp_path) == before  # no report.md / report.json half made


@pytest.mark.parametrize("flag", ["--seeds", "--tune-seeds"])
def test_reproduce_refuses_a_seed_listed_twice(flag, tmp_path, capsys):
    # --dry-run: where the seeds were accepted, the plan is printed and nothing trains
    rc, err = run_main(["reproduce", "table4-digits", flag, "0,1,0", "--dry-run", "--out",
                        str(tmp_path / "rep")], capsys)
    one_error_line(rc, err, flag, "0,1,0")
    assert list(tmp_path.iterdir()) == []


# --- adversary paths: impossible --out / --run names -----------------------------------------

LONG = "n" * 300  # longer than any file system's name limit (255 bytes)


def _paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    return {"dangling": str(tmp_path / "dangling"), "under-dangling": str(tmp_path / "dangling/x"),
            "loop": str(tmp_path / "loop1"), "long-name": str(tmp_path / LONG),
            "long-inner-name": str(tmp_path / "a" / LONG / "b")}


OUT_COMMANDS = {
    "train": ["train", *TINY, "--out"],
    "compare": [*COMPARE, "--out"],
    "reproduce": ["reproduce", "table4-digits", "--smoke", "--seeds", "0", "--out"],
    "bench": ["bench", "--model", "mlp_mini", "--steps", "1", "--rounds", "1", "--out"],
    "landscape": ["landscape", "--run", "{run}", "--steps", "2", "--batches", "1", "--out"],
    "hessian-run": ["hessian", "--run"],
    "congruence-out": ["congruence", "--run", "{run}", "--out"],
}
PATH_KINDS = ["dangling", "under-dangling", "loop", "long-name", "long-inner-name"]
NEEDLES = {"dangling": "dangling symbolic link", "under-dangling": "dangling symbolic link",
           "loop": "loop of symbolic links", "long-name": "bytes long",
           "long-inner-name": "bytes long"}


@pytest.mark.parametrize("kind", PATH_KINDS)
@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_an_impossible_path_is_one_line_and_creates_nothing(command, kind, finished, tmp_path,
                                                            capsys):
    path = _paths(tmp_path)[kind]
    if command == "congruence-out":
        path += "/c.png" if kind in ("dangling", "loop") else ".png"
    argv = [a.format(run=finished["seed0"]) for a in OUT_COMMANDS[command]] + [path]
    before = tree(tmp_path)
    rc, err = run_main(argv, capsys)
    one_error_line(rc, err, NEEDLES[kind])
    assert tree(tmp_path) == before


def test_a_symlinked_out_to_a_folder_is_followed(tmp_path, capsys):
    # A link to a real folder is a legitimate --out: the run lands in the target.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    train_run(tmp_path / "link", capsys)
    assert (tmp_path / "real" / "result.json").is_file()


# --- analysis commands on damaged run files ---------------------------------------------------

ANALYSIS_DAMAGE = {
    "checkpoint-truncated": ("checkpoint.pt", "truncate", "corrupt or unreadable"),
    "checkpoint-garbage": ("checkpoint.pt", b"\x00garbage" * 10, "corrupt or unreadable"),
    "checkpoint-empty": ("checkpoint.pt", b"", "corrupt or unreadable"),
    "config-garbage": ("config.yaml", "lr: [0.1\n", "config.yaml"),
    "config-binary": ("config.yaml", b"\xff\xfe\x00", "UTF-8"),
    "config-folder": ("config.yaml", "<dir>", "config.yaml"),
}


@pytest.mark.parametrize("command", ["hessian", "landscape"])
@pytest.mark.parametrize("case", ANALYSIS_DAMAGE.values(), ids=ANALYSIS_DAMAGE.keys())
def test_analysis_of_a_damaged_run_is_one_line(case, command, finished, tmp_path, capsys):
    name, content, needle = case
    run = copy_run(finished["seed0"], tmp_path / "a")
    if content == "truncate":
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    else:
        damage(run, name, content)
    before = tree(tmp_path)
    argv = [command, "--run", str(run), "--batches", "1", "--threads", "1", "--device", "cpu"]
    argv += ["--iters", "2", "--trace-samples", "0"] if command == "hessian" else ["--steps", "2"]
    rc, err = run_main(argv, capsys)
    one_error_line(rc, err, needle)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content", ["not json\n", "[1]\n", '{"epoch": 1, "cos_train_val": NaN}\n',
                                     '{"epoch": 1, "cos_train_val": "high"}\n', "<dir>"],
                         ids=["garbage", "list-row", "nan", "text-value", "folder"])
def test_congruence_of_damaged_metrics_is_one_line(content, finished, tmp_path, capsys):
    run = copy_run(finished["seed0"], tmp_path / "a")
    damage(run, "metrics.jsonl", content)
    before = tree(tmp_path)
    rc, err = run_main(["congruence", "--run", str(run), "--out", str(tmp_path / "c.png")], capsys)
    one_error_line(rc, err, "metrics.jsonl")
    assert tree(tmp_path) == before


# --- AGNOSTIC_SAM_PLUGINS: a broken plugin is one line, even for --help -----------------------

PLUGINS = {
    "missing": (None, "cannot be found"),
    "raises": ("raise RuntimeError('boom at import')\n", "raised RuntimeError while being "
               "imported: boom at import"),
    "syntax-error": ("def broken(:\n    pass\n", "has a syntax error"),
    "exits": ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    "missing-dependency": ("import agnostic_sam_no_such_dependency\n", "needs a module"),
    "registers-sgd-again": ("from agnostic_sam.methods import register_method\n"
                            "from agnostic_sam.optim import Plain\n"
                            "register_method('sgd', Plain, description='not the real sgd')\n",
                            "'sgd' is already registered"),
}


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["methods"]],
                         ids=["help", "train-help", "methods"])
@pytest.mark.parametrize("case", PLUGINS.values(), ids=PLUGINS.keys())
def test_a_broken_plugin_is_one_line(case, argv, tmp_path, monkeypatch, capsys):
    from agnostic_sam.methods import METHODS

    source, needle = case
    name = f"round3_plugin_{abs(hash((source, tuple(argv)))) % 10**8}"
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AGNOSTIC_SAM_PLUGINS", name)
    registry = dict(METHODS)
    rc, err = run_main(argv, capsys)
    one_error_line(rc, err, "AGNOSTIC_SAM_PLUGINS", name, needle)
    assert METHODS == registry  # a failed plugin leaves the registry as it was
    rc, err = run_main(argv, capsys)  # and is not taken as loaded the second time
    one_error_line(rc, err, name, needle)


@pytest.mark.slow
def test_a_real_process_with_a_broken_plugin_says_so_for_help(tmp_path):
    (tmp_path / "round3_exits.py").write_text("import sys\nsys.exit(0)\n")
    done = cli("--help", env={"AGNOSTIC_SAM_PLUGINS": "round3_exits",
                              "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr == ("agnostic-sam: error: AGNOSTIC_SAM_PLUGINS: 'round3_exits' called "
                           "sys.exit(0) while being imported\n")
    assert done.stdout == ""
