"""GSAM against a reference written from Zhuang et al. (ICLR 2022), Algorithm 1, in float64."""

from __future__ import annotations

import pytest
from tests._family import dot, max_diff, norm, run_method, run_reference

EPS = 1e-12


def _gsam(rho_of, alpha: float):
    def direction(step, grad_at, theta, group_of):
        g = grad_at(theta, step)
        n = norm(g)
        e = [rho_of(group, step) * gi / (n + EPS) for gi, group in zip(g, group_of)]
        g_p = grad_at([t + ei for t, ei in zip(theta, e)], step)
        coef = dot(g, g_p) / (dot(g_p, g_p) + EPS)
        g_perp = [gi - coef * gpi for gi, gpi in zip(g, g_p)]
        return [gpi - alpha * gq for gpi, gq in zip(g_p, g_perp)]

    return direction


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gsam_equals_the_papers_rule(base) -> None:
    ours = run_method("gsam", base, {"rho": 0.1, "alpha": 0.3}, per_group={"rho": 0.2})
    ref = run_reference(_gsam(lambda group, step: group.get("rho", 0.1), 0.3), base,
                        per_group={"rho": 0.2})
    assert max_diff(ours, ref) < 1e-9


def test_gsam_rho_follows_the_learning_rate() -> None:
    # Without a scheduler lr stays at lr_0, so rho_t = rho: rho_min must then change nothing.
    a = run_method("gsam", "sgd", {"rho": 0.1, "alpha": 0.3, "rho_min": 0.01})
    b = run_method("gsam", "sgd", {"rho": 0.1, "alpha": 0.3})
    assert max_diff(a, b) == 0.0
    # alpha = 0 is SAM exactly (d = g_p).
    sam = run_method("sam", "sgd", {"rho": 0.1})
    assert max_diff(run_method("gsam", "sgd", {"rho": 0.1, "alpha": 0.0}), sam) < 1e-12


def test_gsam_equals_pytorch_optimizers_gsam() -> None:
    """pytorch_optimizer's GSAM (its own closure protocol, rho from a scheduler) on the same
    float64 steps: the same rule. What differs: its global norm of g_p is a float32 sum of
    squares (`get_global_gradient_norm`), where eps sits (<g, g_p> / (||g|| ||g_p|| + eps) times
    ||g|| / (||g_p|| + eps) there, / (||g_p||^2 + eps) here) and its restore of theta by
    subtracting e (here a copy): 3e-9 on float64 weights after 20 steps, float32 precision."""
    import torch
    from pytorch_optimizer import GSAM as PeerGSAM
    from tests._family import batches, loss_of, make_model

    from agnostic_sam import GSAM

    class Constant:  # its ProportionScheduler's protocol, at a fixed radius
        def step(self) -> float:
            return 0.1

    ours_model, peer_model = make_model(), make_model()
    ours = GSAM(ours_model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, lr=0.1,
                momentum=0.9)
    base = torch.optim.SGD(peer_model.parameters(), lr=0.1, momentum=0.9)
    peer = PeerGSAM(peer_model.parameters(), base, peer_model, Constant(), alpha=0.3)
    for x, y in batches():
        def closure(x=x, y=y):
            loss = loss_of(ours_model, x, y)
            loss.backward()
            return loss

        ours.step(closure)
        peer.set_closure(torch.nn.functional.cross_entropy, x, y)
        peer.step()
    diff = max(float((a - b).abs().max())
               for a, b in zip(ours_model.parameters(), peer_model.parameters()))
    print(f"gsam vs pytorch_optimizer: {diff:.2e}")
    assert diff < 1e-7
