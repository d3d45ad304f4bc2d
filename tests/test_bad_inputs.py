"""Bad input anywhere: one line, exit status 2, nothing written.

One table of bad command lines (train, compare, reproduce, hessian, landscape, congruence, bench
flags and YAML config files), each run in-process through `agnostic_sam.cli.main` with the
working directory in a fresh tmp folder: the status is 2, stderr holds exactly one non-empty
line `agnostic-sam: error: ...` naming the problem and no traceback, and no file under the tmp
folder was created or changed. A second table calls library functions with bad arguments: a
ValueError/TypeError whose message names the value.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from agnostic_sam.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    return "\n".join(lines) + f"\nlr: *l{levels - 1}\n"


@dataclass(frozen=True)
class Case:
    """One bad command line. `{out}` is a not-yet-existing folder under tmp, `{cfg}` the file
    holding `config` (bytes or text), `{file}` an existing plain file, `{run}` a missing run."""

    argv: tuple[str, ...]
    needle: str  # must appear in the error line (placeholders allowed)
    config: bytes | str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # made under {out} beforehand


TRAIN = ("train", "--model", "mlp", "--epochs", "1", "--max-steps", "3", "--no-progress",
         "--device", "cpu", "--out", "{out}")


def train(*flags: str, needle: str, config: bytes | str | None = None) -> Case:
    return Case((*TRAIN, *flags), needle, config)


def yaml_case(config: bytes | str, needle: str) -> Case:
    return Case((*TRAIN, "--config", "{cfg}"), needle, config)


CASES = {
    # --- train flags: every numeric flag, non-finite and out of range -------------------------
    "train-lr-nan": train("--lr", "nan", needle="lr"),
    "train-lr-inf": train("--lr", "inf", needle="lr"),
    "train-lr-zero": train("--lr", "0", needle="lr"),
    "train-weight-decay-nan": train("--weight-decay", "nan", needle="weight_decay"),
    "train-weight-decay-inf": train("--weight-decay", "inf", needle="weight_decay"),
    "train-weight-decay-negative": train("--weight-decay=-1e-4", needle="weight_decay"),
    "train-label-smoothing-1.5": train("--label-smoothing", "1.5", needle="label_smoothing"),
    "train-label-smoothing-nan": train("--label-smoothing", "nan", needle="label_smoothing"),
    "train-momentum-1": train("--momentum", "1.0", needle="momentum"),
    "train-momentum-nan": train("--momentum", "nan", needle="momentum"),
    "train-rho1-nan": train("--rho1", "nan", needle="rho1"),
    "train-rho2-inf": train("--rho2", "inf", needle="rho2"),
    "train-sam-rho-negative": train("--optimizer", "sam", "--rho", "-0.05", needle="rho"),
    "train-seed-negative": train("--seed", "-1", needle="seed"),
    "train-seed-2**32": train("--seed", str(2**32), needle="seed"),
    "train-image-size-huge": train("--image-size", "100000", needle="image_size"),
    "train-batch-size-0": train("--batch-size", "0", needle="batch_size"),
    "train-epochs-0": train("--epochs", "0", needle="epochs"),
    "train-epochs-negative": train("--epochs", "-3", needle="epochs"),
    "train-max-steps-0": train("--max-steps", "0", needle="max_steps"),
    "train-accumulate-0": train("--accumulate", "0", needle="accumulate"),
    "train-workers-negative": train("--workers", "-1", needle="workers"),
    "train-threads-0": train("--threads", "0", needle="threads"),
    "train-warmup-nan": train("--warmup-epochs", "nan", needle="warmup_epochs"),
    "train-max-grad-norm-0": train("--max-grad-norm", "0", needle="max_grad_norm"),
    "train-adam-eps-0": train("--base-optimizer", "adamw", "--adam-eps", "0", needle="adam_eps"),
    "train-betas-1": train("--base-optimizer", "adamw", "--betas", "1.0", "0.999", needle="betas"),
    "train-val-fraction-1": train("--val-fraction", "1.0", needle="val_fraction"),
    "train-train-fraction-0": train("--train-fraction", "0", needle="train_fraction"),
    "train-noise-rate-nan": train("--noise-rate", "nan", needle="noise_rate"),
    "train-split-ratio-nan": train("--split-ratio", "nan", needle="split_ratio"),
    "train-epochs-not-int": train("--epochs", "1.5", needle="invalid int value"),
    "train-num-classes-on-digits": train("--num-classes", "3", needle="synthetic"),
    # --- train --out ---------------------------------------------------------------------------
    "train-out-empty": Case(TRAIN[:-1] + ("",), "--out"),
    "train-out-is-a-file": Case(TRAIN[:-1] + ("{file}",), "file"),
    "train-out-under-a-file": Case(TRAIN[:-1] + ("{file}/run",), "file"),
    "train-out-in-proc": Case(TRAIN[:-1] + ("/proc/agnostic-sam-test-run",), "/proc"),
    # --- a fresh run never overwrites files of a run --------------------------------------------
    "train-fresh-over-empty-metrics": Case(TRAIN, "{out}", files={"metrics.jsonl": b""}),
    "train-fresh-over-result": Case(TRAIN, "{out}", files={"result.json": b"{}\n"}),
    "train-fresh-over-checkpoint": Case(TRAIN, "{out}", files={"checkpoint.pt": b"junk"}),
    "train-fresh-over-other-config": Case(TRAIN, "{out}", files={"config.yaml": b"epochs: 7\n"}),
    "train-resume-saved-config-duplicate": Case((*TRAIN, "--resume"), "duplicate key 'lr'",
                                                files={"config.yaml": b"lr: 0.1\nlr: 0.2\n",
                                                       "checkpoint.pt": b"junk"}),
    # --- YAML config files ---------------------------------------------------------------------
    "yaml-binary": yaml_case(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    "yaml-latin-1": yaml_case("lr: 0.1  # d\u00e9j\u00e0 vu\n".encode("latin-1"), "not UTF-8 text"),
    "yaml-duplicate-key": yaml_case("lr: 0.1\nepochs: 1\nlr: 0.2\n", "duplicate key 'lr'"),
    "yaml-hex": yaml_case("seed: 0x10\n", "0x10"),
    "yaml-underscore": yaml_case("batch_size: 1_000\n", "1_000"),
    "yaml-octal-0o": yaml_case("seed: 0o17\n", "0o17"),
    "yaml-octal-leading-zero": yaml_case("seed: 017\n", "017"),
    "yaml-sexagesimal": yaml_case("epochs: 1:30\n", "1:30"),
    "yaml-yes": yaml_case("nesterov: yes\n", "yes"),
    "yaml-off": yaml_case("adaptive: off\n", "off"),
    "yaml-alias-bomb": yaml_case(alias_bomb(), "alias"),
    "yaml-python-tag": yaml_case("lr: !!python/object/apply:os.system ['touch pwned']\n", "tag"),
    "yaml-custom-tag": yaml_case("lr: !decimal 0.1\n", "tag"),
    "yaml-top-level-list": yaml_case("- lr\n- 0.1\n", "mapping"),
    "yaml-top-level-scalar": yaml_case("0.1\n", "mapping"),
    "yaml-invalid": yaml_case("lr: [0.1\nepochs: 2\n", "line"),
    "yaml-lr-nan": yaml_case("lr: .nan\n", "lr"),
    "yaml-weight-decay-negative-exponent": yaml_case("lr: 1e-3\nweight_decay: -5e-4\n",
                                                     "weight_decay"),
    "yaml-unknown-key": yaml_case("learning_rate: 0.1\n", "learning_rate"),
    "yaml-missing-file": Case((*TRAIN, "--config", "{tmp}/none.yaml"), "none.yaml"),
    "yaml-is-a-folder": Case((*TRAIN, "--config", "{tmp}"), "config file"),
    # --- compare -------------------------------------------------------------------------------
    "compare-jobs-0": Case(("compare", "--out", "{out}", "--jobs", "0"), "jobs"),
    "compare-seeds-negative": Case(("compare", "--out", "{out}", "--seeds", "-1"), "seed"),
    "compare-seeds-twice": Case(("compare", "--out", "{out}", "--seeds", "1", "1"), "seeds"),
    "compare-tune-negative": Case(("compare", "--out", "{out}", "--tune", "-0.1"), "tune"),
    "compare-tune-nan": Case(("compare", "--out", "{out}", "--tune", "nan"), "nan"),
    "compare-rho2-ratio-inf": Case(("compare", "--out", "{out}", "--rho2-ratio", "inf"),
                                   "rho2_ratio"),
    "compare-unknown-optimizer": Case(("compare", "--out", "{out}", "--optimizers", "sgd", "lion"),
                                      "lion"),
    "compare-lr-nan": Case(("compare", "--out", "{out}", "--lr", "nan"), "lr"),
    "compare-yaml-duplicate": Case(("compare", "--out", "{out}", "--config", "{cfg}"),
                                   "duplicate key",
                                   "seeds: [0]\nseeds: [1]\n"),
    "compare-yaml-hex-jobs": Case(("compare", "--out", "{out}", "--config", "{cfg}"), "0x2",
                                  "jobs: 0x2\n"),
    # --- reproduce -----------------------------------------------------------------------------
    "reproduce-unknown-table": Case(("reproduce", "table99", "--out", "{out}"), "table99"),
    "reproduce-jobs-0": Case(("reproduce", "table4-digits", "--out", "{out}", "--jobs", "0"),
                             "--jobs"),
    "reproduce-seeds-text": Case(("reproduce", "table4-digits", "--out", "{out}", "--seeds", "a,b"),
                                 "--seeds"),
    "reproduce-seeds-negative": Case(("reproduce", "table4-digits", "--out", "{out}", "--seeds",
                                      "-1"), "seed"),
    "reproduce-threads-0": Case(("reproduce", "table4-digits", "--out", "{out}", "--threads", "0"),
                                "--threads"),
    # --- hessian (checked before the run directory is even looked at) --------------------------
    "hessian-batch-size-0": Case(("hessian", "--run", "{run}", "--batch-size", "0"),
                                 "--batch-size"),
    "hessian-batches-0": Case(("hessian", "--run", "{run}", "--batches", "0"), "--batches"),
    "hessian-k-0": Case(("hessian", "--run", "{run}", "--k", "0"), "--k"),
    "hessian-k-huge": Case(("hessian", "--run", "{run}", "--k", "100000"), "--k"),
    "hessian-iters-0": Case(("hessian", "--run", "{run}", "--iters", "0"), "--iters"),
    "hessian-tol-nan": Case(("hessian", "--run", "{run}", "--tol", "nan"), "--tol"),
    "hessian-tol-inf": Case(("hessian", "--run", "{run}", "--tol", "inf"), "--tol"),
    "hessian-tol-negative": Case(("hessian", "--run", "{run}", "--tol=-1e-4"), "--tol"),
    "hessian-trace-samples-negative": Case(("hessian", "--run", "{run}", "--trace-samples", "-1"),
                                           "--trace-samples"),
    "hessian-seed-negative": Case(("hessian", "--run", "{run}", "--seed", "-1"), "--seed"),
    "hessian-seed-2**32": Case(("hessian", "--run", "{run}", "--seed", str(2**32)), "--seed"),
    "hessian-threads-0": Case(("hessian", "--run", "{run}", "--threads", "0"), "--threads"),
    "hessian-device-unknown": Case(("hessian", "--run", "{run}", "--device", "gpu0"), "gpu0"),
    "hessian-run-missing": Case(("hessian", "--run", "{run}"), "does not exist"),
    # --- landscape -----------------------------------------------------------------------------
    "landscape-steps-1": Case(("landscape", "--run", "{run}", "--out", "{out}", "--steps", "1"),
                              "--steps"),
    "landscape-steps-huge": Case(("landscape", "--run", "{run}", "--out", "{out}", "--steps",
                                  "100000"), "--steps"),
    "landscape-span-nan": Case(("landscape", "--run", "{run}", "--out", "{out}", "--span", "nan"),
                               "--span"),
    "landscape-span-inf": Case(("landscape", "--run", "{run}", "--out", "{out}", "--span", "inf"),
                               "--span"),
    "landscape-span-0": Case(("landscape", "--run", "{run}", "--out", "{out}", "--span", "0"),
                             "--span"),
    "landscape-vmax-nan": Case(("landscape", "--run", "{run}", "--out", "{out}", "--vmax", "nan"),
                               "--vmax"),
    "landscape-batches-negative": Case(("landscape", "--run", "{run}", "--out", "{out}",
                                        "--batches", "-2"), "--batches"),
    "landscape-seed-2**40": Case(("landscape", "--run", "{run}", "--out", "{out}", "--seed",
                                  str(2**40)), "--seed"),
    # --- congruence ----------------------------------------------------------------------------
    "congruence-out-not-png": Case(("congruence", "--run", "{run}", "--out", "{tmp}/c.txt"),
                                   ".png"),
    "congruence-out-in-proc": Case(("congruence", "--run", "{run}", "--out",
                                    "/proc/agnostic-sam/c.png"), "/proc"),
    # --- bench (checked before the model is built) ---------------------------------------------
    "bench-batch-size-0": Case(("bench", "--out", "{out}", "--batch-size", "0"), "--batch-size"),
    "bench-batch-size-1": Case(("bench", "--out", "{out}", "--batch-size", "1"), "--batch-size"),
    "bench-image-size-huge": Case(("bench", "--out", "{out}", "--image-size", "100000"),
                                  "--image-size"),
    "bench-batch-too-large": Case(("bench", "--out", "{out}", "--batch-size", "65536",
                                   "--image-size", "1024"),
                                  "input values"),
    "bench-channels-0": Case(("bench", "--out", "{out}", "--channels", "0"), "--channels"),
    "bench-rounds-0": Case(("bench", "--out", "{out}", "--rounds", "0"), "--rounds"),
    "bench-steps-negative": Case(("bench", "--out", "{out}", "--steps", "-1"), "--steps"),
    "bench-warmup-negative": Case(("bench", "--out", "{out}", "--warmup", "-1"), "--warmup"),
    "bench-split-ratio-nan": Case(("bench", "--out", "{out}", "--split-ratio", "nan"),
                                  "--split-ratio"),
    "bench-split-ratio-1": Case(("bench", "--out", "{out}", "--split-ratio", "1"), "--split-ratio"),
    "bench-seed-negative": Case(("bench", "--out", "{out}", "--seed", "-1"), "--seed"),
    "bench-time-budget-nan": Case(("bench", "--out", "{out}", "--time-budget", "nan"),
                                  "--time-budget"),
    "bench-threads-negative": Case(("bench", "--out", "{out}", "--threads", "-2"), "--threads"),
    "bench-unknown-method": Case(("bench", "--out", "{out}", "--methods", "sgd,lion"), "lion"),
    "bench-out-is-a-file": Case(("bench", "--model", "mlp", "--out", "{file}"), "file"),
    "bench-out-empty": Case(("bench", "--model", "mlp", "--out", ""), "--out"),
}


def tree(path: Path) -> dict[str, bytes]:
    """Every file and folder under `path`, files with their bytes."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(path.rglob("*"))}


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative default paths land here, where they are seen
    (tmp_path / "a_file").write_text("not a folder\n")
    cfg = tmp_path / "config.yaml"
    if case.config is not None:
        cfg.write_bytes(case.config if isinstance(case.config, bytes) else case.config.encode())
    names = {"out": str(tmp_path / "out"), "cfg": str(cfg), "file": str(tmp_path / "a_file"),
             "run": str(tmp_path / "no_run"), "tmp": str(tmp_path)}
    argv = [a.format(**names) for a in case.argv]
    for name, content in case.files.items():
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / name).write_bytes(content)
    before = tree(tmp_path)

    rc, err = run_main(argv, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("agnostic-sam") and ": error: " in lines[0]
    assert "Traceback" not in err
    assert case.needle.format(**names) in lines[0]
    assert tree(tmp_path) == before  # nothing created, nothing changed
    assert len(lines[0]) < 400  # a line, not a dump of an expanded value


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_out_is_one_line(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        for argv in ([*TRAIN[:-1], str(folder / "run")], ["bench", "--out", str(folder / "b")],
                     ["landscape", "--run", str(tmp_path), "--out", str(folder / "l")]):
            rc, err = run_main(argv, capsys)
            assert rc == 2 and err.count("\n") == 1 and str(folder) in err, err
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_the_table_is_large_and_covers_every_command():
    commands = {case.argv[0] for case in CASES.values()}
    assert len(CASES) >= 40
    assert commands == {"train", "compare", "reproduce", "hessian", "landscape", "congruence",
                        "bench"}


@pytest.mark.slow
def test_a_real_process_reports_a_binary_config_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe\x00\x01binary")
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "agnostic_sam", "train", "--config", str(cfg),
                           "--out", str(tmp_path / "r")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"agnostic-sam: error: config file {cfg} is not UTF-8 text (byte 0)\n"
    assert not (tmp_path / "r").exists()


# --- library arguments: ValueError / TypeError naming the value ---------------------------------

def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(8, 2), torch.zeros(8, dtype=torch.long)


def _linear_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]


def _library_cases() -> dict:
    from agnostic_sam import (
        SAM,
        AgnosticSAM,
        LossScaler,
        Plain,
        accumulate,
        split_batch,
        split_sizes,
    )
    from agnostic_sam.analysis import hessian_trace, loss_surface, top_eigenvalues

    ce = torch.nn.CrossEntropyLoss()
    net = torch.nn.Linear(2, 2)
    nan, inf = math.nan, math.inf
    return {
        "AgnosticSAM-rho1-negative": (lambda: AgnosticSAM(_params(), rho1=-1, lr=0.1), ValueError,
                                      "-1"),
        "AgnosticSAM-rho2-nan": (lambda: AgnosticSAM(_params(), rho2=nan, lr=0.1), ValueError,
                                 "nan"),
        "AgnosticSAM-variant": (lambda: AgnosticSAM(_params(), variant="half", lr=0.1), ValueError,
                                "half"),
        "AgnosticSAM-perturb-eps-0": (lambda: AgnosticSAM(_params(), perturb_eps=0, lr=0.1),
                                      ValueError, "0"),
        "AgnosticSAM-max-grad-norm": (lambda: AgnosticSAM(_params(), max_grad_norm=-2.5, lr=0.1),
                                      ValueError, "-2.5"),
        "AgnosticSAM-lr-negative": (lambda: AgnosticSAM(_params(), lr=-0.5), ValueError, "-0.5"),
        "AgnosticSAM-base-not-a-class": (lambda: AgnosticSAM(_params(), base_optimizer=3, lr=0.1),
                                         TypeError, "int"),
        "SAM-rho-inf": (lambda: SAM(_params(), rho=inf, lr=0.1), ValueError, "inf"),
        "SAM-rho-text": (lambda: SAM(_params(), rho="0.1", lr=0.1), ValueError, "0.1"),
        "Plain-perturbation": (lambda: Plain(_params(), perturbation="global", lr=0.1), ValueError,
                               "global"),
        "split_batch-ratio-1.5": (lambda: split_batch(*_batch(), 1.5), ValueError, "1.5"),
        "split_batch-ratio-nan": (lambda: split_batch(*_batch(), nan), ValueError, "nan"),
        "split_sizes-batch-1": (lambda: split_sizes(1, 0.5), ValueError, "1"),
        "LossScaler-init-scale-0": (lambda: LossScaler(init_scale=0), ValueError, "0"),
        "LossScaler-init-scale-nan": (lambda: LossScaler(init_scale=nan), ValueError, "nan"),
        "LossScaler-growth-factor-1": (lambda: LossScaler(growth_factor=1.0), ValueError, "1.0"),
        "LossScaler-backoff-2": (lambda: LossScaler(backoff_factor=2.0), ValueError, "2.0"),
        "LossScaler-interval-0": (lambda: LossScaler(growth_interval=0), ValueError, "0"),
        "accumulate-micro-batches-0": (lambda: accumulate(lambda x, y: x.sum(), _batch(), 0,
                                                          lambda loss: None),
                                       ValueError, "0"),
        "top_eigenvalues-tol-nan": (lambda: top_eigenvalues(net, ce, _linear_batches(), tol=nan),
                                    ValueError, "nan"),
        "top_eigenvalues-k-bool": (lambda: top_eigenvalues(net, ce, _linear_batches(), k=True),
                                   TypeError, "True"),
        "top_eigenvalues-seed-negative": (lambda: top_eigenvalues(net, ce, _linear_batches(),
                                                                  seed=-3),
                                          ValueError, "-3"),
        "hessian_trace-samples-0": (lambda: hessian_trace(net, ce, _linear_batches(), samples=0),
                                    ValueError, "0"),
        "loss_surface-span-inf": (lambda: loss_surface(net, ce, _linear_batches(), span=inf),
                                  ValueError, "inf"),
        "loss_surface-steps-huge": (lambda: loss_surface(net, ce, _linear_batches(), steps=10**6),
                                    ValueError, str(10**6)),
    }


LIBRARY = _library_cases()


@pytest.mark.parametrize(("call", "error", "value"), LIBRARY.values(), ids=LIBRARY.keys())
def test_library_arguments_raise_naming_the_value(call, error, value):
    with pytest.raises(error) as info:
        call()
    assert value in str(info.value)


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"lr": math.nan}, "lr"), ({"weight_decay": math.inf}, "weight_decay"),
    ({"seed": 2**32}, "seed"), ({"image_size": 10**5}, "image_size"), ({"rho1": "0x10"}, "rho1"),
], ids=["lr-nan", "weight-decay-inf", "seed-2**32", "image-size-huge", "rho1-hex-text"])
def test_load_config_refuses_with_a_usage_error(overrides, needle):
    from agnostic_sam.errors import UsageError
    from agnostic_sam.train.config import load_config

    with pytest.raises(UsageError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)
