"""transformers adapter: SharpnessTrainer.train() equals the hand-written loop with the same
optimizer, data order and split generator: fp32, bf16, fp16 (GradScaler on CPU) vs LossScaler,
gradient_accumulation_steps (global_step counts optimizer steps), max_grad_norm on the final
gradient, the Trainer's lr scheduler, and the refused combinations."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments  # noqa: E402

from agnostic_sam import SAM, AgnosticSAM, LossScaler, accumulate, split_batch  # noqa: E402
from agnostic_sam.integrations.hf import SharpnessTrainer  # noqa: E402

STEPS, BATCH, DIM = 20, 32, 6


class TinyConfig(PretrainedConfig):
    model_type = "agnostic-sam-tiny"

    def __init__(self, dim: int = DIM, hidden: int = 16, classes: int = 3, loss_mult: float = 1.0,
                 **kwargs):
        self.dim, self.hidden, self.classes, self.loss_mult = dim, hidden, classes, loss_mult
        super().__init__(**kwargs)


class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(config.dim, config.hidden), nn.Tanh(),
                                 nn.Linear(config.hidden, config.classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        if loss is not None and self.config.loss_mult != 1.0:
            loss = loss * self.config.loss_mult
        return {"loss": loss, "logits": logits}


def _data(n: int = STEPS * BATCH):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _init_state():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 3)).state_dict()


def _model(loss_mult=1.0):
    m = TinyModel(TinyConfig(loss_mult=loss_mult))
    m.net.load_state_dict(_init_state())
    return m


def _train(tmp_path, *, sharpness="agnostic-sam", micro=BATCH, accum=1, steps=STEPS,
           scheduler="constant",
           max_grad_norm=0.0, grad_scaler=None, loss_mult=1.0, stop_at=None, resume=None,
           momentum_args=False, **kw):
    kw.setdefault("save_strategy", "no")
    if momentum_args:
        kw["optim_args"] = "momentum=0.9"
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, max_steps=steps, learning_rate=0.1, optim="sgd",
        lr_scheduler_type=scheduler, weight_decay=0.0, max_grad_norm=max_grad_norm,
        report_to=[], logging_steps=1000, disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_drop_last=True, seed=0, **kw,
    )
    model = _model(loss_mult)
    trainer = SharpnessTrainer(model=model, args=args, train_dataset=_Dataset(),
                               sharpness=sharpness,
                               rho=0.05, rho1=0.1, rho2=0.05, split_ratio=0.7, split_seed=0)
    if grad_scaler is not None:
        trainer.accelerator.scaler = grad_scaler
    if stop_at is not None:
        trainer.add_callback(_StopAt(stop_at))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _reference(kind="agnostic-sam", *, micro_batches=1, steps=STEPS, autocast=None,
               loss_scaler=None,
               max_grad_norm=None, lr_lambda=None):
    net = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 3))
    net.load_state_dict(_init_state())
    # The Trainer's parameter groups: weights decay, biases do not (both 0 here).
    groups = [{"params": [net[0].weight, net[2].weight], "weight_decay": 0.0},
              {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}]
    kw = {"loss_scaler": loss_scaler, "max_grad_norm": max_grad_norm, "lr": 0.1}
    if kind == "agnostic-sam":
        opt = AgnosticSAM(groups, torch.optim.SGD, rho1=0.1, rho2=0.05, **kw)
    else:
        opt = SAM(groups, torch.optim.SGD, rho=0.05, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    gen = torch.Generator().manual_seed(0)
    x, y = _data()

    def f(xb, yb):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            logits = net(xb)
        return F.cross_entropy(logits.float(), yb)

    for i in range(steps):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        if kind == "agnostic-sam":
            x_t, y_t, x_v, y_v = split_batch(xb, yb, 0.7, gen)
            opt.step(accumulate(f, (x_t, y_t), micro_batches, opt.backward),
                     accumulate(f, (x_v, y_v), micro_batches, opt.backward))
        else:
            opt.step(accumulate(f, (xb, yb), micro_batches, opt.backward))
        if sched is not None:
            sched.step()
    return net


def _assert_close(model, ref, atol=1e-5):
    for (name, a), b in zip(model.net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["agnostic-sam", "sam"])
def test_fp32_equals_plain_loop(tmp_path, kind):
    trainer, model = _train(tmp_path, sharpness=kind)
    assert trainer.state.global_step == STEPS
    _assert_close(model, _reference(kind))


def test_bf16_equals_plain_loop(tmp_path):
    _, model = _train(tmp_path, bf16=True)
    _assert_close(model, _reference(autocast=torch.bfloat16))


def test_fp16_grad_scaler_path_equals_loss_scaler_path(tmp_path):
    # On CPU accelerate has no fp16 (no GradScaler, no fp16 autocast). What fp16=True on a GPU
    # adds is the accelerator's GradScaler: give the accelerator one and check that the step it
    # drives (scaler.step(opt, closure, val_closure), every pass unscaled) equals LossScaler's.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer, model = _train(tmp_path, grad_scaler=scaler)
    assert scaler.get_scale() == 2.0**10 and trainer.state.global_step == STEPS
    _assert_close(model, _reference(loss_scaler=LossScaler(init_scale=2.0**10)))


def test_fp16_overflow_skips_the_step_and_the_scheduler(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # An infinite loss: every gradient overflows, every step is skipped and the scale backs off.
    trainer, model = _train(tmp_path, grad_scaler=scaler, steps=3, scheduler="linear",
                            loss_mult=float("inf"))
    assert scaler.get_scale() == 2.0**7 and trainer.state.global_step == 3
    _assert_close(model, _reference(steps=0))
    assert trainer.lr_scheduler.last_epoch == 0


@pytest.mark.parametrize("kind", ["agnostic-sam", "sam"])
def test_accumulation_2x16_equals_1x32_and_global_step_counts_optimizer_steps(tmp_path, kind):
    # Old behaviour: a step per micro-batch, 40 optimizer steps while global_step said 20.
    trainer, model = _train(tmp_path, sharpness=kind, micro=16, accum=2)
    assert trainer.state.global_step == STEPS
    _assert_close(model, _reference(kind))  # 1x32


def test_max_grad_norm_clips_the_final_gradient(tmp_path):
    # Old behaviour: the Trainer clipped p.grad after the step (nothing there): no effect.
    _, model = _train(tmp_path, max_grad_norm=0.05)
    clipped = _reference(max_grad_norm=0.05)
    _assert_close(model, clipped)
    unclipped = _reference()
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(clipped.state_dict().values(),
                                                          unclipped.state_dict().values()))


def test_trainer_lr_scheduler_steps_once_per_optimizer_step(tmp_path):
    trainer, model = _train(tmp_path, micro=16, accum=2, scheduler="linear")
    assert trainer.state.global_step == STEPS
    _assert_close(model,
                  _reference(micro_batches=2, lr_lambda=lambda s: max(0.0, (STEPS - s) / STEPS)))


def test_refuses_a_foreign_optimizer(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[],
                             per_device_train_batch_size=BATCH, save_strategy="no")
    model = _model()
    trainer = SharpnessTrainer(model=model, args=args, train_dataset=_Dataset(),
                               optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="needs an agnostic_sam optimizer"):
        trainer.train()


def test_refuses_a_non_torch_optim_choice(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[],
                             per_device_train_batch_size=BATCH, save_strategy="no")

    def factory(params, **kwargs):  # not a torch.optim.Optimizer class
        return torch.optim.SGD(params, **kwargs)

    trainer = SharpnessTrainer(model=_model(), args=args, train_dataset=_Dataset(),
                               optimizer_cls_and_kwargs=(factory, {"lr": 0.1}))
    with pytest.raises(ValueError, match="wraps a torch.optim.Optimizer class"):
        trainer.train()


def test_invalid_method_name():
    with pytest.raises(ValueError, match="invalid sharpness"):
        SharpnessTrainer(model=_model(), sharpness="agnostic_sam")


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    # The optimizer state (momentum) and the split generator are in the checkpoint.
    _, full = _train(tmp_path / "full", steps=STEPS, momentum_args=True)
    _train(tmp_path / "cut", steps=STEPS, save_strategy="steps", save_steps=10, stop_at=10,
           momentum_args=True)
    _, resumed = _train(tmp_path / "cut", steps=STEPS,
                        resume=str(tmp_path / "cut" / "checkpoint-10"), momentum_args=True)
    _assert_close(resumed, full.net)


# ---- DDP: 2 gloo processes, gradient_accumulation_steps=2 -------------------------------------

def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import pathlib
    trainer, model = _train(pathlib.Path(out).parent / f"run{rank}", micro=8, accum=2,
                            ddp_backend="gloo")
    if rank == 0:
        torch.save({"state": model.net.state_dict(),
                    "type": str(trainer.accelerator.distributed_type),
                    "steps": trainer.state.global_step}, out)
    # Leave the group before the interpreter exits: gloo's threads torn down at exit abort the
    # process now and then ("terminate called without an active exception", SIGABRT).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 processes
def test_ddp_two_processes_equal_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(port, str(out)), nprocs=2, join=True)
    saved = torch.load(out, weights_only=False)
    assert "MULTI_CPU" in saved["type"] and saved["steps"] == STEPS
    # accelerate shards the sequential batches of 8 round-robin: in step i rank r gets samples
    # 32 i + 8 r + [0, 8) and 32 i + 16 + 8 r + [0, 8); each rank splits its 16 with the same draw.
    net = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 3))
    net.load_state_dict(_init_state())
    groups = [{"params": [net[0].weight, net[2].weight], "weight_decay": 0.0},
              {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}]
    opt = AgnosticSAM(groups, torch.optim.SGD, rho1=0.1, rho2=0.05, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    x, y = _data()
    f = lambda xb, yb: F.cross_entropy(net(xb), yb)  # noqa: E731
    for i in range(STEPS):
        idx = [torch.cat([torch.arange(8) + i * BATCH + 8 * r,
                          torch.arange(8) + i * BATCH + 16 + 8 * r]) for r in range(2)]
        perm = torch.randperm(16, generator=gen)
        t = torch.cat([ix[perm[:11]] for ix in idx])
        v = torch.cat([ix[perm[11:]] for ix in idx])
        opt.step(accumulate(f, (x[t], y[t]), 1, opt.backward),
                 accumulate(f, (x[v], y[v]), 1, opt.backward))
    for (name, a), b in zip(saved["state"].items(), net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
