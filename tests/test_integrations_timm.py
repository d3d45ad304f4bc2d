"""timm adapter: the registered names build the optimizers through create_optimizer_v2 with
timm's weight-decay groups; train_step equals the hand-written loop (fp32, bf16, GradScaler vs
LossScaler, 2x16 vs 1x32, clipping); timm's closure-less loop gets a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

timm = pytest.importorskip("timm")

from timm.optim import create_optimizer_v2  # noqa: E402

from agnostic_sam import SAM, AgnosticSAM, LossScaler, accumulate, split_batch  # noqa: E402
from agnostic_sam.integrations import timm as asam_timm  # noqa: E402
from agnostic_sam.methods import get_method  # noqa: E402

STEPS, BATCH, DIM = 20, 32, 6


def _data(n: int = STEPS * BATCH):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def _groups(net, wd):
    """timm's weight-decay groups: 1-d parameters (biases, norms) first, without decay."""
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    decay = [p for p in net.parameters() if p.ndim > 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def _loss(net, autocast=None):
    def f(b):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = net(b[0])
        return F.cross_entropy(logits.float(), b[1])
    return f


def _run(name="agnostic-sam", *, micro_batches=1, autocast=None, loss_scaler=None,
         max_grad_norm=None, **kw):
    net = _net()
    opt = asam_timm.create_optimizer(net, name, lr=0.1, weight_decay=5e-4, **kw)
    gen = torch.Generator().manual_seed(0)
    x, y = _data()
    for i in range(STEPS):
        batch = (x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
        asam_timm.train_step(opt, _loss(net, autocast), batch, generator=gen,
                             micro_batches=micro_batches,
                             loss_scaler=loss_scaler, max_grad_norm=max_grad_norm)
    return net, opt


def _reference(method=AgnosticSAM, base=torch.optim.SGD, *, autocast=None, loss_scaler=None,
               max_grad_norm=None, **kw):
    net = _net()
    if base is torch.optim.SGD:
        kw.setdefault("momentum", 0.9)
    opt = method(_groups(net, 5e-4), base, lr=0.1, loss_scaler=loss_scaler,
                 max_grad_norm=max_grad_norm, **kw)
    gen = torch.Generator().manual_seed(0)
    x, y = _data()
    f = _loss(net, autocast)
    g = lambda xb, yb: f((xb, yb))  # noqa: E731
    for i in range(STEPS):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        if isinstance(opt, AgnosticSAM):
            x_t, y_t, x_v, y_v = split_batch(xb, yb, 0.7, gen)
            opt.step(accumulate(g, (x_t, y_t), 1, opt.backward),
                     accumulate(g, (x_v, y_v), 1, opt.backward))
        else:
            opt.step(accumulate(g, (xb, yb), 1, opt.backward))
    return net


def _assert_close(net, ref, atol=1e-5):
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("name", asam_timm.NAMES)
def test_every_name_builds_through_create_optimizer_v2(name):
    # Old behaviour: not registered ("Optimizer ... not found in registry").
    asam_timm.register()
    net = _net()
    # model= reaches the optimizer (timm passes unknown keywords on): BatchNorm at theta, and
    # the parameter names the authors' ASAM needs
    opt = create_optimizer_v2(net, name, lr=0.1, weight_decay=5e-4, model=net)
    method = name.removesuffix("-adamw").removesuffix("-sgd")
    assert type(opt) is get_method(method).cls  # the registry's class for the name's method
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4]
    if name.endswith("adamw"):
        assert isinstance(opt.base_optimizer, torch.optim.AdamW)
    else:
        assert opt.param_groups[0]["momentum"] == 0.9
    if "simpler" in name:
        assert opt.variant == "simpler"


def test_names_are_the_registry_times_the_base_optimizers():
    from agnostic_sam.methods import BASE_OPTIMIZERS, list_methods

    methods = list_methods(lambda m: m.tune is not None and m.cls is not None)
    expected = {f"{m}-{b}" for m in methods for b in BASE_OPTIMIZERS}
    expected |= {m for m in methods if "-" in m}  # bare hyphenated names: over SGD
    assert set(asam_timm.names()) == expected  # now, with any method registered since import
    assert "sam" not in asam_timm.NAMES and {"sam-sgd", "agnostic-sam"} <= expected


@pytest.mark.parametrize("name,method,base,extra", [
    ("agnostic-sam", AgnosticSAM, torch.optim.SGD, {}),
    ("agnostic-sam-simpler-adamw", AgnosticSAM, torch.optim.AdamW, {"variant": "simpler"}),
    ("sam-sgd", SAM, torch.optim.SGD, {}),
])
def test_fp32_equals_plain_loop(name, method, base, extra):
    net, _ = _run(name)
    _assert_close(net, _reference(method, base, **extra))


def test_bf16_equals_plain_loop():
    net, _ = _run(autocast=torch.bfloat16)
    _assert_close(net, _reference(autocast=torch.bfloat16))


def test_grad_scaler_and_timm_native_scaler_equal_loss_scaler_path():
    from timm.utils import NativeScaler

    ref = _reference(loss_scaler=LossScaler(init_scale=2.0**10))
    net, _ = _run(loss_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    _assert_close(net, ref)
    native = NativeScaler(device="cpu")
    native._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net, _ = _run(loss_scaler=native)
    _assert_close(net, ref)


def test_micro_batches_2x16_equal_1x32():
    net, _ = _run(micro_batches=2)
    _assert_close(net, _reference())


def test_max_grad_norm_clips_the_final_gradient():
    net, _ = _run(max_grad_norm=0.05)
    _assert_close(net, _reference(max_grad_norm=0.05))
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(net.state_dict().values(),
                                                          _reference().state_dict().values()))


@pytest.mark.parametrize("name", ["agnostic-sam", "sam-sgd"])
def test_timm_loop_without_closure_is_a_one_line_error(name):
    from timm.utils import NativeScaler

    net = _net()
    opt = asam_timm.create_optimizer(net, name, lr=0.1)
    x, y = _data(32)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    with pytest.raises(TypeError, match=r"step\(closure") as info:
        opt.step()  # timm's train.py without AMP
    assert "\n" not in str(info.value)
    opt.zero_grad()
    with pytest.raises(TypeError, match="closure"):
        NativeScaler(device="cpu")(F.cross_entropy(net(x), y), opt)  # timm's train.py with AMP


def test_underscore_names_are_refused_with_the_right_name():
    with pytest.raises(ValueError, match="use 'agnostic-sam-adamw'"):
        asam_timm.create_optimizer(_net(), "agnostic_sam_adamw", lr=0.1)
    # timm's own parser: "agnostic_sam" looks up "sam", which is deliberately not registered.
    asam_timm.register()
    with pytest.raises(ValueError, match="not found"):
        create_optimizer_v2(_net(), "agnostic_sam", lr=0.1)


def test_batch_with_per_sample_non_tensors_is_refused():
    net = _net()
    opt = asam_timm.create_optimizer(net, "agnostic-sam", lr=0.1)
    x, y = _data(32)
    with pytest.raises(TypeError, match="keep only tensors"):
        asam_timm.train_step(opt, _loss(net), (x, y, ["a"] * 32))
