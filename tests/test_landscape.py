"""Loss landscapes: filter normalization, the grid, the centre at theta, the model left
untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agnostic_sam.analysis import loss_line, loss_surface, random_direction
from agnostic_sam.analysis.landscape import grid

torch.set_num_threads(1)


def conv_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g))]


def test_filter_normalized_direction_has_weight_filter_norms_and_zero_biases() -> None:
    model = conv_bn_net()
    direction = random_direction(model, torch.Generator().manual_seed(0))
    for p, d in zip(model.parameters(), direction):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() <= 1:  # conv/linear biases, BN weight and bias
            assert torch.count_nonzero(d) == 0
        else:
            w_norms = p.detach().flatten(1).norm(dim=1)
            d_norms = d.flatten(1).norm(dim=1)
            assert torch.allclose(d_norms, w_norms, rtol=1e-5)
            assert not torch.allclose(d, p.detach())  # random, not the weights themselves


def test_raw_direction_without_filter_normalization_includes_biases() -> None:
    model = conv_bn_net()
    direction = random_direction(model, torch.Generator().manual_seed(0), filter_normalize=False)
    assert all(torch.count_nonzero(d) == d.numel() for d in direction)


def test_same_seed_gives_the_same_directions_for_two_models_up_to_filter_scale() -> None:
    a, b = conv_bn_net(0), conv_bn_net(1)
    da = random_direction(a, torch.Generator().manual_seed(7))
    db = random_direction(b, torch.Generator().manual_seed(7))
    for x, y in zip(da, db):
        if x.dim() > 1:
            unit = lambda t: t / t.flatten(1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))  # noqa: E731
            assert torch.allclose(unit(x), unit(y), atol=1e-6)


def test_grid_is_symmetric_with_exact_zero_in_the_middle() -> None:
    points = grid(5, 0.5)
    assert points == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert grid(21, 1.0)[10] == 0.0


def test_surface_centre_is_the_loss_at_theta_in_eval_mode() -> None:
    model = conv_bn_net()
    model.train()
    data = batches()
    surface = loss_surface(model, nn.CrossEntropyLoss(), data, steps=5, span=0.5)
    assert surface["alphas"] == surface["betas"] == grid(5, 0.5)
    assert len(surface["loss"]) == 5 and all(len(row) == 5 for row in surface["loss"])
    model.eval()
    with torch.no_grad():
        at_theta = float(nn.functional.cross_entropy(model(data[0][0]), data[0][1]))
    assert surface["loss"][2][2] == at_theta
    line = loss_line(model, nn.CrossEntropyLoss(), data, steps=7, span=0.5)
    assert line["loss"][3] == at_theta
    # Away from theta the loss changes (the directions are not zero).
    assert surface["loss"][0][0] != at_theta and line["loss"][0] != at_theta


def test_surface_loss_equals_direct_evaluation_at_a_grid_point() -> None:
    model = conv_bn_net().eval()
    data = batches()
    surface = loss_surface(model, nn.CrossEntropyLoss(), data, steps=3, span=0.3, seed=2)
    g = torch.Generator().manual_seed(2)
    d1, d2 = random_direction(model, g), random_direction(model, g)
    moved = conv_bn_net().eval()
    with torch.no_grad():
        for p, a, b in zip(moved.parameters(), d1, d2):
            p.add_(-0.3 * a + 0.3 * b)  # alphas[0] = -0.3, betas[2] = 0.3
        expected = float(nn.functional.cross_entropy(moved(data[0][0]), data[0][1]))
    assert surface["loss"][0][2] == pytest.approx(expected, rel=1e-5)


def test_landscape_leaves_model_weights_grads_modes_and_buffers_exactly() -> None:
    model = conv_bn_net()
    model.train()
    model[3].eval()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)
    weights = [p.detach().clone() for p in params]
    grad_obj = params[0].grad
    modes = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    loss_surface(model, nn.CrossEntropyLoss(), batches(), steps=3)
    loss_line(model, nn.CrossEntropyLoss(), batches(), steps=3)
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))
    assert params[0].grad is grad_obj and torch.equal(grad_obj, torch.full_like(grad_obj, 0.25))
    assert all(p.grad is None for p in params[1:])
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))


@pytest.mark.parametrize(("steps", "span", "match"),
                         [(1, 1.0, "steps"), (5, 0.0, "span"), (5, -1.0, "span")])
def test_bad_grid_raises(steps: int, span: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        loss_surface(conv_bn_net(), nn.CrossEntropyLoss(), batches(), steps=steps, span=span)
