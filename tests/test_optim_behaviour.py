"""Closed forms, the torch.optim contract, BatchNorm, resume parity, errors and loss scaling."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from agnostic_sam import SAM, AgnosticSAM, LossScaler, split_batch, split_sizes

# ---- closed form on a quadratic ---------------------------------------------------------------

class Quadratic(nn.Module):
    """L(theta) = 0.5 theta^T A theta, gradient A theta; records where each pass ran."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.seen: list[torch.Tensor] = []

    def loss(self, a: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.theta.detach().clone())
        return 0.5 * self.theta @ a @ self.theta


def quad_closure(q: Quadratic, a: torch.Tensor):
    def run():
        loss = q.loss(a)
        loss.backward()
        return loss

    return run


def spd(seed: int, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["full", "simpler"])
def test_quadratic_closed_form(variant: str) -> None:
    at, av = spd(0), spd(1)
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    q = Quadratic(theta)
    rho1, rho2, lr = 0.3, 0.2, 0.01
    opt = AgnosticSAM(q.parameters(), torch.optim.SGD, rho1=rho1, rho2=rho2, variant=variant, lr=lr)
    opt.step(quad_closure(q, at), quad_closure(q, av))

    unit = lambda v: v / v.norm()  # noqa: E731
    theta_v = theta + rho2 * unit(av @ theta)
    gv = av @ theta_v if variant == "full" else av @ theta
    theta_t = theta + rho1 * unit(at @ theta) - rho2 * unit(gv)
    expected_seen = (
        [theta, theta_v, theta, theta_t] if variant == "full" else [theta, theta, theta_t]
    )
    assert len(q.seen) == len(expected_seen)
    for got, want in zip(q.seen, expected_seen):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Each perturbation term has norm rho (up to eps).
    assert abs((theta_v - theta).norm().item() - rho2) < 1e-12
    torch.testing.assert_close(q.theta.detach(), theta - lr * (at @ theta_t), rtol=0, atol=1e-12)


def test_sam_perturbation_has_norm_rho() -> None:
    a = spd(3)
    theta = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.3], dtype=torch.float64)
    q = Quadratic(theta)
    opt = SAM(q.parameters(), torch.optim.SGD, rho=0.07, lr=0.0)
    opt.step(quad_closure(q, a))
    assert abs((q.seen[1] - q.seen[0]).norm().item() - 0.07) < 1e-12
    assert torch.equal(q.theta.detach(), theta)  # lr=0: restore is bit-exact


@pytest.mark.parametrize("variant", ["full", "simpler"])
def test_restore_is_bit_exact(variant: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = AgnosticSAM(
        model.parameters(), torch.optim.SGD, rho1=0.37, rho2=0.11, variant=variant, lr=0.0
    )
    x, y = torch.randn(10, 7), torch.randint(0, 3, (10,))
    xt, yt, xv, yv = split_batch(x, y, 0.7, torch.Generator().manual_seed(0))
    opt.step(ce_closure(model, xt, yt), ce_closure(model, xv, yv))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---- rho = 0 is the base optimizer --------------------------------------------------------------

def ce_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt=None):
    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        (opt.backward(loss) if opt is not None else loss.backward())
        return loss

    return run


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (torch.optim.AdamW, dict(lr=1e-2)),
    ],
    ids=["sgd", "adamw"],
)
@pytest.mark.parametrize("which", ["full", "simpler", "sam"])
def test_rho_zero_equals_base_optimizer(base, kwargs, which: str) -> None:
    ref_model, model = mlp(), mlp()
    ref_opt = base(ref_model.parameters(), **kwargs)
    if which == "sam":
        opt = SAM(model.parameters(), base, rho=0.0, **kwargs)
    else:
        opt = AgnosticSAM(model.parameters(), base, rho1=0.0, rho2=0.0, variant=which, **kwargs)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        x, y = (torch.randn(16, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (16,), generator=g))
        xt, yt = x[:11], y[:11]
        ref_opt.zero_grad()
        ce_closure(ref_model, xt if which != "sam" else x, yt if which != "sam" else y)()
        ref_opt.step()
        if which == "sam":
            opt.step(ce_closure(model, x, y))
        else:
            opt.step(ce_closure(model, xt, yt), ce_closure(model, x[11:], y[11:]))
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ---- the torch.optim contract --------------------------------------------------------------------

def test_param_groups_shared_and_scheduler_drives_base_lr() -> None:
    model = mlp()
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.4, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    for _ in range(2):
        opt.step(ce_closure(model, x[:7], y[:7]), ce_closure(model, x[7:], y[7:]))
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * 0.5)
    # rho is schedulable like lr: it lives in the group.
    opt.param_groups[0]["rho1"] = 0.0
    assert opt.base_optimizer.param_groups[0]["rho1"] == 0.0


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("which", ["agnostic", "sam"])
def test_resume_parity_in_lockstep(base, which: str, tmp_path) -> None:
    kwargs = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=0.01)

    def build(model):
        if which == "sam":
            return SAM(model.parameters(), base, rho=0.1, model=model, **kwargs)
        return AgnosticSAM(model.parameters(), base, rho1=0.2, rho2=0.1, model=model, **kwargs)

    def do_step(model, opt, x, y):
        if which == "sam":
            opt.step(ce_closure(model, x, y))
        else:
            opt.step(ce_closure(model, x[:9], y[:9]), ce_closure(model, x[9:], y[9:]))

    model = mlp()
    opt = build(model)
    data = [(torch.randn(13, 5, dtype=torch.float64), torch.randint(0, 3, (13,))) for _ in range(8)]
    for x, y in data[:4]:
        do_step(model, opt, x, y)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    state = opt.state_dict()["state"]
    assert state and all(state[i] for i in state), (
        "base optimizer state (momentum/moments) must be saved"
    )

    model2 = mlp(seed=123)
    opt2 = build(model2)
    ckpt = torch.load(path)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for x, y in data[4:]:
        do_step(model, opt, x, y)
        do_step(model2, opt2, x, y)
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))


# ---- BatchNorm statistics ------------------------------------------------------------------------

def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("which", ["full", "simpler", "sam"])
def test_batchnorm_stats_only_from_theta_passes(which: str) -> None:
    model = bn_model()
    ref = copy.deepcopy(model)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    xt, yt, xv, yv = x[:14], y[:14], x[14:], y[14:]
    if which == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
        opt.step(ce_closure(model, x, y))
        ref(x)  # the one pass at theta
    else:
        opt = AgnosticSAM(
            model.parameters(), torch.optim.SGD, rho1=0.5, rho2=0.3, variant=which, lr=0.1,
            model=model,
        )
        opt.step(ce_closure(model, xt, yt), ce_closure(model, xv, yv))
        ref(xv)  # B^v at theta, then B^t at theta
        ref(xt)
    got, want = bn_buffers(model), bn_buffers(ref)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert int(got["1.num_batches_tracked"]) == (1 if which == "sam" else 2)
    assert model[1].track_running_stats is True


def test_without_model_every_pass_updates_batchnorm() -> None:
    model = bn_model()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(ce_closure(model, x[:14], y[:14]), ce_closure(model, x[14:], y[14:]))
    assert int(model[1].num_batches_tracked) == 4  # documented: all four passes


def test_batchnorm_settings_restored_when_closure_raises() -> None:
    model = bn_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    x = torch.randn(6, 4)
    calls = {"n": 0}

    def failing_val():
        calls["n"] += 1
        loss = model(x).sum()
        loss.backward()
        if calls["n"] == 2:  # inside the perturbed pass, BN frozen
            assert model[1].track_running_stats is False
            raise RuntimeError("boom")
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(ce_closure(model, x, torch.zeros(6, dtype=torch.long)), failing_val)
    assert model[1].track_running_stats is True
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # back at theta


# ---- zero gradients, non-finite gradients, bad input ---------------------------------------------

@pytest.mark.parametrize("which", ["full", "simpler", "sam"])
def test_zero_gradient_gives_no_nan(which: str) -> None:
    model = mlp()
    zero = lambda: (sum(p.sum() for p in model.parameters()) * 0.0).backward() or torch.zeros(())  # noqa: E731
    if which == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        opt.step(zero)
    else:
        opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1, variant=which)
        opt.step(zero, zero)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in opt.stats.values())


@pytest.mark.parametrize("bad_pass", [0, 1, 2, 3])
def test_nonfinite_gradient_raises_naming_the_pass(bad_pass: int) -> None:
    model = mlp()
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    opt.step(ce_closure(model, x[:7], y[:7]), ce_closure(model, x[7:], y[7:]))  # build momentum
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    calls = {"n": 0}

    def maybe_nan(xs, ys):
        def run():
            k = calls["n"]
            calls["n"] += 1
            loss = nn.functional.cross_entropy(model(xs), ys)
            if k == bad_pass:
                loss = loss * float("nan")
            loss.backward()
            return loss

        return run

    names = ["B^v at theta", "B^v at theta^v", "B^t at theta", "B^t at theta^t"]
    with pytest.raises(FloatingPointError, match=names[bad_pass].replace("^", r"\^")):
        opt.step(maybe_nan(x[:7], y[:7]), maybe_nan(x[7:], y[7:]))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    after = opt.state_dict()
    for k, v in state_before["state"].items():
        assert torch.equal(v["momentum_buffer"], after["state"][k]["momentum_buffer"])


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda p: AgnosticSAM(p, rho1=-0.1), "rho1=-0.1"),
        (lambda p: AgnosticSAM(p, rho2=-1), "rho2=-1"),
        (lambda p: AgnosticSAM(p, perturb_eps=0.0), "eps=0.0"),
        (lambda p: AgnosticSAM(p, variant="fancy"), "variant='fancy'"),
        (lambda p: AgnosticSAM(p, perturbation="global"), "perturbation='global'"),
        (lambda p: SAM(p, rho=-0.05), "rho=-0.05"),
        (lambda p: SAM(p, perturb_eps=-1.0), "eps=-1.0"),
        (lambda p: AgnosticSAM([{"params": p, "rho1": -2.0}]), "rho1=-2.0"),
    ],
)
def test_bad_arguments_raise_value_error(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        factory(list(mlp().parameters()))


def test_missing_closures_raise_type_error() -> None:
    params = list(mlp().parameters())
    with pytest.raises(TypeError, match="two closures"):
        AgnosticSAM(params, lr=0.1).step()
    with pytest.raises(TypeError, match="two closures"):
        AgnosticSAM(params, lr=0.1).step(lambda: torch.zeros(()))
    with pytest.raises(TypeError, match="closure"):
        SAM(params, lr=0.1).step()
    with pytest.raises(TypeError, match="Optimizer class"):
        SAM(params, base_optimizer=torch.optim.SGD(params, lr=0.1))


def test_split_batch_sizes_and_errors() -> None:
    x, y = torch.arange(64).float().unsqueeze(1), torch.arange(64)
    xt, yt, xv, yv = split_batch(x, y, 0.7, torch.Generator().manual_seed(0))
    assert len(xt) == round(0.7 * 64) == 45 and len(xv) == 19
    assert sorted(torch.cat([yt, yv]).tolist()) == list(range(64))
    assert torch.equal(xt.squeeze(1).long(), yt)
    again = split_batch(x, y, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], yt)
    for ratio in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="split ratio"):
            split_batch(x, y, ratio)
    with pytest.raises(ValueError, match="too small to split"):
        split_batch(x[:1], y[:1], 0.7)
    assert split_sizes(2, 0.7) == (1, 1)


def test_stats_are_device_tensors() -> None:
    model = mlp()
    opt = AgnosticSAM(model.parameters(), lr=0.1, check_finite=False)
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    loss = opt.step(ce_closure(model, x[:7], y[:7]), ce_closure(model, x[7:], y[7:]))
    assert set(opt.stats) == {
        "loss_train", "loss_val", "grad_norm_train", "grad_norm_val", "cos_train_val", "skipped"
    }
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in opt.stats.values())
    assert -1.0 <= float(opt.stats["cos_train_val"]) <= 1.0
    assert not loss.requires_grad and torch.equal(loss, opt.stats["loss_train"])
    assert opt.buffer_bytes() == 2 * sum(p.numel() * 8 for p in model.parameters())


# ---- float16 loss scaling ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["full", "sam"])
def test_loss_scaling_overflow_skips_step_and_lowers_scale(which: str) -> None:
    model = mlp().float()
    scaler = LossScaler(init_scale=1024.0)
    if which == "sam":
        opt = SAM(model.parameters(), lr=0.1, momentum=0.9, loss_scaler=scaler)
    else:
        opt = AgnosticSAM(model.parameters(), lr=0.1, momentum=0.9, loss_scaler=scaler)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))

    def step(overflow: bool):
        def run(xs, ys):
            def c():
                loss = nn.functional.cross_entropy(model(xs), ys)
                opt.backward(loss * (float("inf") if overflow else 1.0))
                return loss
            return c
        if which == "sam":
            opt.step(run(x, y))
        else:
            opt.step(run(x[:7], y[:7]), run(x[7:], y[7:]))

    step(False)
    assert float(opt.stats["skipped"]) == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    step(True)
    assert float(opt.stats["skipped"]) == 1.0
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], opt.state_dict()["state"][k]["momentum_buffer"])


def test_loss_scaling_matches_unscaled_step() -> None:
    ref, model = mlp().float(), mlp().float()
    ref_opt = AgnosticSAM(ref.parameters(), lr=0.1, momentum=0.9, rho1=0.2, rho2=0.1)
    opt = AgnosticSAM(model.parameters(), lr=0.1, momentum=0.9, rho1=0.2, rho2=0.1,
                      loss_scaler=LossScaler(init_scale=2.0**12, growth_interval=2))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
        ref_opt.step(ce_closure(ref, x[:7], y[:7], ref_opt), ce_closure(ref, x[7:], y[7:], ref_opt))
        opt.step(ce_closure(model, x[:7], y[:7], opt), ce_closure(model, x[7:], y[7:], opt))
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.loss_scaler.get_scale() == 2.0**14  # grew twice over 5 clean steps (interval 2)


@pytest.mark.parametrize("which", ["full", "simpler", "sam"])
def test_parameters_without_gradient_are_left_untouched(which: str) -> None:
    """A parameter no closure uses gets no gradient: it is neither perturbed nor counted in the
    norm."""
    model = mlp()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    seen: list[torch.Tensor] = []

    def closure(x, y):
        def run():
            seen.append(unused.detach().clone())
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return run

    params = [*model.parameters(), unused]
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    if which == "sam":
        SAM(params, lr=0.1, rho=0.5).step(closure(x, y))
    else:
        AgnosticSAM(params, lr=0.1, rho1=0.5, rho2=0.5, variant=which).step(
            closure(x[:7], y[:7]), closure(x[7:], y[7:]))
    assert all(torch.equal(s, torch.ones(3, dtype=torch.float64)) for s in seen)
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64)) and unused.grad is None
