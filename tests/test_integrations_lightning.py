"""Lightning adapter: 20 steps through Trainer.fit equal the hand-written loop with the same
optimizer, data order and split generator (fp32, bf16-mixed, 16-mixed vs LossScaler),
accumulation, clipping, global_step / max_steps / schedulers, and the refused combinations."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning.pytorch")

from agnostic_sam import SAM, AgnosticSAM, LossScaler, Plain, accumulate, split_batch  # noqa: E402
from agnostic_sam.integrations.lightning import SharpnessAwareMixin  # noqa: E402

STEPS, BATCH, DIM = 20, 32, 6


def _data(n: int = STEPS * BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 3))


def _make_opt(kind: str, params, **kw):
    if kind == "agnostic":
        return AgnosticSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho1=0.1, rho2=0.05, **kw)
    if kind == "simpler":
        return AgnosticSAM(params, torch.optim.SGD, lr=0.1, rho1=0.1, rho2=0.05, variant="simpler",
                           **kw)
    if kind == "sam":
        return SAM(params, torch.optim.AdamW, lr=0.01, rho=0.05, weight_decay=0.01, **kw)
    return Plain(params, torch.optim.SGD, lr=0.1, **kw)


class Lit(SharpnessAwareMixin, L.LightningModule):
    def __init__(self, kind: str = "agnostic", sched: bool = False, opt_kw: dict | None = None):
        super().__init__()
        self.net = _net()
        self.kind, self.sched, self.opt_kw = kind, sched, opt_kw or {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = _make_opt(self.kind, self.parameters(), **self.opt_kw)
        if not self.sched:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(module, *, micro: int = BATCH, steps: int = STEPS, accumulate_grad_batches: int = 1,
         devices: int = 1,
         sampler=None, **trainer_kw):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro,
                                         shuffle=False,
                                         sampler=sampler)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, max_steps=steps, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate_grad_batches, **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trainer


def _reference(kind: str, *, micro_batches: int = 1, autocast=None, loss_scaler=None,
               steps: int = STEPS,
               sched: bool = False, **kw):
    """The plain loop: same model init, data order, split generator (seed 0)."""
    net = _net()
    opt = _make_opt(kind, net.parameters(), loss_scaler=loss_scaler, **kw)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    gen = torch.Generator().manual_seed(0)
    x, y = _data()

    def f(xb, yb):
        if autocast is None:
            return F.cross_entropy(net(xb), yb)
        with torch.autocast("cpu", dtype=autocast):
            return F.cross_entropy(net(xb), yb)

    for i in range(steps):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        if isinstance(opt, AgnosticSAM):
            x_t, y_t, x_v, y_v = split_batch(xb, yb, 0.7, gen)
            opt.step(accumulate(f, (x_t, y_t), micro_batches, opt.backward),
                     accumulate(f, (x_v, y_v), micro_batches, opt.backward))
        else:
            opt.step(accumulate(f, (xb, yb), micro_batches, opt.backward))
        if sch is not None:
            sch.step()
    return net


def _assert_close(lit, ref, atol=1e-5):
    for (name, a), b in zip(lit.net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["agnostic", "simpler", "sam", "plain"])
def test_fp32_equals_plain_loop(kind):
    lit = Lit(kind)
    trainer = _fit(lit)
    assert trainer.global_step == STEPS
    _assert_close(lit, _reference(kind))


def test_bf16_mixed_equals_plain_loop():
    lit = Lit("agnostic")
    _fit(lit, precision="bf16-mixed")
    _assert_close(lit, _reference("agnostic", autocast=torch.bfloat16))


def test_fp16_mixed_equals_loss_scaler_path():
    from lightning.pytorch.plugins.precision import MixedPrecision

    lit = Lit("agnostic")
    # CPU: Trainer(precision="16-mixed") falls back to bf16; the plugin itself runs fp16 autocast
    # with a torch.amp.GradScaler on CPU, which is what a GPU run does.
    _fit(lit, plugins=[MixedPrecision("16-mixed", "cpu")])
    ref = _reference("agnostic", autocast=torch.float16, loss_scaler=LossScaler())
    _assert_close(lit, ref)


@pytest.mark.parametrize("kind", ["agnostic", "sam"])
def test_accumulate_2x16_equals_1x32_and_counts_optimizer_steps(kind):
    # Old behaviour: Lightning summed 16-batch gradients before step(): the SAM step discarded
    # or re-used them. Now each pass re-runs both micro-batches: 1x32 exactly.
    lit = Lit(kind)
    trainer = _fit(lit, micro=16, accumulate_grad_batches=2)
    assert trainer.global_step == STEPS
    _assert_close(lit, _reference(kind))  # 1x32


def test_gradient_clip_val_clips_the_final_gradient():
    lit = Lit("agnostic")
    _fit(lit, gradient_clip_val=0.05)
    clipped = _reference("agnostic", max_grad_norm=0.05)
    _assert_close(lit, clipped)
    unclipped = _reference("agnostic")
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(clipped.state_dict().values(),
                                                          unclipped.state_dict().values()))


def test_scheduler_and_max_steps_follow_optimizer_steps():
    lit = Lit("agnostic", sched=True)
    trainer = _fit(lit, micro=16, accumulate_grad_batches=2, steps=7)
    assert trainer.global_step == 7
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (7 // 3))
    _assert_close(lit, _reference("agnostic", micro_batches=2, steps=7, sched=True))


def test_refuses_clip_by_value():
    with pytest.raises(ValueError, match="gradient_clip_algorithm='norm'"):
        _fit(Lit("agnostic"), steps=1, gradient_clip_val=0.5, gradient_clip_algorithm="value")


def test_refuses_foreign_optimizer():
    class Foreign(Lit):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="an optimizer of a registered method"):
        _fit(Foreign(), steps=1)


def test_refuses_overridden_optimizer_step_and_clipping_hook():
    class Custom(Lit):
        def optimizer_step(self, *args, **kwargs):
            return super().optimizer_step(*args, **kwargs)

    with pytest.raises(TypeError, match="do not override optimizer_step"):
        _fit(Custom(), steps=1)

    class Clip(Lit):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                        gradient_clip_algorithm=None):
            pass

    with pytest.raises(TypeError, match="configure_gradient_clipping"):
        _fit(Clip(), steps=1)


def test_split_generator_is_checkpointed():
    lit = Lit("agnostic")
    lit.sharpness_generator.manual_seed(5)
    ckpt: dict = {}
    lit.on_save_checkpoint(ckpt)
    state = lit.sharpness_generator.get_state()
    torch.randperm(10, generator=lit.sharpness_generator)
    other = copy.deepcopy(lit)
    other.on_load_checkpoint(ckpt)
    assert torch.equal(other.sharpness_generator.get_state(), state)


def test_refuses_manual_optimization():
    # Old behaviour: manual mode with the raw optimizer never advanced global_step (max_steps
    # never stopped). The mixin runs in automatic optimization and refuses manual mode.
    class Manual(Lit):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(TypeError, match="remove automatic_optimization = False"):
        _fit(Manual(), steps=1)


def test_refuses_clipping_set_twice():
    with pytest.raises(ValueError, match="gradient clipping is set twice"):
        _fit(Lit("agnostic", opt_kw={"max_grad_norm": 1.0}), steps=1, gradient_clip_val=0.5)


def test_logging_at_theta_inside_training_step():
    seen = []

    class Logged(Lit):
        def training_step(self, batch, batch_idx):
            loss = super().training_step.__wrapped__(self, batch, batch_idx)
            seen.append(self.sharpness_at_theta)
            if self.sharpness_at_theta:
                self.log("train_loss", loss)
            return loss

    _fit(Logged("sam"), steps=2)
    assert seen == [True, False, True, False]  # SAM: pass at theta, pass at theta + e


class _RankShards(torch.utils.data.Sampler):
    """Rank r of 2 gets samples 32 i + 16 r ... 32 i + 16 r + 15 of global batch i (read at
    iteration time, in the spawned process)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n // 2

    def __iter__(self):
        r = torch.distributed.get_rank()
        return iter([i * BATCH + r * (BATCH // 2) + j
                     for i in range(self.n // BATCH) for j in range(BATCH // 2)])


@pytest.mark.slow  # spawns 2 processes
def test_ddp_spawn_two_processes_equal_one_process():
    # Each rank accumulates 2 micro-batches of 8 and splits its 16 with the same generator draw;
    # DDP averages the equal-sized parts, so each pass's gradient is that of their union.
    lit = Lit("agnostic")
    _fit(lit, micro=8, accumulate_grad_batches=2, strategy="ddp_spawn", devices=2,
         use_distributed_sampler=False,
         sampler=_RankShards(STEPS * BATCH))
    net = _net()
    opt = _make_opt("agnostic", net.parameters())
    gen = torch.Generator().manual_seed(0)
    x, y = _data()
    f = lambda xb, yb: F.cross_entropy(net(xb), yb)  # noqa: E731
    half = BATCH // 2
    for i in range(STEPS):
        xs = [x[i * BATCH + r * half:i * BATCH + (r + 1) * half] for r in range(2)]
        ys = [y[i * BATCH + r * half:i * BATCH + (r + 1) * half] for r in range(2)]
        perm = torch.randperm(half, generator=gen)
        t, v = perm[:round(0.7 * half)], perm[round(0.7 * half):]
        opt.step(accumulate(f, (torch.cat([a[t] for a in xs]), torch.cat([b[t] for b in ys])), 1,
                            opt.backward),
                 accumulate(f, (torch.cat([a[v] for a in xs]), torch.cat([b[v] for b in ys])), 1,
                            opt.backward))
    _assert_close(lit, net)
