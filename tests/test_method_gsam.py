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
