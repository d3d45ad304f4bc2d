"""TensorBoard / W&B loggers: files that the backends' own readers accept, resume without
duplicate steps, offline W&B, one-line errors for a missing package or an unknown logger."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from agnostic_sam.errors import UsageError
from agnostic_sam.train.loggers import Logger, make_logger, wandb_run_id


def _accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def _steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_no_kinds_is_a_no_op_logger(tmp_path):
    logger = make_logger([], tmp_path / "run", {})
    assert isinstance(logger, Logger) and logger.backends == []
    logger.log_step(1, {"lr": 0.1})
    logger.log_epoch(1, {"epoch": 1, "test_acc": 50.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_unknown_logger_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="unknown logger 'mlflow'; choose from tensorboard, wandb"):
        make_logger(["mlflow"], tmp_path, {})


@pytest.mark.parametrize("kind, module, extra",
                         [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                  ("wandb", "wandb", "wandb")])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, kind, module, extra):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(UsageError) as info:
        make_logger([kind], tmp_path, {})
    assert str(info.value) == f"--log {kind} needs {extra}: pip install 'agnostic-sam[{extra}]'"


def test_tensorboard_events_read_by_tensorboard(tmp_path):
    """A real run with --log tensorboard: per-step and per-epoch tags that TensorBoard reads."""
    from agnostic_sam.train import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(dataset="digits", model="mlp", epochs=2, max_steps=30, batch_size=64,
                      device="cpu", threads=1, progress=False, log=["tensorboard"], out=str(out)))
    acc = _accumulator(out)
    tags = set(acc.Tags()["scalars"])
    for tag in ("step/lr", "step/loss_train", "step/loss_val", "step/cos_train_val",
                "step/grad_norm_train", "step/grad_norm_val",
                "epoch/train_loss", "epoch/train_acc", "epoch/test_loss", "epoch/test_acc",
                "epoch/lr", "epoch/cos_train_val"):
        assert tag in tags, tag
    assert _steps(acc, "step/loss_train") == list(range(1, 31))
    assert _steps(acc, "epoch/test_acc") == [1, 2]
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(metrics) == 2


def test_tensorboard_resume_logs_each_step_once(tmp_path):
    """A killed process logged steps 1..10 but checkpointed at step 6: the resumed writer's
    purge_step drops 7..10 of the first file, so each step appears once, with the new values."""
    run = tmp_path / "run"
    first = make_logger(["tensorboard"], run, {"resume": False})
    for step in range(1, 11):
        first.log_step(step, {"loss_train": 1.0})
    first.log_epoch(1, {"epoch": 1, "test_acc": 10.0})
    first.close()
    resumed = make_logger(["tensorboard"], run, {"resume": True})
    for step in range(7, 13):
        resumed.log_step(step, {"loss_train": 2.0})
    resumed.log_epoch(2, {"epoch": 2, "test_acc": 20.0})
    resumed.close()
    acc = _accumulator(run)
    events = acc.Scalars("step/loss_train")
    assert [e.step for e in events] == list(range(1, 13))
    assert [e.value for e in events] == [1.0] * 6 + [2.0] * 6
    assert _steps(acc, "epoch/test_acc") == [1, 2]


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    logger = make_logger(["wandb"], run, {"lr": 0.1, "resume": False})
    logger.log_step(1, {"lr": 0.1, "loss_train": 2.3})
    logger.log_epoch(1, {"epoch": 1, "test_acc": 50.0, "train_loss": 1.0})
    logger.close()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run_id = wandb_run_id(run)
    assert offline[0].name.endswith(run_id)
    assert (offline[0] / f"run-{run_id}.wandb").is_file()
    assert wandb_run_id(run) == wandb_run_id(tmp_path / "." / "run")  # by path, not spelling
