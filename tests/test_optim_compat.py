"""Set-ups that used to be silently wrong: each now equals the plain loop or raises one line.

GradScaler through `scaler.step`, loss-scaler misuse, gradients present at step entry, keywords
reaching the base optimizer, davda54/sam ports, accumulation, clipping, Plain, `at_theta`,
state dicts and bad inputs. Tiny float64/float32 MLPs on the CPU; a few seconds in all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agnostic_sam import SAM, AgnosticSAM, LossScaler, Plain, accumulate

STEPS = 20
# torch 2.14's GradScaler warns (once) that its grad_scaler= keyword protocol will change.
pytestmark = pytest.mark.filterwarnings("ignore:GradScaler is going to stop")


def mlp(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def data(n_steps: int = STEPS, n: int = 32, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_steps)]


def closure(model, x, y, backward=None):
    def run():
        loss = F.cross_entropy(model(x), y)
        (backward or Tensor.backward)(loss)
        return loss

    return run


def build(kind: str, net: nn.Module, **kw):
    common = dict(lr=0.1, momentum=0.9)
    common.update(kw)
    if kind == "plain":
        return Plain(net.parameters(), torch.optim.SGD, **common)
    if kind == "sam":
        return SAM(net.parameters(), torch.optim.SGD, rho=0.3, **common)
    return AgnosticSAM(
        net.parameters(), torch.optim.SGD, rho1=0.3, rho2=0.1, variant=kind, **common
    )


def do_step(kind, opt, model, x, y, backward=None, step=None):
    step = step or opt.step
    if kind in ("plain", "sam"):
        return step(closure(model, x, y, backward))
    return step(closure(model, x[:22], y[:22], backward), closure(model, x[22:], y[22:], backward))


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def worst(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


KINDS = ["plain", "sam", "full", "simpler"]

# ---- 3. torch.amp.GradScaler the standard way ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_step_equals_loss_scaler_path(kind: str) -> None:
    """scaler.step(opt, closure[, val_closure]) + scaler.update() == loss_scaler=LossScaler(),
    including an overflowing step (skipped, scale lowered once) and scale growth."""
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt = build(kind, ref, loss_scaler=LossScaler(init_scale=2.0**10, growth_interval=3))
    opt = build(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scaler.scale(torch.zeros(()))  # GradScaler creates its scale on first use; step checks it
    batches = data(STEPS, dtype=torch.float32)
    for i, (x, y) in enumerate(batches):
        bad = 1.0 if i != 7 else float("inf")
        do_step(kind, ref_opt, ref, x, y, lambda loss, bad=bad: ref_opt.backward(loss * bad))
        do_step(kind, opt, model, x, y, lambda loss, bad=bad: scaler.scale(loss * bad).backward(),
                step=lambda *c: scaler.step(opt, *c))
        scaler.update()
        assert torch.equal(opt.stats["skipped"], ref_opt.stats["skipped"])
        assert scaler.get_scale() == ref_opt.loss_scaler.get_scale(), i
    assert same(ref, model)  # bit for bit
    assert ref_opt.loss_scaler.get_scale() < 2.0**10 * 2**6  # one backoff happened


def test_grad_scaler_equals_loss_scaler_under_float16_autocast_with_real_overflows() -> None:
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt = build("full", ref, loss_scaler=LossScaler())
    opt = build("full", model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))

    def c(net, x, y, backward):
        def run():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x).float(), y)
            backward(loss)
            return loss
        return run

    skipped = 0.0
    for x, y in data(STEPS, dtype=torch.float32):
        x = x * 100  # large logits: float16 overflows at the initial scale 2**16
        ref_opt.step(c(ref, x[:22], y[:22], ref_opt.backward),
                     c(ref, x[22:], y[22:], ref_opt.backward))
        scaler.step(opt, c(model, x[:22], y[:22], lambda loss: scaler.scale(loss).backward()),
                    c(model, x[22:], y[22:], lambda loss: scaler.scale(loss).backward()))
        scaler.update()
        assert torch.equal(opt.stats["skipped"], ref_opt.stats["skipped"])
        skipped += float(opt.stats["skipped"])
    assert skipped >= 1 and scaler.get_scale() == ref_opt.loss_scaler.get_scale()
    assert same(ref, model)


@pytest.mark.parametrize(
    ("kind", "bad_pass"), [("sam", 0), ("full", 0), ("full", 1), ("simpler", 2)]
)
def test_grad_scaler_overflow_in_one_early_pass_skips_and_backs_off_once(
    kind: str, bad_pass: int
) -> None:
    model = mlp(torch.float32)
    opt = build(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.zeros(()))
    calls = {"n": 0}

    def backward(loss):
        factor = float("inf") if calls["n"] == bad_pass else 1.0
        calls["n"] += 1
        scaler.scale(loss * factor).backward()

    x, y = data(1, dtype=torch.float32)[0]
    before = copy.deepcopy(model)
    do_step(kind, opt, model, x, y, backward, step=lambda *c: scaler.step(opt, *c))
    scaler.update()
    assert float(opt.stats["skipped"]) == 1.0 and scaler.get_scale() == 2.0**9
    assert same(before, model)


def test_grad_scaler_plain_equals_torch_sgd_with_grad_scaler() -> None:
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = Plain(model.parameters(), lr=0.1, momentum=0.9)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s2.scale(torch.zeros(()))
    for x, y in data(8, dtype=torch.float32):
        ref_opt.zero_grad()
        s1.scale(F.cross_entropy(ref(x), y)).backward()
        s1.step(ref_opt)
        s1.update()
        s2.step(opt, closure(model, x, y, lambda loss: s2.scale(loss).backward()))
        s2.update()
    assert same(ref, model) and s1.get_scale() == s2.get_scale() == 2.0**12


def test_grad_scaler_davda54_backward_then_step() -> None:
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt, opt = build("sam", ref), build("sam", model)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s1.scale(torch.zeros(()))
    for x, y in data(6, dtype=torch.float32):
        s1.step(ref_opt, closure(ref, x, y, lambda loss: s1.scale(loss).backward()))
        s1.update()
        s2.scale(F.cross_entropy(model(x), y)).backward()
        s2.step(opt, closure(model, x, y, lambda loss: s2.scale(loss).backward()))
        s2.update()
    assert same(ref, model) and s1.get_scale() == s2.get_scale()


def test_grad_scaler_through_a_wrapper_hiding_the_keyword_works() -> None:
    """accelerate's fp16 AcceleratedOptimizer replaces opt.step by a (*args, **kwargs) wrapper:
    GradScaler then takes its attribute protocol (grad_scale / found_inf), and the step finds the
    scaler that drives it. Same weights and scale as scaler.step on the optimizer itself."""
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt, opt = build("sam", ref), build("sam", model)
    inner = opt.step
    opt.step = lambda *args, **kwargs: inner(*args, **kwargs)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    for s in (s1, s2):
        s.scale(torch.zeros(()))
    for x, y in data(6, dtype=torch.float32):
        s1.step(ref_opt, closure(ref, x, y, lambda loss: s1.scale(loss).backward()))
        s1.update()
        s2.step(opt, closure(model, x, y, lambda loss: s2.scale(loss).backward()))
        s2.update()
    assert same(ref, model) and s1.get_scale() == s2.get_scale()
    assert not hasattr(opt, "grad_scale")


def test_grad_scale_attribute_without_a_driving_scaler_raises() -> None:
    model = mlp(torch.float32)
    opt = build("sam", model)
    opt.grad_scale = torch.ones(())  # set by hand: no scaler.step(opt, ...) drives the step
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="no scaler.step"):
        opt.step(closure(model, *data(1, dtype=torch.float32)[0]))
    assert same(before, model)
    assert not hasattr(opt, "grad_scale")  # a direct step afterwards works
    opt.step(closure(model, *data(1, dtype=torch.float32)[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaled_closure_stepped_directly_raises(kind: str) -> None:
    """Closures call scaler.scale(loss).backward() but opt.step(...) is called, not scaler.step."""
    model = mlp(torch.float32)
    opt = build(kind, model)
    scaler = torch.amp.GradScaler("cpu")
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match=r"call scaler\.step\(opt, closure\)"):
        do_step(kind, opt, model, *data(1, dtype=torch.float32)[0],
                lambda loss: scaler.scale(loss).backward())
    assert same(before, model)


def test_grad_scaler_step_with_unscaled_closure_raises() -> None:
    model = mlp(torch.float32)
    opt = build("full", model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match=r"call scaler\.scale\(loss\)\.backward\(\)"):
        do_step("full", opt, model, *data(1, dtype=torch.float32)[0],
                step=lambda *c: scaler.step(opt, *c))
    assert same(before, model)


def test_grad_scaler_misuse_in_the_train_closure_only_raises() -> None:
    model = mlp(torch.float32)
    opt = build("full", model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data(1, dtype=torch.float32)[0]
    with pytest.raises(RuntimeError, match=r"call scaler\.step\(opt, closure\)"):
        opt.step(closure(model, x[:22], y[:22], lambda loss: scaler.scale(loss).backward()),
                 closure(model, x[22:], y[22:]))


def test_disabled_grad_scaler_is_the_fp32_step() -> None:
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt, opt = build("sam", ref), build("sam", model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for x, y in data(3, dtype=torch.float32):
        do_step("sam", ref_opt, ref, x, y)
        scaler.step(opt, closure(model, x, y, lambda loss: scaler.scale(loss).backward()))
        scaler.update()
    assert same(ref, model)


def test_grad_scaler_unscale_before_step_raises() -> None:
    model = mlp(torch.float32)
    opt = build("sam", model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"scaler\.unscale_\(opt\) was called before"):
        scaler.step(opt, closure(model, *data(1, dtype=torch.float32)[0],
                                 lambda loss: scaler.scale(loss).backward()))


def test_grad_scaler_with_loss_scaler_raises() -> None:
    model = mlp(torch.float32)
    opt = build("sam", model, loss_scaler=LossScaler())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="use one of them"):
        scaler.step(opt, closure(model, *data(1, dtype=torch.float32)[0], opt.backward))


@pytest.mark.parametrize("kind", KINDS)
def test_loss_scaler_with_plain_backward_raises(kind: str) -> None:
    model = mlp(torch.float32)
    opt = build(kind, model, loss_scaler=LossScaler())
    before = copy.deepcopy(model)
    x, y = data(1, dtype=torch.float32)[0]
    with pytest.raises(
        RuntimeError, match=r"call opt\.backward\(loss\) instead of loss\.backward\(\)"
    ):
        do_step(kind, opt, model, x, y)  # closures call loss.backward()
    assert same(before, model)


# ---- 4. gradients present at step entry --------------------------------------------------------


def test_sam_accumulated_gradients_raise() -> None:
    model = mlp()
    opt = build("sam", model)
    (x, y), (x2, y2) = data(2)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x2), y2).backward()  # accumulate_grad_batches=2 style
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="accumulate micro-batches inside the closure"):
        opt.step(closure(model, x2, y2))
    assert same(before, model)


@pytest.mark.parametrize("variant", ["full", "simpler"])
def test_agnostic_present_gradients_raise(variant: str) -> None:
    model = mlp()
    opt = build(variant, model)
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="gradients already in p.grad"):
        do_step(variant, opt, model, x, y)


def test_plain_keeps_accumulated_gradients_like_torch_optim() -> None:
    """Lightning/accelerate accumulation: backward on K-1 micro-batches, then step(closure)."""
    ref, model = mlp(), mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = Plain(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data(6):
        ref_opt.zero_grad()
        for m, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):
            (F.cross_entropy(ref(xm), ym) / 2).backward()
            if m == 0:
                (F.cross_entropy(model(xm), ym) / 2).backward()
        ref_opt.step()
        opt.step(closure(model, x[16:], y[16:], lambda loss: (loss / 2).backward()))
    assert same(ref, model)


@pytest.mark.parametrize("kind", KINDS)
def test_own_gradients_never_count_as_present(kind: str) -> None:
    """The library loop: step after step without zero_grad; p.grad is empty after each."""
    model = mlp()
    opt = build(kind, model)
    for x, y in data(3):
        do_step(kind, opt, model, x, y)
        assert all(p.grad is None for p in model.parameters())


def test_zero_grad_keeping_zeros_is_not_present() -> None:
    ref, model = mlp(), mlp()
    ref_opt, opt = build("sam", ref), build("sam", model)
    for x, y in data(3):
        do_step("sam", ref_opt, ref, x, y)
        F.cross_entropy(model(x), y).backward()
        opt.zero_grad(set_to_none=False)
        do_step("sam", opt, model, x, y)
    assert same(ref, model)


def test_gradients_set_by_hand_raise() -> None:
    model = mlp()
    opt = build("sam", model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="no backward pass since its last step produced"):
        opt.step(closure(model, *data(1)[0]))


# ---- 1. keywords reach the base optimizer -------------------------------------------------------


@pytest.mark.parametrize("which", ["sam", "agnostic", "plain"])
def test_eps_and_foreach_reach_the_base_optimizer(which: str) -> None:
    ref, model = mlp(), mlp()
    kw = dict(lr=1e-2, eps=1e-3, foreach=False, betas=(0.8, 0.9))
    ref_opt = torch.optim.AdamW(ref.parameters(), **kw)
    if which == "sam":
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.0, **kw)
    elif which == "agnostic":
        opt = AgnosticSAM(model.parameters(), torch.optim.AdamW, rho1=0.0, rho2=0.0, **kw)
    else:
        opt = Plain(model.parameters(), torch.optim.AdamW, **kw)
    assert (opt.base_optimizer.defaults["eps"] == 1e-3
            and opt.base_optimizer.defaults["foreach"] is False)
    for x, y in data(5):
        ref_opt.zero_grad()
        closure(ref, x[:22], y[:22])()
        ref_opt.step()
        if which == "agnostic":
            opt.step(closure(model, x[:22], y[:22]), closure(model, x[22:], y[22:]))
        else:
            opt.step(closure(model, x[:22], y[:22]))
    assert same(ref, model)


def test_perturb_eps_is_the_wrappers_epsilon() -> None:
    q = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    seen = []

    def run():
        seen.append(q.detach().clone())
        loss = 0.5 * (q * q).sum()
        loss.backward()
        return loss

    SAM([q], rho=1.0, perturb_eps=5.0, lr=0.0).step(run)
    # g/(5+5)
    torch.testing.assert_close(seen[1] - seen[0], torch.tensor([0.3, 0.4], dtype=torch.float64))


# ---- 2. the standard closure keyword ------------------------------------------------------------


def test_closure_keywords() -> None:
    ref, model = mlp(), mlp()
    ref_opt, opt = build("full", ref), build("full", model)
    for x, y in data(3):
        do_step("full", ref_opt, ref, x, y)
        opt.step(closure=closure(model, x[:22], y[:22]), val_closure=closure(model, x[22:], y[22:]))
    assert same(ref, model)
    for kind in ("sam", "plain"):
        a, b = mlp(), mlp()
        oa, ob = build(kind, a), build(kind, b)
        for x, y in data(3):
            oa.step(closure(a, x, y))
            ob.step(closure=closure(b, x, y))
        assert same(a, b)


def test_missing_closure_errors_name_the_call() -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"AgnosticSAM\.step\(closure, val_closure\)"):
        build("full", model).step(closure(model, *data(1)[0]))
    with pytest.raises(TypeError, match=r"Plain\.step\(closure\)"):
        build("plain", model).step()
    with pytest.raises(TypeError, match=r"scaler\.step\(opt, closure\)"):
        build("sam", model).step()


# ---- 6. davda54/sam ports ------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_davda54_backward_then_step_closure_takes_two_passes(adaptive: bool) -> None:
    ref, model = bn_mlp(), bn_mlp()
    ref_opt = build("sam", ref, model=ref, adaptive=adaptive)
    opt = build("sam", model, model=model, adaptive=adaptive)
    calls = {"n": 0}
    for x, y in data(6):
        do_step("sam", ref_opt, ref, x, y)
        loss = F.cross_entropy(model(x), y)
        loss.backward()

        def c(x=x, y=y):
            calls["n"] += 1
            return closure(model, x, y)()

        opt.step(c)
        opt.zero_grad()
    assert calls["n"] == 6  # one closure pass per step: 2 passes, not 3
    assert same(ref, model)
    assert all(torch.equal(a, b) for a, b in zip(ref.buffers(), model.buffers()))


@pytest.mark.parametrize("zero_grad", [False, True])
def test_davda54_first_and_second_step_equal_step_closure(zero_grad: bool) -> None:
    ref, model = bn_mlp(), bn_mlp()
    ref_opt = build("sam", ref, model=ref)
    opt = build("sam", model, model=model)
    for x, y in data(6):
        do_step("sam", ref_opt, ref, x, y)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=zero_grad)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=zero_grad)
    assert same(ref, model)
    assert all(torch.equal(a, b) for a, b in zip(ref.buffers(), model.buffers()))
    assert torch.equal(opt.stats["grad_norm_train"], ref_opt.stats["grad_norm_train"])


def test_davda54_phase_misuse_raises() -> None:
    model = mlp()
    opt = build("sam", model)
    with pytest.raises(RuntimeError, match="needs g\\(theta\\) in p.grad"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="call second_step"):
        opt.step(closure(model, x, y))


# ---- 5. accumulation inside the closure ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_accumulate_2x16_equals_1x32(kind: str) -> None:
    ref, model = mlp(), mlp()
    ref_opt, opt = build(kind, ref), build(kind, model)
    f = lambda x, y: F.cross_entropy(model(x), y)  # noqa: E731
    for x, y in data(STEPS):
        do_step(kind, ref_opt, ref, x, y)
        if kind in ("plain", "sam"):
            loss = opt.step(accumulate(f, (x, y), 2, opt.backward))
        else:
            loss = opt.step(accumulate(f, (x[:22], y[:22]), 2, opt.backward),
                            accumulate(f, (x[22:], y[22:]), 2, opt.backward))
        torch.testing.assert_close(loss, ref_opt.stats["loss_train"], rtol=0, atol=1e-12)
    assert worst(ref, model) <= 1e-10


def test_accumulate_rejects_bad_input() -> None:
    f = lambda x: x.sum()  # noqa: E731
    with pytest.raises(ValueError, match="micro_batches=0"):
        accumulate(f, (torch.ones(4),), 0, lambda loss: None)
    with pytest.raises(ValueError, match="more than the 4 samples"):
        accumulate(f, (torch.ones(4),), 5, lambda loss: None)


# ---- 8. max_grad_norm clips the final gradient ---------------------------------------------------


def test_max_grad_norm_sam_equals_hand_written_loop() -> None:
    ref, model = mlp(), mlp()
    rho, max_norm = 0.3, 0.05
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = build("sam", model, max_grad_norm=max_norm, perturb_foreach=False)
    for x, y in data(10):
        params = list(ref.parameters())
        theta = [p.detach().clone() for p in params]
        base.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            for p in params:
                p.add_(p.grad * (rho / (norm + 1e-12)))
        base.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)  # the final gradient
        base.step()
        opt.step(closure(model, x, y))
    assert worst(ref, model) <= 1e-12
    unclipped = mlp()
    uopt = build("sam", unclipped)
    for x, y in data(10):
        uopt.step(closure(unclipped, x, y))
    assert worst(unclipped, model) > 1e-3  # the clipping was active


@pytest.mark.parametrize("kind", ["plain", "full"])
def test_max_grad_norm_plain_and_rho_zero_equal_sgd_with_clip(kind: str) -> None:
    ref, model = mlp(), mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    if kind == "plain":
        opt = Plain(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.05)
    else:
        opt = AgnosticSAM(
            model.parameters(), rho1=0.0, rho2=0.0, lr=0.1, momentum=0.9, max_grad_norm=0.05
        )
    for x, y in data(8):
        ref_opt.zero_grad()
        closure(ref, x[:22], y[:22])()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        if kind == "plain":
            opt.step(closure(model, x[:22], y[:22]))
        else:
            opt.step(closure(model, x[:22], y[:22]), closure(model, x[22:], y[22:]))
    assert same(ref, model)


# ---- 9. Plain ------------------------------------------------------------------------------------


def test_plain_equals_zero_grad_closure_base_step_float32() -> None:
    ref, model = mlp(torch.float32), mlp(torch.float32)
    ref_opt = torch.optim.SGD(
        ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True
    )
    opt = Plain(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for x, y in data(STEPS, dtype=torch.float32):
        ref_opt.zero_grad()
        ref_loss = closure(ref, x, y)()
        ref_opt.step()
        loss = opt.step(closure(model, x, y))
        assert torch.equal(loss, ref_loss.detach())
    assert same(ref, model)
    assert set(opt.stats) == {"loss_train", "grad_norm_train", "skipped"}
    assert opt.buffer_bytes() == 0


def test_plain_loss_scaler_skips_overflow() -> None:
    model = mlp(torch.float32)
    opt = Plain(model.parameters(), lr=0.1, momentum=0.9, loss_scaler=LossScaler(init_scale=8.0))
    x, y = data(1, dtype=torch.float32)[0]
    opt.step(closure(model, x, y, opt.backward))
    before = copy.deepcopy(model)
    opt.step(closure(model, x, y, lambda loss: opt.backward(loss * float("inf"))))
    assert float(opt.stats["skipped"]) == 1.0 and opt.loss_scaler.get_scale() == 4.0
    assert same(before, model)


# ---- 10. at_theta --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [
    ("plain", [True]), ("sam", [True, False]),
    ("full", [True, False, True, False]), ("simpler", [True, True, False]),
])
def test_at_theta_is_true_exactly_in_passes_at_theta(kind: str, expected: list[bool]) -> None:
    model = mlp()
    opt = build(kind, model)
    seen: list[bool] = []

    def c(x, y):
        def run():
            seen.append(opt.at_theta)
            return closure(model, x, y)()
        return run

    x, y = data(1)[0]
    assert opt.at_theta is False
    if kind in ("plain", "sam"):
        opt.step(c(x, y))
    else:
        opt.step(c(x[:22], y[:22]), c(x[22:], y[22:]))
    assert seen == expected and opt.at_theta is False


# ---- 7. state dicts ------------------------------------------------------------------------------


def test_loss_scaler_state_travels_in_state_dict() -> None:
    model = mlp(torch.float32)
    opt = build("sam", model, loss_scaler=LossScaler(init_scale=2.0**10, growth_interval=1))
    for x, y in data(3, dtype=torch.float32):
        do_step("sam", opt, model, x, y, opt.backward)
    state = opt.state_dict()
    assert state["loss_scaler"]["scale"] == 2.0**13
    model2 = mlp(torch.float32, seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = build("sam", model2, loss_scaler=LossScaler(init_scale=1.0, growth_interval=1))
    opt2.load_state_dict(copy.deepcopy(state))
    assert opt2.loss_scaler.get_scale() == 2.0**13
    for x, y in data(3, dtype=torch.float32, seed=4):
        do_step("sam", opt, model, x, y, opt.backward)
        do_step("sam", opt2, model2, x, y, opt2.backward)
    assert same(model, model2)
    # A state dict without it (an older checkpoint, or one without a scaler) still loads.
    del state["loss_scaler"]
    opt2.load_state_dict(state)
    build("sam", mlp(torch.float32)).load_state_dict(opt.state_dict())


# ---- 11. library faults --------------------------------------------------------------------------


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_agnostic_loads_a_plain_base_state_dict_and_keeps_its_radii(base) -> None:
    model = mlp()
    plain = base(model.parameters(), lr=0.01)
    for x, y in data(2):
        plain.zero_grad()
        closure(model, x, y)()
        plain.step()
    plain.zero_grad()
    opt = AgnosticSAM(model.parameters(), base, rho1=0.2, rho2=0.07, lr=0.01)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho1"] == 0.2 and opt.param_groups[0]["rho2"] == 0.07
    do_step("full", opt, model, *data(1)[0])
    assert opt.state_dict()["param_groups"][0]["rho2"] == 0.07


def test_agnostic_sparse_gradients_refused_before_any_perturbed_pass() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True).double()
    head = nn.Linear(4, 3).double()
    opt = AgnosticSAM([*emb.parameters(), *head.parameters()], lr=0.1)
    before = [p.detach().clone() for p in [*emb.parameters(), *head.parameters()]]
    idx, y = torch.randint(0, 10, (8,)), torch.randint(0, 3, (8,))
    calls = {"n": 0}

    def c():
        calls["n"] += 1
        loss = F.cross_entropy(head(emb(idx)), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step(c, c)
    assert calls["n"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, [*emb.parameters(), *head.parameters()]))


@pytest.mark.parametrize("value", [float("inf"), -1.0, float("nan")])
@pytest.mark.parametrize("key", ["rho1", "rho2"])
def test_radius_changed_in_param_groups_is_checked_at_step(key: str, value: float) -> None:
    model = mlp()
    opt = build("full", model)
    opt.param_groups[0][key] = value
    before = copy.deepcopy(model)
    with pytest.raises(
        ValueError, match=rf"param group 0: invalid perturbation radius {key}={value!r}"
    ):
        do_step("full", opt, model, *data(1)[0])
    assert same(before, model)


def test_sam_radius_changed_in_param_groups_is_checked_at_step() -> None:
    model = mlp()
    opt = build("sam", model)
    opt.param_groups[0]["rho"] = float("inf")
    with pytest.raises(ValueError, match="rho=inf"):
        do_step("sam", opt, model, *data(1)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_closure_must_return_a_scalar_loss(kind: str) -> None:
    model = mlp()
    opt = build(kind, model)
    x, y = data(1)[0]

    def per_sample(xs, ys):
        def run():
            losses = F.cross_entropy(model(xs), ys, reduction="none")
            losses.mean().backward()
            return losses
        return run

    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="must return a scalar loss"):
        if kind in ("plain", "sam"):
            opt.step(per_sample(x, y))
        else:
            opt.step(per_sample(x[:22], y[:22]), per_sample(x[22:], y[22:]))
    assert same(before, model)
