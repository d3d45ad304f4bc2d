"""`agnostic-sam compare`: radius selection, honest tuning, --jobs parity, end-to-end files."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import agnostic_sam.train.loop as loop_mod
from agnostic_sam.cli import main
from agnostic_sam.compare import CompareConfig, compare, load_compare_config, select_radius
from agnostic_sam.data import registry
from agnostic_sam.errors import UsageError
from agnostic_sam.stats import Summary

# Tiny runs: digits, a few optimizer steps each, no progress bars.
TINY = {
    "dataset": "digits",
    "model": "mlp_mini",
    "epochs": 2,
    "batch_size": 32,
    "max_steps": 6,
    "progress": False,
    "device": "cpu",
}


def _cfg(tmp_path: Path, **compare_kw) -> CompareConfig:
    return load_compare_config(None, compare_kw, {**TINY, "out": str(tmp_path / "cmp")})


def test_select_radius_argmax_ties_to_smaller():
    s = lambda m: Summary(m, 0.0, 3)  # noqa: E731
    assert select_radius({0.05: s(90.0), 0.1: s(92.0), 0.2: s(91.0)}) == 0.1
    # 0.2 and 0.1 tie on the mean (up to summation order): the smaller radius wins.
    assert select_radius({0.2: s(91.0), 0.1: s(91.0 + 1e-13), 0.05: s(90.0)}) == 0.1
    assert select_radius({0.3: s(50.0)}) == 0.3
    with pytest.raises(ValueError):
        select_radius({})


def test_load_compare_config_layers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "optimizers": ["sgd", "sam"],
                "seeds": [3, 4],
                "jobs": 2,
                "tune": [0.2, 0.05],
                "lr": 0.2,
                "epochs": 3,
            }
        )
    )
    cc = load_compare_config(path, {"jobs": 1, "seeds": None}, {"epochs": 5, "lr": None})
    assert (cc.optimizers, cc.seeds, cc.jobs, cc.tune) == (["sgd", "sam"], [3, 4], 1, [0.05, 0.2])
    assert (cc.train.lr, cc.train.epochs) == (0.2, 5)  # YAML < overrides, None = not given
    assert cc.train.out == str(Path("runs") / "compare-digits-mlp")


@pytest.mark.parametrize(
    "text, match",
    [
        ("colour: red\n", "unknown config key 'colour'"),
        ("seed: 3\n", "'seeds:'"),
        ("optimizers: [sgd, adam]\n", "adam"),
        ("seeds: [1, 1]\n", "twice"),
        ("jobs: 0\n", "jobs"),
        ("tune: [0.1, -0.2]\n", "-0.2"),
        ("lr: fast\n", "lr"),
    ],
)
def test_bad_compare_config_raises_usage_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_compare_config(path)


def test_tuning_never_touches_test_set_and_picks_grid_argmax(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    state = {"val_fraction": None, "test_loads": 0}
    real_train = loop_mod.train

    def spy_train(cfg):
        state["val_fraction"] = cfg.val_fraction
        try:
            return real_train(cfg)
        finally:
            state["val_fraction"] = None

    spec = registry.DATASETS["digits"]

    def guarded_builder(req):
        source = spec.builder(req)
        real_load = source.load_test

        def load_test():
            if state["val_fraction"]:
                raise AssertionError("a tuning run opened the real test split")
            state["test_loads"] += 1
            return real_load()

        return dataclasses.replace(source, load_test=load_test)

    monkeypatch.setattr(loop_mod, "train", spy_train)  # the inline launcher calls it
    monkeypatch.setitem(
        registry.DATASETS, "digits", dataclasses.replace(spec, builder=guarded_builder)
    )
    cc = _cfg(tmp_path, optimizers=["sgd", "sam"], seeds=[0, 1], tune=[0.5, 0.01], jobs=1)
    report = compare(cc, print_report=False)

    tuning = report["tuning"]
    assert tuning["val_fraction"] == 0.1 and tuning["candidates"] == [0.01, 0.5]
    # The expected choice, from the tuning runs' own result files (not the code under test): the
    # best mean held-out accuracy over the seeds, ties to the smaller radius.
    means = {}
    for radius in (0.01, 0.5):
        accs = [json.loads((Path(cc.train.out) / "tune" / "sam" / f"rho{radius:g}" / f"seed{s}" /
                            "result.json").read_text())["final_test_acc"] for s in (0, 1)]
        means[radius] = sum(accs) / 2
    best = max(means.values())
    assert tuning["chosen"] == {"sam": min(r for r, m in means.items() if m >= best - 1e-9)}
    assert {float(r): Summary(**s).mean for r, s in tuning["grid"]["sam"].items()} == \
        pytest.approx(means, abs=1e-9)
    assert set(tuning["grid"]) == {"sam"}  # SGD has no radius to tune
    # Tuning runs: 2 radii x 2 seeds, each on the held-out split; the final runs test once each.
    root = Path(cc.train.out)
    assert len(list((root / "tune" / "sam").glob("rho*/seed*/result.json"))) == 4
    assert (
        state["test_loads"] == 4
    )  # the guard was live: final runs (2 optimizers x 2 seeds) loaded test
    final_sam = yaml.safe_load((root / "sam" / "seed0" / "config.yaml").read_text())
    assert final_sam["rho"] == tuning["chosen"]["sam"] and final_sam["val_fraction"] == 0.0
    assert report["metric"] == "final_test_acc"


def test_end_to_end_cli_writes_files_and_reuses_runs(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "e2e"
    argv = [
        "compare",
        "--optimizers",
        "sgd",
        "sam",
        "agnostic-sam",
        "--seeds",
        "0",
        "1",
        "--dataset",
        "digits",
        "--model",
        "mlp_mini",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--max-steps",
        "6",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("comparison.json", "comparison.md", "accuracy_curves.png"):
        assert (out / name).is_file(), name
    for opt in ("sgd", "sam", "agnostic-sam"):
        for seed in (0, 1):
            assert (out / opt / f"seed{seed}" / "result.json").is_file()
    report = json.loads((out / "comparison.json").read_text())
    assert report["summary"]["sam"]["final_test_acc"]["n"] == 2
    pairs = {(p["a"], p["b"]) for p in report["paired"]}
    assert pairs == {("sam", "sgd"), ("agnostic-sam", "sgd"), ("agnostic-sam", "sam")}
    assert "agnostic-sam - sam:" in printed and "| agnostic-sam |" in printed
    assert (out / "accuracy_curves.png").read_bytes()[:4] == b"\x89PNG"

    # A second call reuses the finished runs (no retraining: result files untouched).
    stamp = (out / "sam" / "seed1" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "sam" / "seed1" / "result.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "comparison.json").read_text())["summary"] == report["summary"]

    # The same folder with a different config is refused, in one line, exit status 2.
    assert main([*argv, "--lr", "0.3"]) == 2
    assert "different config" in capsys.readouterr().err


def _final_accs(report: dict) -> dict:
    return {o: e["per_seed"] for o, e in report["summary"].items()}


@pytest.mark.slow
def test_jobs_two_equals_jobs_one(tmp_path):
    kw = dict(optimizers=["sgd", "agnostic-sam"], seeds=[0, 1])
    one = compare(
        load_compare_config(
            None, {**kw, "jobs": 1}, {**TINY, "model": "cnn_mini", "out": str(tmp_path / "j1")}
        ),
        print_report=False,
    )
    two = compare(
        load_compare_config(
            None, {**kw, "jobs": 2}, {**TINY, "model": "cnn_mini", "out": str(tmp_path / "j2")}
        ),
        print_report=False,
    )
    assert _final_accs(one) == _final_accs(two)
    for opt in kw["optimizers"]:
        for seed in kw["seeds"]:
            a = torch.load(
                tmp_path / "j1" / opt / f"seed{seed}" / "checkpoint.pt", weights_only=False
            )
            b = torch.load(
                tmp_path / "j2" / opt / f"seed{seed}" / "checkpoint.pt", weights_only=False
            )
            for k, v in a["model"].items():
                assert torch.equal(v, b["model"][k]), (opt, seed, k)


def test_hessian_column_is_mean_over_seeds(tmp_path, monkeypatch):
    import agnostic_sam.analysis as analysis

    # The eigenvalue computation has its own tests; here a stand-in returns 10 * seed + 1.
    def fake_top(run_dir, device="auto"):
        return 10.0 * int(Path(run_dir).name.removeprefix("seed")) + 1.0

    monkeypatch.setattr(analysis, "top_eigenvalue_of_run", fake_top)
    cc = _cfg(tmp_path, optimizers=["sam"], seeds=[0, 2], hessian=True)
    report = compare(cc, print_report=False)
    assert report["summary"]["sam"]["top_eigenvalue"] == {
        "mean": 11.0,
        "std": pytest.approx(14.1421356),
        "n": 2,
    }
    assert "| 11.000 ± 14.142 |" in (Path(cc.train.out) / "comparison.md").read_text()


def test_report_only_with_a_missing_tuning_run_never_chooses_that_radius(tmp_path):
    torch.set_num_threads(1)
    cc = _cfg(tmp_path, optimizers=["sam"], seeds=[0, 1], tune=[0.05, 0.1])
    full = compare(cc, print_report=False)
    grid = full["tuning"]["grid"]["sam"]
    assert all(cell["n"] == 2 for cell in grid.values())
    # One seed of the winning radius loses its result: --report-only must not read it, nor choose
    # a radius whose mean would cover one seed only. The other radius is chosen, and the final
    # runs (trained with the first choice) are then refused, never reported under the new one.
    winner = full["tuning"]["chosen"]["sam"]
    (tmp_path / "cmp" / "tune" / "sam" / f"rho{winner:g}" / "seed1" / "result.json").unlink()
    other = 0.1 if winner == 0.05 else 0.05
    with pytest.raises(UsageError, match=f"different config .*this run {other}"):
        compare(cc, print_report=False, report_only=True)
