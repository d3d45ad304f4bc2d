"""Hessian eigenvalues and trace: closed form, dense-Hessian reference, model left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from agnostic_sam.analysis import hessian_trace, hessian_vector_product, top_eigenvalues

torch.set_num_threads(1)


class Quadratic(nn.Module):
    """loss = 0.5 x^T A x (inputs ignored): the Hessian is A."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(
            torch.randn(a.shape[0], dtype=a.dtype, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.x @ self.a @ self.x


def identity_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return output


def quadratic_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))]


def rotation(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    )
    return q


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(n, 3, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent reference: autograd.functional.hessian over the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(theta.split([math.prod(s) for s in shapes]), shapes)]
        return nn.functional.cross_entropy(
            functional_call(model, dict(zip(names, tensors)), (x,)), y
        )

    return torch.autograd.functional.hessian(loss, flat)


# -- closed form -----------------------------------------------------------------------------------

def test_quadratic_eigenvalues_exact_including_negative() -> None:
    q = rotation(5)
    a = q @ torch.diag(torch.tensor([5.0, -3.0, 1.0, 0.5, 0.1], dtype=torch.float64)) @ q.T
    found = top_eigenvalues(
        Quadratic(a), identity_loss, quadratic_batches(), k=3, iters=500, tol=1e-14
    )
    # Largest magnitude first: the negative eigenvalue comes second.
    assert found == pytest.approx([5.0, -3.0, 1.0], rel=1e-8)


def test_quadratic_trace_exact_for_diagonal_hessian() -> None:
    diag = torch.tensor([2.0, -1.0, 7.0, 0.25], dtype=torch.float64)
    trace = hessian_trace(
        Quadratic(torch.diag(diag)), identity_loss, quadratic_batches(), samples=3
    )
    # z^T D z = sum_i d_i z_i^2 = tr(D) for every Rademacher z.
    assert trace == pytest.approx(float(diag.sum()), rel=1e-12)


def test_hessian_vector_product_equals_a_times_v() -> None:
    a = (rotation(4) @ torch.diag(torch.tensor([3.0, 2.0, 1.0, -1.0], dtype=torch.float64))
         @ rotation(4).T)
    v = torch.randn(4, dtype=torch.float64)
    (hv,) = hessian_vector_product(Quadratic(a), identity_loss, quadratic_batches(), [v])
    assert torch.allclose(hv, a @ v, rtol=1e-12, atol=1e-12)


# -- independent reference: the dense Hessian ------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2])
def test_top_eigenvalues_match_dense_hessian(k: int) -> None:
    model = tiny_net()
    x, y = tiny_data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    by_magnitude = exact[exact.abs().argsort(descending=True)][:k].tolist()
    # Uneven batches (5 + 3) weighted by size give the Hessian of the mean over all 8 examples.
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    found = top_eigenvalues(
        model, nn.CrossEntropyLoss(), batches, k=k, iters=2000, tol=1e-12, seed=3
    )
    for f, e in zip(found, by_magnitude):
        assert abs(f - e) <= 1e-3 * abs(e), (found, by_magnitude)


def test_top_eigenvalues_accepts_a_dataloader_like_a_list() -> None:
    model = tiny_net()
    x, y = tiny_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    from_loader = top_eigenvalues(model, nn.CrossEntropyLoss(), loader, iters=50, seed=1)
    from_list = top_eigenvalues(model, nn.CrossEntropyLoss(), list(loader), iters=50, seed=1)
    assert from_loader == from_list


def test_trace_matches_dense_trace_within_monte_carlo_error() -> None:
    model = tiny_net()
    x, y = tiny_data()
    h = dense_hessian(model, x, y)
    samples = 400
    # Var(z^T H z) = 2 sum_{i != j} H_ij^2 for Rademacher z.
    off = h - torch.diag(torch.diagonal(h))
    std_of_mean = math.sqrt(2.0 * float((off**2).sum()) / samples)
    estimate = hessian_trace(model, nn.CrossEntropyLoss(), [(x, y)], samples=samples, seed=5)
    assert abs(estimate - float(torch.trace(h))) <= 4.0 * std_of_mean


# -- the model is left exactly as found ------------------------------------------------------------

def bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def snapshot(model: nn.Module) -> dict:
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for p, w in zip(model.parameters(), before["weights"]):
        assert torch.equal(p.detach(), w)  # bit-exact
    for p, (obj, value) in zip(model.parameters(), before["grads"]):
        assert p.grad is obj
        if value is not None:
            assert torch.equal(p.grad, value)
    assert [m.training for m in model.modules()] == before["modes"]
    for b, saved in zip(model.buffers(), before["buffers"]):
        assert torch.equal(b, saved)


def prepared_model() -> nn.Module:
    model = bn_dropout_net()
    model.train()
    model[3].eval()  # a submodule in the other mode must stay so
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # others keep grad None
    return model


def test_eigenvalues_and_trace_leave_model_untouched_and_use_eval_mode() -> None:
    model = prepared_model()
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 4, (6,), generator=g))]
    first = top_eigenvalues(model, nn.CrossEntropyLoss(), batches, k=2, iters=20)
    assert_unchanged(model, before)
    hessian_trace(model, nn.CrossEntropyLoss(), batches, samples=3)
    assert_unchanged(model, before)
    # Eval mode: dropout off and BN on running stats, so the result is a deterministic function.
    model[3].train()
    assert top_eigenvalues(model, nn.CrossEntropyLoss(), batches, k=2, iters=20) == first


def test_model_restored_when_the_loss_raises() -> None:
    model = prepared_model()
    before = snapshot(model)

    def failing(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        top_eigenvalues(
            model, failing, [(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))]
        )
    assert_unchanged(model, before)


# -- error inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0}, "k must be"), ({"iters": 0}, "iters must be"),
    ({"tol": -1.0}, "tol must be"), ({"k": 99}, "exceeds"),
])
def test_bad_arguments_name_the_value(kwargs: dict, match: str) -> None:
    a = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        top_eigenvalues(Quadratic(a), identity_loss, quadratic_batches(), **kwargs)


def test_empty_batches_and_bad_samples_raise() -> None:
    model = Quadratic(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        top_eigenvalues(model, identity_loss, [])
    with pytest.raises(ValueError, match="samples must be"):
        hessian_trace(model, identity_loss, quadratic_batches(), samples=0)
