"""`agnostic-sam reproduce`: the paper's tables as runs, its numbers as data, the report.

Order: closed forms (steps per epoch, report arithmetic), consistency of the configs with the
paper's numbers, error inputs, then real (tiny) training: transfer learning and smoke runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from agnostic_sam.cli import main
from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce import (
    TABLES,
    build_report,
    paper_numbers,
    plan,
    render_markdown,
    reproduce,
    run_state,
    steps_per_epoch,
    unique_runs,
)
from agnostic_sam.reproduce import spec as spec_module
from agnostic_sam.reproduce import tables as plan_module
from agnostic_sam.reproduce.spec import parse_spec

# Cells per table: rows x columns of the paper (Table 2 counts SAM once; Figure 1: 2 data sets x
# 3 architectures x {SAM, non-overlap, on-the-fly}).
CELLS = {"table1": 18, "table2": 36, "table3": 9, "table4": 24, "table5": 18, "table6": 24,
         "figure1": 18}




# ---- closed forms -------------------------------------------------------------------------

def test_steps_per_epoch_closed_form():
    # full batches only, as the trainer: floor(N / |B|)
    assert steps_per_epoch({"dataset": "cifar10", "batch_size": 128, "optimizer": "sam"}) == 390
    assert steps_per_epoch({"dataset": "fgvc_aircraft", "batch_size": 128,
                            "optimizer": "sgd"}) == 52
    assert steps_per_epoch({"dataset": "flowers102", "batch_size": 128,
                            "optimizer": "agnostic-sam"}) == 15
    # non-overlap: one pass over S^t = round(0.7 * 50000) = 35000 in |B^t| = round(0.7 * 128) = 90
    fixed = {"dataset": "cifar100", "batch_size": 128, "optimizer": "agnostic-sam",
             "split": "fixed", "split_ratio": 0.7}
    assert steps_per_epoch(fixed) == 35000 // 90
    # split: fixed means nothing to SAM
    assert steps_per_epoch({**fixed, "optimizer": "sam"}) == 390


def _write_run(root: Path, run, value: float, epoch_seconds=(10.0, 6.0, 8.0)) -> None:
    """A finished run directory in the trainer's format (config.yaml, metrics.jsonl,
    result.json)."""
    d = root / run.run_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(run.overrides))
    rows = [{"epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0,
             "test_acc": value, "epoch_seconds": s} for i, s in enumerate(epoch_seconds)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "result.json").write_text(json.dumps({"final_test_acc": value, "best_test_acc": value}))


def _cell(report, table, key):
    (cell,) = [c for c in report["tables"][table]["cells"] if c["cell"] == key]
    return cell


def test_report_puts_paper_and_ours_side_by_side(tmp_path):
    runs = plan("table1") + plan("table2") + plan("table6")
    by = {}
    for r in runs:
        by.setdefault((r.table, r.cell), []).append(r)
    # Table 1, three seeds: 96, 97, 98 -> mean 97, sample std 1
    for run, acc in zip(sorted(by["table1", "cifar10/wrn28_10/sam"],
                               key=lambda r: r.overrides["seed"]),
                        (96.0, 97.0, 98.0)):
        _write_run(tmp_path, run, acc)
    # Table 2 SAM: best of three radii (the paper's protocol)
    for run in by["table2", "flowers102/resnet18/sam"]:
        _write_run(tmp_path, run,
                   {"sam-rho0.02": 70.0, "sam-rho0.05": 74.0, "sam-rho0.1": 72.0}[run.method])
    # Table 6: seconds per epoch, first epoch (warm-up) dropped: (60 + 66) / 2 = 63 s = 1.05 min
    (t6,) = by["table6", "cifar100/wrn28_10/agnostic-sam"]
    _write_run(tmp_path, t6, 1.0, epoch_seconds=(600.0, 60.0, 66.0))

    report = build_report(runs, tmp_path)
    c = _cell(report, "table1", "cifar10/wrn28_10/sam")
    assert c["paper"] == {"mean": 96.72, "std": 0.007}
    assert c["ours"]["mean"] == pytest.approx(97.0) and c["ours"]["std"] == pytest.approx(1.0)
    assert (c["ours"]["n"], c["ours"]["expected"]) == (3, 3)
    assert c["diff"] == pytest.approx(97.0 - 96.72)
    assert c["seconds_per_epoch"] == pytest.approx(7.0)
    c = _cell(report, "table2", "flowers102/resnet18/sam")
    assert c["method"] == "sam-rho0.05" and c["ours"]["mean"] == pytest.approx(74.0)
    assert c["diff"] == pytest.approx(74.0 - 72.45)
    c = _cell(report, "table6", "cifar100/wrn28_10/agnostic-sam")
    assert c["ours"]["mean"] == pytest.approx(63.0 / 60) and c["paper"]["mean"] == 4.78
    assert c["ours"]["std"] == pytest.approx(torch.tensor([1.0, 1.1]).std().item())
    # unfinished cells: ours n/a, paper kept
    c = _cell(report, "table1", "cifar100/densenet121/agnostic-sam")
    assert c["ours"]["mean"] is None and c["ours"]["n"] == 0 and c["paper"]["mean"] == 69.65
    md = render_markdown(report)
    assert "| cifar10/wrn28_10/sam | 96.72 ± 0.01 | 97.00 ± 1.00 | 3/3 | +0.28 | 7.0 |" in md
    assert "| flowers102/resnet18/sam (best: sam-rho0.05) | 72.45 | 74.00 | 1/1 | +1.55 |" in md
    assert "| cifar10/densenet121/sgd | n/a | n/a | 0/3 | n/a | n/a |" in md


# ---- the configs against the paper's numbers ---------------------------------------------

def test_every_paper_number_has_a_planned_cell():
    paper = paper_numbers()["tables"]
    assert set(paper) == set(TABLES)
    missing_in_paper = set()
    for table in TABLES:
        planned = {r.cell for r in plan(table)}
        assert len(planned) == CELLS[table], table
        assert set(paper[table]["cells"]) <= planned, table
        missing_in_paper |= {f"{table}:{c}" for c in planned - set(paper[table]["cells"])}
    # The paper has no SGD number for DenseNet-121 and plots Figure 1 without numbers.
    expected = {"table1:cifar10/densenet121/sgd", "table1:cifar100/densenet121/sgd"}
    expected |= {f"figure1:{r.cell}" for r in plan("figure1")}
    assert missing_in_paper == expected


def test_paper_numbers_are_consistent_between_tables():
    t = paper_numbers()["tables"]
    # Table 5 repeats Table 1's SAM and Agnostic-SAM rows
    for key, value in t["table5"]["cells"].items():
        if not key.endswith("simpler"):
            assert t["table1"]["cells"][key] == value, key
    assert t["table6"]["unit"] == "minutes"
    # Table 1 and 4 give a std for every cell, Tables 2 and 3 none
    assert all("std" in v for v in t["table1"]["cells"].values())
    assert all("std" in v for v in t["table4"]["cells"].values())
    assert not any("std" in v for v in t["table2"]["cells"].values())


def test_shared_runs_are_trained_once():
    ids = {t: {r.run_id for r in plan(t)} for t in TABLES}
    # Table 5 and Figure 1 reuse Table 1/2's SAM and Agnostic-SAM runs (same settings)
    t5_shared = {r.run_id for r in plan("table5") if r.cell_method != "agnostic-sam-simpler"}
    assert t5_shared <= ids["table1"]
    f1_shared = {r.run_id for r in plan("figure1") if r.cell_method != "agnostic-sam-nonoverlap"}
    assert f1_shared <= ids["table1"] | ids["table2"]
    assert len(unique_runs(plan("all"))) == 249


def test_configs_follow_the_paper():
    runs = plan("all")
    for r in runs:
        o = r.overrides
        if o["dataset"].startswith("cifar") and r.table != "table6":
            assert o["epochs"] == 200 and o["lr"] == 0.1 and o["batch_size"] == 128
        if o["optimizer"].startswith("agnostic-sam") and r.table != "table3":
            assert o["rho1"] == pytest.approx(2 * o["rho2"])
            assert o["rho1"] == (0.2 if o["dataset"] == "cifar100" else 0.1)
        if o["optimizer"] == "sam" and o["dataset"].startswith("cifar") and r.table != "table6":
            assert o["rho"] == (0.1 if o["dataset"] == "cifar100" else 0.05)
    t3 = plan("table3")
    assert {r.overrides["weights"] for r in t3} == {"EfficientNet_B4_Weights.IMAGENET1K_V1"}
    assert all(r.overrides["lr"] == 0.01 and r.overrides["epochs"] == 100 for r in t3)
    assert {r.overrides["noise_rate"] for r in plan("table4")} == {0.1, 0.2, 0.3, 0.4}
    assert ({r.overrides["rho"] for r in plan("table2") if r.cell_method == "sam"}
            == {0.02, 0.05, 0.1})
    assert ({r.overrides.get("split") for r in runs
             if r.cell_method == "agnostic-sam-nonoverlap"} == {"fixed"})
    assert {r.overrides["seed"] for r in plan("table4", seeds=[5, 6])} == {5, 6}


def test_dry_run_lists_every_cell(capsys):
    assert main(["reproduce", "all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("249 training runs, 147 table cells, ")
    assert sum(CELLS.values()) == 147
    for key in ("table1:cifar10/wrn28_10/sgd", "table2:oxford_pets/efficientnet_b4/sam",
                "table3:fgvc_aircraft/efficientnet_b4/agnostic-sam",
                "table4:cifar100/resnet32/noise0.4/agnostic-sam",
                "table5:cifar100/densenet121/agnostic-sam-simpler",
                "table6:fgvc_aircraft/resnet18/agnostic-sam-nonoverlap",
                "figure1:cifar100/pyramidnet101/agnostic-sam-nonoverlap"):
        assert key in out
    # epochs, steps per epoch, total steps of a CIFAR run at batch 128
    assert any(line.split()[1:4] == ["200", "390", "78000"] for line in out.splitlines()[1:-1])


# ---- error inputs ----------------------------------------------------------------------------

def test_bad_config_files_are_rejected(tmp_path):
    good = (spec_module.CONFIG_DIR / "table3.yaml").read_text()
    cases = {
        "typo_key": good.replace("methods:", "methodz:"),
        "bad_field": good.replace("epochs: 100", "epoch: 100"),
        "unknown_method": good.replace("method: [sgd, sam, agnostic-sam]", "method: [sgd, adam]"),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        with pytest.raises(UsageError):
            parse_spec(path)
    with pytest.raises(UsageError, match="unknown table"):
        plan("table7")


def test_run_state(tmp_path):
    (run,) = [r for r in plan("table3") if r.cell == "flowers102/efficientnet_b4/sgd"]
    d = tmp_path / run.run_id
    assert run_state(d, run.overrides) == "new"
    _write_run(tmp_path, run, 50.0)
    assert run_state(d, run.overrides) == "complete"
    (d / "result.json").unlink()
    (d / "checkpoint.pt").write_bytes(b"")
    assert run_state(d, run.overrides) == "partial"
    with pytest.raises(UsageError, match="lr="):
        run_state(d, {**run.overrides, "lr": 0.5})


def test_missing_data_is_one_line_before_any_training(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["reproduce", "table4", "--seeds", "0", "--data-dir", str(tmp_path / "nodata"),
               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "cifar10" in err and str(tmp_path / "nodata") in err and "--download" in err
    assert not (out / "runs").exists()


# ---- real training ---------------------------------------------------------------------------

def test_transfer_learning_starts_from_the_weights_file(tmp_path):
    from agnostic_sam.models import create_model
    from agnostic_sam.train import load_config, train

    torch.manual_seed(1234)  # not the run's seed: its own initialisation differs from the file
    source = create_model("resnet18_mini", num_classes=1000, in_channels=3, image_size=32)
    path = tmp_path / "imagenet_like.pt"
    torch.save(source.state_dict(), path)
    params = dict(source.named_parameters())

    def finetune(weights):
        out = tmp_path / ("with" if weights else "without")
        # lr 1e-9, no momentum/decay: one step leaves the start point in place to ~1e-9
        cfg = load_config(None, {
            "dataset": "synthetic", "model": "resnet18_mini", "optimizer": "sgd", "lr": 1e-9,
            "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, "max_steps": 1, "batch_size": 8,
            "weights": weights, "out": str(out), "progress": False, "device": "cpu",
        })
        train(cfg)
        return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]

    tuned = finetune(str(path))
    body = [n for n in params if not n.startswith("fc.")]
    for name in body:
        torch.testing.assert_close(tuned[name], params[name].detach(), atol=1e-6, rtol=0)
    assert tuned["fc.weight"].shape == (10, params["fc.weight"].shape[1])  # new head, 10 classes
    scratch = finetune(None)
    assert max((scratch[n] - params[n]).abs().max().item() for n in body) > 1e-2


def test_smoke_one_table_then_skip_and_resume(tmp_path, monkeypatch):
    # 32x32 stand-ins instead of 224x224 keep this default-suite test fast; the slow test below
    # smokes every table at the real sizes.
    small = {k: (32, c) for k, (_, c) in plan_module.SMOKE_SHAPES.items()}
    monkeypatch.setattr(plan_module, "SMOKE_SHAPES", small)
    logs: list[str] = []
    report = reproduce("table3", out=tmp_path, smoke=True, device="cpu", progress=False,
                       log=logs.append)
    cells = report["tables"]["table3"]["cells"]
    assert len(cells) == 9
    for c in cells:
        assert c["ours"]["n"] == 1 and 0.0 <= c["ours"]["mean"] <= 100.0
        assert c["paper"]["mean"] is not None and c["seconds_per_epoch"] > 0
    assert (tmp_path / "report.md").read_text().count("efficientnet_b4") >= 9
    assert report["smoke"] is True and "Smoke run" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert list((tmp_path / "smoke_weights").glob("*.pt"))  # the weights path was exercised
    trained = [line for line in logs if "] train" in line]
    assert trained

    # second call: every run is complete and skipped; a run without result.json is resumed
    first = next(iter((tmp_path / "runs").iterdir()))
    (first / "result.json").unlink()
    logs.clear()
    reproduce("table3", out=tmp_path, smoke=True, device="cpu", progress=False, log=logs.append)
    assert not [line for line in logs if "] train" in line]
    assert [line for line in logs if "] resume" in line and first.name in line]
    assert (first / "result.json").exists()

    # --report-only names each run that has not finished and where it stands
    (first / "result.json").unlink()
    logs.clear()
    reproduce("table3", out=tmp_path, smoke=True, device="cpu", progress=False,
              report_only=True, log=logs.append)
    total = len({r.run_id for r in plan("table3", smoke=True)})
    assert logs[0] == (f"1 of {total} runs are missing (not finished); the report covers the "
                       "finished ones")
    assert logs[1] == f"  partial (stopped; the next launch resumes it): {first}"
    assert not [line for line in logs if "] resume" in line]


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_smoke_every_table(tmp_path, table):
    report = reproduce(table, out=tmp_path, smoke=True, device="cpu", progress=False,
                       log=lambda s: None)
    cells = report["tables"][table]["cells"]
    assert len(cells) == CELLS[table]
    assert all(c["ours"]["n"] == c["ours"]["expected"] for c in cells)


# ---- the digits protocols (Table 4 and Table 2 on digits, fixed and tuned radii) -------------

def test_digits_studies_dry_run(capsys):
    from agnostic_sam.reproduce import STUDIES

    # finals: models x settings x 7 method entries x 10 seeds; tuning: models x settings x
    # 3 tuned methods x 4 candidates x 2 tuning seeds
    expected = {"table4-digits": (2 * 4 * 7 * 10 + 2 * 4 * 3 * 4 * 2, 2 * 4 * 7),
                "table2-digits": (2 * 3 * 7 * 10 + 2 * 3 * 3 * 4 * 2, 2 * 3 * 7)}
    assert set(expected) | {"family-digits"} == set(STUDIES)  # the family: test_family_study
    for table, (n_runs, n_cells) in expected.items():
        assert main(["reproduce", table, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.strip().splitlines()[-1].startswith(
            f"{n_runs} training runs, {n_cells} table cells, ")
        assert out.count(" tune ") == 2 * (4 if table == "table4-digits" else 3) * 3 * 4 * 2
        assert "test set never opened" in out
        # one run id per seed in a fixed-radius cell; tuned cells wait for the choice
        cell = f"{table}:cnn/{'noise0.4' if table == 'table4-digits' else 'frac0.1'}/agnostic-sam"
        ids = [line.split()[0] for line in out.splitlines() if line.endswith(f" {cell}")]
        assert len(ids) == len(set(ids)) == 10
        assert {i.split("-seed")[1].split("-")[0] for i in ids} == {str(s) for s in range(10)}
        assert out.count("-<tuned>") == (n_cells // 7) * 3 * 10
    runs = plan("table2-digits")
    assert {(r.overrides["train_fraction"], r.overrides["epochs"]) for r in runs} == {
        (0.1, 100), (0.2, 50), (0.5, 20)}
    assert {r.overrides["model"] for r in runs} == {"cnn", "mlp"}
    # the paper's radii on the fixed side, rho1 = 2 rho2
    for r in plan("table4-digits"):
        if r.tune is None and r.method != "sgd":
            assert r.overrides.get("rho", 0.05) == 0.05
            assert r.overrides.get("rho1", 0.1) == pytest.approx(2 * r.overrides.get("rho2", 0.05))


def _write_result(root: Path, run, value: float, **extra) -> None:
    d = root / run.run_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(run.overrides))
    (d / "result.json").write_text(json.dumps({run.metric: value, **extra}))


def test_study_report_verdicts_from_hand_built_results(tmp_path):
    from agnostic_sam.reproduce import spec_of, verdict
    from agnostic_sam.stats import paired_difference

    spec = spec_of("table4-digits")
    runs = plan("table4-digits", seeds=[0, 1, 2, 3])
    sam = {0: 90.0, 1: 91.0, 2: 92.0, 3: 93.0}
    values = {
        "sam": sam,
        "agnostic-sam": {s: v + 1.0 + 0.1 * (s % 2) for s, v in sam.items()},  # ahead of SAM
        "agnostic-sam-simpler": {s: v + (0.5, -0.5, 0.3, -0.3)[s] for s, v in sam.items()},  # tie
        "sgd": {s: v - 5.0 + 0.2 * s for s, v in sam.items()},  # behind SAM
    }
    for run in runs:
        if run.row == "cnn/noise0.2" and run.method in values:
            _write_result(tmp_path, run, values[run.method][run.overrides["seed"]])
    report = build_report(runs, tmp_path, spec=spec)
    study = report["tables"]["table4-digits"]
    (fixed, tuned) = study["panels"]
    (row,) = [r for r in fixed["rows"] if r["row"] == "cnn/noise0.2"]
    by = {c["method"]: c for c in row["methods"]}
    assert by["agnostic-sam"]["vs"]["SAM"]["verdict"] == "ahead"
    assert by["agnostic-sam-simpler"]["vs"]["SAM"]["verdict"] == "no significant difference"
    assert by["sgd"]["vs"]["SAM"]["verdict"] == "behind"
    assert by["sam"]["vs"]["SGD"]["verdict"] == "ahead" and by["sam"]["vs"]["SAM"] is None
    d = by["agnostic-sam"]["vs"]["SAM"]
    assert d["mean"] == pytest.approx(1.05) and d["n"] == 4
    ref = paired_difference(values["agnostic-sam"], sam)
    assert (d["low"], d["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert by["agnostic-sam"]["mean"] == pytest.approx(92.55) and by["agnostic-sam"]["n"] == 4
    assert by["agnostic-sam"]["radius"] == "rho1=0.1, rho2=0.05"
    # paper context: CIFAR-10 ResNet-32 at noise 0.2, and the paper's gap to SAM
    assert by["agnostic-sam"]["paper"]["mean"] == 93.38
    assert by["agnostic-sam"]["paper"]["vs"]["SAM"] == pytest.approx(93.38 - 92.38)
    assert by["agnostic-sam-simpler"]["paper"] is None  # not in the paper's Table 4
    # the tuned panel waits for tuning; rows without runs say so
    (trow,) = [r for r in tuned["rows"] if r["row"] == "cnn/noise0.2"]
    assert {c["method"]: c["radius"] for c in trow["methods"]}["sam-tuned"] == "pending tuning"
    md = render_markdown(report)
    assert ("| cnn/noise0.2 | agnostic-sam | rho1=0.1, rho2=0.05 | 92.55 ± 1.32 | 4/4 | +1.05 ["
            in md)
    assert "| ahead |" in md and "| behind |" in md and "| no significant difference |" in md
    assert "A different data set, the same protocol" in md
    one = paired_difference({0: 1.0}, {0: 0.0})
    assert verdict(one) == "too few seeds"


def test_tuned_radius_flow_on_a_tiny_study(tmp_path, monkeypatch):
    """Tuning picks the argmax of the held-out grid, retrains with it, and never opens the test
    split while tuning."""
    import dataclasses

    from agnostic_sam.data import registry
    from agnostic_sam.reproduce import runner

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tiny.yaml").write_text(yaml.safe_dump({
        "table": "table4-digits", "title": "tiny", "cell": "{model}/noise{noise_rate}/{method}",
        "row": "{model}/noise{noise_rate}", "x": "noise_rate", "group": "model",
        "base": {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 64, "lr": 0.05},
        "methods": {"sgd": {"optimizer": "sgd"}, "sam": {"optimizer": "sam", "rho": 0.05},
                    "sam-tuned": {"optimizer": "sam", "tune": [0.05, 3.0]}},
        "tuning": {"val_fraction": 0.1, "rho2_ratio": 0.5, "seeds": [0, 1]},
        "panels": {"fixed": {"methods": ["sgd", "sam"], "versus": {"SGD": "sgd", "SAM": "sam"}},
                   "tuned": {"methods": ["sgd", "sam-tuned"],
                             "versus": {"SGD": "sgd", "SAM": "sam-tuned"}}},
        "paper": {"table": "table4", "cell": "cifar10/resnet32/noise{noise_rate}/{optimizer}"},
        "grid": {"noise_rate": [0.2], "seed": [0, 1, 2]},
    }))
    monkeypatch.setattr(spec_module, "CONFIG_DIR", config_dir)

    # count every opening of the digits test split, per phase
    opened: list[str] = []
    phase = ["none"]
    spec = registry.DATASETS["digits"]

    def builder(req):
        source = spec.builder(req)
        load_test = source.load_test
        return dataclasses.replace(source,
                                   load_test=lambda: (opened.append(phase[0]), load_test())[1])

    monkeypatch.setitem(registry.DATASETS, "digits", dataclasses.replace(spec, builder=builder))
    train_runs = runner._train_runs

    def tagged(todo, runs, **kw):
        phase[0] = kw["label"].strip() or "final"
        return train_runs(todo, runs, **kw)

    monkeypatch.setattr(runner, "_train_runs", tagged)
    report = reproduce("table4-digits", out=tmp_path / "out", device="cpu", progress=False,
                       log=lambda s: None)
    assert "tune" not in opened and opened.count("final") >= 1

    root = tmp_path / "out" / "runs"
    results = [json.loads(p.read_text()) for p in root.glob("*/result.json")]
    held = [r for r in results if r["eval_split"] == "holdout"]
    assert len(held) == 2 * 2  # 2 candidates x 2 tuning seeds
    means = {}
    for r in held:
        means.setdefault(r["config"]["rho"], []).append(r["final_test_acc"])
    means = {k: sum(v) / len(v) for k, v in means.items()}
    best = max(means.values())
    argmax = min(k for k, v in means.items() if v == best)
    (entry,) = report["tables"]["table4-digits"]["tuning"]
    assert entry["chosen"] == argmax
    assert entry["grid"][f"{argmax:g}"]["mean"] == pytest.approx(means[argmax])
    # the tuned final runs: every grid seed, the chosen radius, the full training set, test set
    finals = [r for r in results if r["eval_split"] == "test" and r["config"]["optimizer"] == "sam"]
    assert {r["config"]["rho"] for r in finals} == {0.05, argmax}
    (tuned_panel,) = [p for p in report["tables"]["table4-digits"]["panels"]
                      if p["name"] == "tuned"]
    cell = {c["method"]: c for c in tuned_panel["rows"][0]["methods"]}["sam-tuned"]
    assert cell["n"] == 3 and cell["radius"] == f"rho={argmax:g}"
    assert (tmp_path / "out" / "figure.png").stat().st_size > 0


def test_digits_steps_per_epoch_match_the_data_module():
    from agnostic_sam.data import build_data

    for val_fraction in (0.0, 0.1):
        for fraction in (0.1, 0.2, 0.5, 1.0):
            data = build_data("digits", val_fraction=val_fraction, train_fraction=fraction, seed=3)
            o = {"dataset": "digits", "val_fraction": val_fraction, "train_fraction": fraction,
                 "batch_size": 64, "optimizer": "sgd"}
            assert steps_per_epoch(o) == len(data.train) // 64, (val_fraction, fraction)
    # 1,437 images; held out: ceil(0.1 * 1437) = 144; a 10% subset of the rest: 129
    small = {"dataset": "digits", "val_fraction": 0.1, "train_fraction": 0.1}
    assert steps_per_epoch(small) == 129 // 64


def test_study_paper_context_is_the_mean_of_matching_cells():
    from agnostic_sam.reproduce import spec_of
    from agnostic_sam.reproduce.spec import paper_value

    paper = paper_numbers()
    t2 = paper["tables"]["table2"]["cells"]
    (run,) = [r for r in plan("table2-digits", seeds=[0]) if r.cell == "cnn/frac0.1/sam-tuned"]
    value = paper_value(spec_of("table2-digits"), run.overrides, paper)
    sam = [v["mean"] for k, v in t2.items() if k.endswith("/sam")]
    assert value["cells"] == 12 and value["mean"] == pytest.approx(sum(sam) / 12)
    cell = "mlp/noise0.3/agnostic-sam-tuned"
    (run,) = [r for r in plan("table4-digits", seeds=[0]) if r.cell == cell]
    assert paper_value(spec_of("table4-digits"), run.overrides, paper)["mean"] == 91.98
