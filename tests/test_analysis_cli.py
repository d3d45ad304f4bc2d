"""`agnostic-sam hessian | landscape | congruence`: files written, numbers consistent, errors as
one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from agnostic_sam.analysis import loss_surface, top_eigenvalues
from agnostic_sam.analysis import runs as runs_module
from agnostic_sam.cli import main

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)  # decodes, so the file is complete
    assert image.shape[0] > 100 and image.shape[1] > 100


def fake_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def fake_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(2)]


@pytest.fixture
def fake_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Two run folders whose model and data come from monkeypatched loaders (no trainer needed)."""
    dirs = []
    for i, optimizer in enumerate(["sgd", "agnostic-sam"]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "config.yaml").write_text(f"optimizer: {optimizer}\n")
        (d / "checkpoint.pt").write_bytes(b"")
        dirs.append(d)
    seeds = {str(d): i for i, d in enumerate(dirs)}
    monkeypatch.setattr(runs_module, "load_run", lambda run_dir, device="auto": (
        fake_model(seeds[str(run_dir)]), SimpleNamespace(label_smoothing=0.0, optimizer="x")))
    monkeypatch.setattr(runs_module, "run_batches",
                        lambda cfg, n, batch_size=None, seed=0: fake_batches()[:n])
    return dirs


def test_hessian_command_writes_eigenvalues_log_and_trace(fake_runs: list[Path], capsys) -> None:
    run = fake_runs[0]
    assert main(["hessian", "--run", str(run), "--k", "2", "--iters", "30", "--batches", "2",
                 "--trace-samples", "5", "--device", "cpu"]) == 0
    result = json.loads((run / "hessian.json").read_text())
    expected = top_eigenvalues(fake_model(0), nn.CrossEntropyLoss(), fake_batches(), k=2, iters=30)
    assert result["eigenvalues"] == pytest.approx(expected, rel=1e-6)
    assert result["log_eigenvalues"][0] == pytest.approx(math.log(expected[0]))
    assert isinstance(result["trace"], float)
    assert result["settings"]["k"] == 2 and result["settings"]["batches"] == 2
    assert result["num_examples"] == 10
    assert "top eigenvalue" in capsys.readouterr().out


def test_landscape_command_two_runs_share_directions_and_write_pngs(
    fake_runs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "figs"
    args = ["landscape", "--out", str(out), "--steps", "5", "--span", "0.5", "--batches", "1",
            "--seed", "3"]
    for run in fake_runs:
        args += ["--run", str(run)]
    assert main(args) == 0
    data = json.loads((out / "landscape.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["sgd", "agnostic-sam"]
    for i, r in enumerate(data["runs"]):
        expected = loss_surface(fake_model(i), nn.CrossEntropyLoss(), fake_batches()[:1], steps=5,
                                span=0.5, seed=3)
        assert sum(r["loss"], []) == pytest.approx(sum(expected["loss"], []), rel=1e-6)
    assert_png(out / "landscape_contour.png")
    assert_png(out / "landscape_surface.png")


def write_metrics(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_congruence_plots_runs_with_cosines_and_skips_others(tmp_path: Path, capsys) -> None:
    write_metrics(tmp_path / "asam",
                  [{"epoch": e, "train_loss": 1.0, "cos_train_val": 0.1 * e} for e in (1, 2, 3)])
    write_metrics(tmp_path / "sgd", [{"epoch": e, "train_loss": 1.0} for e in (1, 2, 3)])
    out = tmp_path / "cos.png"
    assert main(["congruence", "--run", str(tmp_path / "asam"), "--run", str(tmp_path / "sgd"),
                 "--out", str(out)]) == 0
    assert_png(out)
    printed = capsys.readouterr().out
    assert "skipped" in printed and "(1 run)" in printed


def test_congruence_without_any_cosine_is_a_usage_error(tmp_path: Path, capsys) -> None:
    write_metrics(tmp_path / "sgd", [{"epoch": 1, "train_loss": 1.0}])
    assert main(["congruence", "--run", str(tmp_path / "sgd"),
                 "--out", str(tmp_path / "c.png")]) == 2
    assert "cos_train_val" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["hessian"], ["landscape"], ["congruence", "--out", "x.png"]])
def test_missing_run_dir_is_one_line_exit_2(tmp_path: Path, capsys, command: list[str]) -> None:
    missing = tmp_path / "nope"
    assert main([command[0], "--run", str(missing), *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "nope" in err[0]


def test_run_without_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("optimizer: sgd\n")
    assert main(["hessian", "--run", str(tmp_path)]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err


def test_landscape_needs_out_with_several_runs_and_congruence_needs_png(
    fake_runs: list[Path], capsys
) -> None:
    assert main(["landscape", "--run", str(fake_runs[0]), "--run", str(fake_runs[1])]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["congruence", "--run", str(fake_runs[0]), "--out", "x.pdf"]) == 2
    assert ".png" in capsys.readouterr().err


# -- end to end on a real run (needs the `train` command) ------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "asam"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "agnostic-sam",
                 "--epochs", "2", "--out", str(run), "--device", "cpu", "--no-progress"]) == 0
    return run


def test_end_to_end_on_a_trained_digits_run(trained_run: Path, tmp_path: Path) -> None:
    assert main(["hessian", "--run", str(trained_run), "--iters", "20", "--batches", "2",
                 "--trace-samples", "5", "--device", "cpu"]) == 0
    result = json.loads((trained_run / "hessian.json").read_text())
    assert result["eigenvalues"][0] > 0
    assert runs_module.top_eigenvalue_of_run(
        trained_run, batches=2, iters=20, device="cpu"
    ) == pytest.approx(result["eigenvalues"][0], rel=1e-6)
    assert main(["landscape", "--run", str(trained_run), "--steps", "3", "--batches", "1",
                 "--device", "cpu"]) == 0
    assert_png(trained_run / "landscape_contour.png")
    assert main(["congruence", "--run", str(trained_run), "--out", str(tmp_path / "cos.png")]) == 0
    assert_png(tmp_path / "cos.png")
