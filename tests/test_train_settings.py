"""The training settings AdamW, linear warm-up and final-gradient clipping, each checked against
a hand-written loop with the same data order, model initialisation and settings (20 steps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agnostic_sam.data import build_data
from agnostic_sam.models import create_model
from agnostic_sam.train import load_checkpoint, load_config, run_id, train
from agnostic_sam.train.batches import epoch_index
from agnostic_sam.train.build import seed_everything

STEPS = 20


def _cfg(tmp_path, **overrides):
    base = {"epochs": 2, "batch_size": 64, "max_steps": STEPS, "threads": 1, "progress": False,
            "device": "cpu", "model": "mlp", "out": str(tmp_path / "run"), "lr": 0.01,
            "weight_decay": 0.05}
    return load_config(None, {**base, **overrides})


def _lr(cfg, t: int, steps_per_epoch: int) -> float:
    """The schedule in closed form: linear warm-up over w steps, then cosine to 0."""
    total = cfg.epochs * steps_per_epoch
    w = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    if t < w:
        return cfg.lr * (t + 1) / w
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))


def _reference(cfg) -> dict[str, torch.Tensor]:
    """Plain (method "sgd") or SAM over AdamW/SGD, written out by hand."""
    seed_everything(cfg.seed)
    data = build_data(cfg.dataset, seed=cfg.seed)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         image_size=data.image_size)
    params = list(model.parameters())
    if cfg.base_optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    x_all, y_all = data.train.tensors
    n = len(y_all)
    steps_per_epoch = n // cfg.batch_size
    t = 0
    for epoch in range(cfg.epochs):
        for row in epoch_index(cfg, n, None, epoch):
            x, y = x_all[row], y_all[row].long()
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, t, steps_per_epoch)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if cfg.optimizer == "sam":  # ascend to theta + rho g / ||g||, take the gradient there
                with torch.no_grad():
                    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
                    theta = [p.detach().clone() for p in params]
                    for p in params:
                        p.add_(p.grad * (cfg.rho / (norm + 1e-12)))
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                with torch.no_grad():
                    for p, th in zip(params, theta):
                        p.copy_(th)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            t += 1
            if t == STEPS:
                return model.state_dict()
    return model.state_dict()


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
@pytest.mark.parametrize("settings", [
    {"base_optimizer": "adamw", "betas": [0.85, 0.99], "adam_eps": 1e-6},
    {"warmup_epochs": 0.5},
    {"max_grad_norm": 0.05},
    {"base_optimizer": "adamw", "warmup_epochs": 0.5, "max_grad_norm": 0.05},
], ids=["adamw", "warmup", "clip", "adamw+warmup+clip"])
def test_settings_match_a_hand_written_loop(tmp_path, optimizer, settings) -> None:
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, optimizer=optimizer, rho=0.05, **settings)
    train(cfg)
    got = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    want = _reference(cfg)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


def test_clipping_changes_the_result(tmp_path) -> None:
    # The bound is active: a clipped run differs from the unclipped one.
    a = train(_cfg(tmp_path / "a", optimizer="sam", max_grad_norm=0.05))
    b = train(_cfg(tmp_path / "b", optimizer="sam"))
    assert a["final_train_loss"] != b["final_train_loss"]


def test_the_new_settings_are_part_of_the_run_identity(tmp_path) -> None:
    plain = _cfg(tmp_path)
    assert run_id(plain) == run_id(_cfg(tmp_path, base_optimizer="sgd", warmup_epochs=0.0))
    for change in ({"base_optimizer": "adamw"}, {"warmup_epochs": 1.0}, {"max_grad_norm": 1.0},
                   {"betas": [0.8, 0.9]}, {"adam_eps": 1e-6}, {"train_fraction": 0.5}):
        assert run_id(_cfg(tmp_path, **change)) != run_id(plain), change
