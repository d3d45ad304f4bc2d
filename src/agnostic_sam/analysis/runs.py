"""Analysis of a finished run directory: its model, its loss, its training batches.

A run directory (written by `agnostic-sam train`) holds `config.yaml` and `checkpoint.pt`;
`agnostic_sam.train.load_trained` rebuilds the model from them. The analyses use

* the loss the run trained with: cross-entropy with the run's label smoothing, and
* the first N batches of the run's TRAINING set, in order (no shuffling), with the run's labels
  (noisy ones included, as the optimizer saw them) and the run's batch size. Images get the
  data set's EVAL transforms (those of `bundle.test`: no random crop or flip) when the training
  set is a `LabeledView`; in-memory `TensorDataset`s (digits, synthetic) have no augmentation and
  are used as given. Any other training set is used as given, its random augmentation drawn
  under a fixed seed (the global RNG is restored afterwards), so every call sees the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from agnostic_sam.analysis.common import Batch
from agnostic_sam.analysis.hessian import top_eigenvalues
from agnostic_sam.errors import UsageError
from agnostic_sam.train.rundir import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    RunDir,
    check_path_names,
)

__all__ = [
    "check_run_dir",
    "load_run",
    "read_metrics",
    "run_batches",
    "run_loss",
    "top_eigenvalue_of_run",
]


def check_run_dir(run_dir: str | Path, *,
                  need: tuple[str, ...] = (CONFIG_NAME, CHECKPOINT_NAME)) -> Path:
    """The run directory as a Path, or UsageError naming what is missing (or an impossible
    name: too long, a dangling or looping symbolic link)."""
    check_path_names("--run", run_dir)
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"run directory {str(path)!r} does not exist "
                         "(make one with `agnostic-sam train --out DIR`)")
    for name in need:
        if not (path / name).is_file():
            raise UsageError(f"run directory {str(path)!r} has no {name} (is it a finished "
                             "`agnostic-sam train` run?)")
    return path


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[nn.Module, Any]:
    """(model in its checkpointed state on `device`, TrainConfig) of a run directory."""
    from agnostic_sam.train import load_trained, resolve_device

    path = check_run_dir(run_dir)
    return load_trained(path, device=str(resolve_device(device)))


def run_loss(cfg: Any) -> nn.Module:
    """The training criterion of the run (cross-entropy with its
    label smoothing), mean reduction."""
    return nn.CrossEntropyLoss(label_smoothing=float(getattr(cfg, "label_smoothing", 0.0) or 0.0))


def _train_with_eval_transforms(bundle: Any) -> torch.utils.data.Dataset:
    """The training samples and labels with the test set's (eval)
    transform, where both are views."""
    from agnostic_sam.data import LabeledView

    train, test = bundle.train, bundle.test
    if isinstance(train, LabeledView) and isinstance(test, LabeledView):
        return LabeledView(train.base, train.indices, test.transform, train.targets)
    return train


def run_batches(cfg: Any, batches: int, *, batch_size: int | None = None,
                seed: int = 0) -> list[Batch]:
    """The first `batches` batches of the run's training set, in
    order (see the module docstring)."""
    from agnostic_sam.data import build_data

    if batches < 1:
        raise UsageError(f"--batches must be >= 1, got {batches}")
    size = int(batch_size or cfg.batch_size)
    if size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {size}")
    bundle = build_data(cfg.dataset, data_dir=cfg.data_dir, download=False,
                        noise_rate=cfg.noise_rate, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        train_fraction=cfg.train_fraction, image_size=cfg.image_size)
    loader = torch.utils.data.DataLoader(_train_with_eval_transforms(bundle), batch_size=size,
                                         shuffle=False, num_workers=0)
    kept: list[Batch] = []
    # Augmentation draws from the global RNG: fix it for reproducible batches, then restore it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for inputs, targets in loader:
            kept.append((inputs, targets))
            if len(kept) == batches:
                break
    return kept


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl` (one JSON object per epoch); UsageError if missing or broken."""
    return RunDir(check_run_dir(run_dir, need=(METRICS_NAME,))).read_metrics()


def top_eigenvalue_of_run(run_dir: str | Path, batches: int = 4, iters: int = 100, seed: int = 0, *,
                          tol: float = 1e-4, device: str = "auto", progress: bool = False) -> float:
    """Largest-magnitude Hessian eigenvalue of a run's final model on its
    first `batches` training batches.

    Same loss, data and conventions as `agnostic-sam hessian` (power iteration, eval mode).
    """
    model, cfg = load_run(run_dir, device)
    data = run_batches(cfg, batches, seed=seed)
    return top_eigenvalues(model, run_loss(cfg), data, k=1, iters=iters, tol=tol, seed=seed,
                           progress=progress)[0]
