"""accelerate adapter: SharpnessStep in an accelerate loop equals the hand-written loop with the
same optimizer, data order and split generator (fp32, bf16, fp16's GradScaler vs LossScaler),
accumulate() 2x16 equals 1x32, clipping, the prepared scheduler, and the refused forms
(a closure step that accelerate would skip on non-sync steps)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from agnostic_sam import SAM, AgnosticSAM, LossScaler, accumulate, split_batch  # noqa: E402
from agnostic_sam.integrations.accelerate import SharpnessStep  # noqa: E402

STEPS, BATCH, DIM = 20, 32, 6


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _data(n: int = STEPS * BATCH):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 3))


def _opt(kind, params, **kw):
    if kind == "sam":
        return SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, **kw)
    return AgnosticSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho1=0.1, rho2=0.05, **kw)


def _run(kind="agnostic", *, micro=BATCH, accum=1, mixed_precision="no", grad_scaler=None,
         max_grad_norm=None,
         sched=False, steps=STEPS):
    acc = Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=accum)
    if grad_scaler is not None:
        acc.scaler = grad_scaler  # what fp16 on a GPU gives; CPU accelerate has none
    net = _net()
    opt = _opt(kind, net.parameters())
    x, y = _data(steps * BATCH)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro,
                                         shuffle=False)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    if sch is not None:
        model, opt, loader, sch = acc.prepare(net, opt, loader, sch)
    else:
        model, opt, loader = acc.prepare(net, opt, loader)
    step = SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]).float(), b[1]),
                         max_grad_norm=max_grad_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in loader:
            with acc.accumulate(model):
                step(batch)
                if sch is not None:
                    sch.step()
    return net, opt, sch


def _reference(kind="agnostic", *, micro_batches=1, autocast=None, loss_scaler=None,
               max_grad_norm=None,
               sched=False, steps=STEPS):
    net = _net()
    opt = _opt(kind, net.parameters(), loss_scaler=loss_scaler, max_grad_norm=max_grad_norm)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    gen = torch.Generator().manual_seed(0)
    x, y = _data()

    def f(xb, yb):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = net(xb)
        return F.cross_entropy(logits.float(), yb)

    for i in range(steps):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        if kind == "agnostic":
            x_t, y_t, x_v, y_v = split_batch(xb, yb, 0.7, gen)
            opt.step(accumulate(f, (x_t, y_t), micro_batches, opt.backward),
                     accumulate(f, (x_v, y_v), micro_batches, opt.backward))
        else:
            opt.step(accumulate(f, (xb, yb), micro_batches, opt.backward))
        if sch is not None:
            sch.step()
    return net


def _assert_close(net, ref, atol=1e-5):
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["agnostic", "sam"])
def test_fp32_equals_plain_loop(kind):
    net, _, _ = _run(kind)
    _assert_close(net, _reference(kind))


def test_bf16_equals_plain_loop():
    net, _, _ = _run(mixed_precision="bf16")
    _assert_close(net, _reference(autocast=torch.bfloat16))


def test_fp16_grad_scaler_equals_loss_scaler_path():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net, _, _ = _run(grad_scaler=scaler)
    assert scaler.get_scale() == 2.0**10
    _assert_close(net, _reference(loss_scaler=LossScaler(init_scale=2.0**10)))


@pytest.mark.parametrize("kind", ["agnostic", "sam"])
def test_accumulate_2x16_equals_1x32(kind):
    # Old behaviour: opt.step(closure) inside accumulate() ran only on sync steps: half the
    # micro-batches were silently dropped.
    net, _, _ = _run(kind, micro=16, accum=2)
    _assert_close(net, _reference(kind))  # 1x32


def test_max_grad_norm_clips_the_final_gradient():
    net, _, _ = _run(max_grad_norm=0.05)
    clipped = _reference(max_grad_norm=0.05)
    _assert_close(net, clipped)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(clipped.state_dict().values(),
                                                          _reference().state_dict().values()))


def test_prepared_scheduler_steps_once_per_optimizer_step():
    net, opt, sch = _run(micro=16, accum=2, sched=True, steps=7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (7 // 3))
    _assert_close(net, _reference(micro_batches=2, sched=True, steps=7))


def test_direct_closure_step_while_accumulating_is_refused():
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    model, opt = acc.prepare(net, _opt("sam", net.parameters()))
    SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))
    x, y = _data(32)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    acc.gradient_state._set_sync_gradients(True)
    with pytest.raises(RuntimeError, match="call SharpnessStep"):
        opt.step(closure)


def test_outside_accumulate_is_refused():
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    model, opt = acc.prepare(net, _opt("sam", net.parameters()))
    step = SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))
    x, y = _data(32)
    step((x, y))
    with pytest.raises(RuntimeError, match="inside `with accelerator.accumulate"):
        step((x, y))


def test_backward_in_the_loop_is_refused():
    acc = Accelerator(cpu=True)
    net = _net()
    model, opt = acc.prepare(net, _opt("sam", net.parameters()))
    step = SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))
    x, y = _data(32)
    acc.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="runs forward and backward itself"):
        step((x, y))


def test_foreign_optimizer_is_refused():
    acc = Accelerator(cpu=True)
    net = _net()
    model, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="needs an agnostic_sam optimizer"):
        SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))


def test_a_second_helper_replaces_the_first_guard():
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    model, opt = acc.prepare(net, _opt("sam", net.parameters()))
    f = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    SharpnessStep(acc, model, opt, f)
    step = SharpnessStep(acc, model, opt, f)
    x, y = _data(32)
    for _ in range(2):
        with acc.accumulate(model):
            step((x, y))
    assert float(opt.optimizer.stats["skipped"]) == 0.0


# ---- DDP: 2 processes (gloo, CPU) under accelerate, accumulate() 2 micro-batches per rank ----

WORLD = 2


def _ddp_worker(rank: int, port: int, kind: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    model, opt = acc.prepare(net, _opt(kind, net.parameters()))
    step = SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))
    x, y = _data()
    shard = BATCH // WORLD
    for i in range(STEPS):
        lo = i * BATCH + rank * shard
        for k in range(2):  # two micro-batches of shard / 2 on each rank
            a, b = lo + k * shard // 2, lo + (k + 1) * shard // 2
            with acc.accumulate(model):
                step((x[a:b], y[a:b]))
    if rank == 0:
        torch.save({"state": net.state_dict(), "type": str(acc.distributed_type),
                    "ddp": type(model).__name__}, out)
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _ddp_reference(kind: str):
    """One process: every pass's gradient is the mean over the union of the ranks' parts (DDP
    averages equal-sized parts); each rank split its shard with the same generator draw."""
    net = _net()
    opt = _opt(kind, net.parameters())
    gen = torch.Generator().manual_seed(0)
    x, y = _data()
    f = lambda xb, yb: F.cross_entropy(net(xb), yb)  # noqa: E731
    shard = BATCH // WORLD
    for i in range(STEPS):
        xs = [x[i * BATCH + r * shard: i * BATCH + (r + 1) * shard] for r in range(WORLD)]
        ys = [y[i * BATCH + r * shard: i * BATCH + (r + 1) * shard] for r in range(WORLD)]
        if kind == "agnostic":
            perm = torch.randperm(shard, generator=gen)
            t, v = perm[:round(0.7 * shard)], perm[round(0.7 * shard):]
            x_t, y_t = torch.cat([a[t] for a in xs]), torch.cat([b[t] for b in ys])
            x_v, y_v = torch.cat([a[v] for a in xs]), torch.cat([b[v] for b in ys])
            opt.step(accumulate(f, (x_t, y_t), 1, opt.backward),
                     accumulate(f, (x_v, y_v), 1, opt.backward))
        else:
            opt.step(accumulate(f, (torch.cat(xs), torch.cat(ys)), 1, opt.backward))
    return net


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("kind", ["agnostic", "sam"])
def test_ddp_two_processes_equal_one_process(tmp_path, kind):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(port, kind, str(out)), nprocs=WORLD, join=True)
    saved = torch.load(out, weights_only=False)
    assert "MULTI_CPU" in saved["type"] and saved["ddp"] == "DistributedDataParallel"
    ref = _ddp_reference(kind)
    for (name, a), b in zip(saved["state"].items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
