"""The step-time benchmark: closed-form counts and ratios, error inputs, then tiny CPU runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agnostic_sam.bench import BenchConfig, format_markdown, run_bench, write_report
from agnostic_sam.bench.timing import add_ratios as _add_ratios
from agnostic_sam.bench.timing import state_bytes as _state_bytes
from agnostic_sam.bench.timing import time_steps as _time_steps
from agnostic_sam.cli import main
from agnostic_sam.errors import UsageError
from agnostic_sam.methods import METHODS, list_methods

ROOT = Path(__file__).resolve().parents[1]
ALL = tuple(list_methods())  # every registered method, the family included
TINY = dict(model="cnn_mini", batch_size=10, channels=1, image_size=8, num_classes=3,
            rounds=1, steps=1, warmup=1)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- closed form -----------------------------------------------------------------------------

def test_samples_per_step_closed_form():
    # B = 64 splits into 45 + 19: SAM and full Agnostic-SAM push 2B images, simpler B + n_t.
    n_t, n_v = BenchConfig(batch_size=64).split_sizes()
    assert (n_t, n_v) == (45, 19)
    built_in = ("sgd", "sam", "agnostic-sam", "agnostic-sam-simpler")
    assert {m: METHODS[m].samples(64, n_t) for m in built_in} == {
        "sgd": 64, "sam": 128, "agnostic-sam": 128, "agnostic-sam-simpler": 109}


def test_ratios_closed_form():
    def entry(rounds, samples):
        return {"ms_per_step": {"median": sorted(rounds)[len(rounds) // 2], "min": min(rounds)},
                "round_median_ms": rounds, "samples_per_step": samples}

    methods = {"sam": entry([10.0, 20.0, 30.0], 128),
               "agnostic-sam": entry([11.0, 18.0, 36.0], 128)}
    _add_ratios(methods)
    assert methods["sam"]["ratio_to_sam"] == 1.0
    assert methods["sam"]["ratio_to_sam_paired"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert methods["agnostic-sam"]["ratio_to_sam"] == pytest.approx(18 / 20)
    # Per-round ratios 1.1, 0.9, 1.2: median 1.1, range 0.9-1.2.
    assert methods["agnostic-sam"]["ratio_to_sam_paired"] == pytest.approx(
        {"median": 1.1, "min": 0.9, "max": 1.2})
    assert methods["agnostic-sam"]["ratio_to_sam_min"] == pytest.approx(11 / 10)
    assert methods["agnostic-sam"]["sample_ratio_to_sam"] == 1.0


def test_ratios_without_sam_are_none():
    methods = {"sgd": {"ms_per_step": {"median": 1.0, "min": 1.0}, "round_median_ms": [1.0],
                       "samples_per_step": 4}}
    _add_ratios(methods)
    assert methods["sgd"]["ratio_to_sam"] is None and methods["sgd"]["ratio_to_sam_paired"] is None


def test_state_bytes_counts_momentum_once():
    lin = torch.nn.Linear(5, 3)  # 18 float32 parameters -> 72 bytes of momentum
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(2, 5)).sum().backward()
    opt.step()
    assert _state_bytes(opt) == 72


def test_time_steps_one_sample_per_step():
    calls = []
    times = _time_steps(lambda x, y: calls.append(1), torch.zeros(1), torch.zeros(1), 4,
                        torch.device("cpu"))
    assert len(times) == 4 == len(calls) and all(t >= 0 for t in times)


# --- error inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"batch_size": 1}, {"amp": "fp8"}, {"methods": ("sgd", "adamw")}, {"rounds": 0},
    {"split_ratio": 1.0}, {"threads": 0}, {"device": "tpu"}, {"device": "not a device"},
])
def test_bad_config_raises_usage_error(change):
    with pytest.raises(UsageError):
        run_bench(BenchConfig(**{**TINY, **change}))


def test_cli_bad_flag_exits_2(tmp_path, capsys):
    assert main(["bench", "--model", "cnn_mini", "--batch-size", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agnostic-sam: error:")


# --- smoke runs on a tiny model --------------------------------------------------------------

def test_run_bench_writes_json_and_markdown(tmp_path):
    torch.manual_seed(0)
    result = run_bench(BenchConfig(**TINY), command="pytest")
    json_path, md_path = write_report(result, tmp_path)
    data = json.loads(json_path.read_text())
    assert list(data["methods"]) == list(ALL)
    assert data["split"] == {"batch": 10, "train": 7, "val": 3}
    assert data["hardware"]["torch_threads"] == 1 and data["hardware"]["cpu"]
    assert data["command"] == "pytest" and data["config"]["model"] == "cnn_mini"
    for name, m in data["methods"].items():
        assert m["ms_per_step"]["median"] > 0 and m["ms_per_step"]["n"] == 1
        assert m["images_per_second"] == pytest.approx(10 / (m["ms_per_step"]["median"] / 1e3))
        for key in ("ratio_to_sam", "ratio_to_sam_paired", "ratio_to_sam_min",
                    "sample_ratio_to_sam", "state_bytes"):
            assert m[key] is not None, (name, key)
    assert data["methods"]["sam"]["ratio_to_sam"] == 1.0
    assert data["methods"]["agnostic-sam-simpler"]["sample_ratio_to_sam"] == pytest.approx(17 / 20)
    # SGD keeps one momentum buffer per parameter; the sharpness optimizers report buffers too.
    param_bytes = data["model"]["param_bytes"]
    assert data["methods"]["sgd"]["state_bytes"] == param_bytes
    assert data["methods"]["sgd"]["buffer_bytes"] == 0  # one pass: no transient buffer
    assert data["methods"]["agnostic-sam"]["buffer_bytes"] >= param_bytes
    md = md_path.read_text()
    assert md == format_markdown(data)
    for name in ALL:
        assert f"| {name} |" in md


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_every_method(amp):
    result = run_bench(BenchConfig(**{**TINY, "amp": amp, "warmup": 0, "channels_last": True}))
    assert result["config"]["amp"] == amp
    assert all(m["ms_per_step"]["median"] > 0 for m in result["methods"].values())


def test_time_budget_stops_after_first_round():
    result = run_bench(BenchConfig(**{**TINY, "rounds": 3, "time_budget_s": 0.0,
                                      "methods": ("sgd", "sam")}))
    assert result["rounds_completed"] == 1
    assert len(result["methods"]["sam"]["round_median_ms"]) == 1


def test_cli_bench_subset(tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["bench", "--model", "cnn_mini", "--batch-size", "6", "--channels", "1",
                 "--image-size", "8", "--num-classes", "3", "--rounds", "1", "--steps", "1",
                 "--warmup", "0", "--methods", "sam,agnostic-sam-simpler", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert list(data["methods"]) == ["sam", "agnostic-sam-simpler"]
    assert (out / "bench.md").exists() and "ratio to SAM" in capsys.readouterr().out


def test_step_time_script_tiny(tmp_path):
    script = _load_script("step_time")
    code = script.main(["--model", "cnn_mini", "--batch-size", "8", "--rounds", "1", "--steps", "1",
                        "--warmup", "0", "--breakdown", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "step_time.json").read_text())
    assert code == (0 if all(data["methods"][m]["target_met"] for m in script.TARGETS) else 1)
    assert set(data["pass_ms"]) == {"8", "6", "2"}
    assert all(data["methods"][m]["optimizer_only_ms"] > 0 for m in ALL)
    assert "## Targets" in (tmp_path / "step_time.md").read_text()


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path):
    """The device script end to end, on CPU with a tiny WRN (child processes: slow)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_wrn.py"), "--model", "wrn28_10_mini",
         "--device", "cpu", "--steps", "2", "--rounds", "1", "--warmup", "1", "--batch-size", "8",
         "--no-compile", "--budget-s", "120", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_wrn.json").read_text())
    eager = summary["configs"]["eager"]
    assert eager["status"] == "ok"
    assert eager["methods"]["sam"]["ratio_to_sam"] == 1.0
    steps = 50_000 / 8
    sam = eager["methods"]["sam"]
    assert sam["seconds_per_epoch"] == pytest.approx(sam["ms_per_step"] / 1e3 * steps)
    assert "compile" not in summary["configs"]
