"""The wrapper lets its base optimizer take the multi-tensor step (foreach=True) on the CPU only
where that gives the bits of torch's default per-tensor loop (`_contract.prefer_foreach`)."""

from __future__ import annotations

import itertools

import pytest
import torch

from agnostic_sam import SAM
from agnostic_sam.optim._contract import FOREACH_SAME_BITS

SHAPES = [(32, 32), (32,), (10, 32), (7,), (3, 3, 4, 4), (1,)]

# Every option that changes the arithmetic of the step, per class.
OPTIONS: dict[type, list[dict]] = {
    torch.optim.SGD: [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True),
    ],
    torch.optim.Adam: [
        dict(lr=1e-3),
        dict(lr=1e-3, weight_decay=1e-2, amsgrad=True),
        dict(lr=1e-3, maximize=True, betas=(0.8, 0.9)),
    ],
    torch.optim.AdamW: [dict(lr=1e-3, weight_decay=1e-2), dict(lr=1e-3, amsgrad=True)],
    torch.optim.RMSprop: [
        dict(lr=1e-3),
        dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3),
    ],
    torch.optim.Adagrad: [dict(lr=1e-2), dict(lr=1e-2, lr_decay=1e-3, weight_decay=1e-3)],
}


def _steps(cls: type, foreach: bool | None, options: dict, dtype: torch.dtype) -> list:
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]
    opt = cls(params, foreach=foreach, **options)
    for _ in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return params


def test_every_class_is_checked() -> None:
    assert set(FOREACH_SAME_BITS) == set(OPTIONS)


@pytest.mark.parametrize(
    "cls,options,dtype",
    [(cls, o, dt) for cls, opts in OPTIONS.items() for o, dt in
     itertools.product(opts, (torch.float32, torch.float64))],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_multi_tensor_step_has_the_loops_bits(cls: type, options: dict,
                                              dtype: torch.dtype) -> None:
    loop = _steps(cls, False, options, dtype)
    multi = _steps(cls, True, options, dtype)
    assert all(torch.equal(a, b) for a, b in zip(loop, multi))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_wrapper_prefers_foreach_and_keeps_what_the_user_said() -> None:
    opt = SAM(_model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert [g["foreach"] for g in opt.param_groups] == [True]
    said = SAM(_model().parameters(), torch.optim.SGD, lr=0.1, foreach=False)
    assert [g["foreach"] for g in said.param_groups] == [False]
    # not a class of the list (nor a subclass of one): torch's choice stays
    class MySGD(torch.optim.SGD):
        pass

    sub = SAM(_model().parameters(), MySGD, lr=0.1)
    assert sub.param_groups[0]["foreach"] is None
    nadam = SAM(_model().parameters(), torch.optim.NAdam, lr=0.1)
    assert nadam.param_groups[0]["foreach"] is None
    # half precision: not always the same bits (momentum buffers), left to torch
    half = SAM(_model().to(torch.bfloat16).parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert half.param_groups[0]["foreach"] is None


def test_added_group_and_loaded_plain_state_prefer_foreach_too() -> None:
    model = _model()
    opt = SAM(list(model[0].parameters()), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": list(model[2].parameters())})
    assert [g["foreach"] for g in opt.param_groups] == [True, True]
    plain = torch.optim.SGD([{"params": list(model[0].parameters())},
                             {"params": list(model[2].parameters())}], lr=0.1, momentum=0.9)
    opt.load_state_dict(plain.state_dict())
    assert [g["foreach"] for g in opt.param_groups] == [True, True]


def test_sam_steps_like_the_plain_loop_with_torchs_default_base_step() -> None:
    """rho=0: the wrapper (multi-tensor base step) and a plain torch.optim.SGD (its CPU default,
    the loop) give the same weights, bit for bit, over several steps."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    ours, plain = _model(), _model()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9,
              weight_decay=5e-4)
    base = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert base.param_groups[0]["foreach"] is None

    def closure() -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(ours(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
        base.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        base.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))
