"""ASAM as Kwon et al. (ICML 2021) wrote it, against a float64 reference from its equations:
T = |w| + eta for parameters named "...weight", 1 for the others; e = rho T^2 g / (||T g|| + eps).
"""

from __future__ import annotations

import pytest
import torch
from tests._family import BASES, batches, groups, loss_of, make_model, max_diff, run_reference

from agnostic_sam.methods import create_optimizer, get_method

EPS = 1e-12
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]  # make_model()'s parameters, in order


def _asam(rho_of, eta: float):
    def direction(step, grad_at, theta, group_of):
        g = grad_at(theta, step)
        t = [w.abs() + eta if "weight" in n else torch.ones_like(w) for n, w in zip(NAMES, theta)]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
        e = [rho_of(gr) * ti * ti * gi / (norm + EPS) for ti, gi, gr in zip(t, g, group_of)]
        return grad_at([w + ei for w, ei in zip(theta, e)], step)

    return direction


def _run(base: str, settings: dict, per_group: dict | None, *, named: bool) -> list[torch.Tensor]:
    """Like tests._family.run_method, with names: named param groups, or model=."""
    model = make_model()
    cls, kwargs = BASES[base]
    param_groups = groups(model, per_group)
    options = {}
    if named:
        names = dict((id(p), n) for n, p in model.named_parameters())
        for g in param_groups:
            g["param_names"] = [names[id(p)] for p in g["params"]]
    else:
        options["model"] = model
    opt = create_optimizer("asam", param_groups, cls, kwargs, settings=settings, **options)
    for x, y in batches():
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_asam_equals_the_authors_rule(base) -> None:
    settings = {"rho": 0.5, "eta": 0.01}
    ref = run_reference(_asam(lambda group: group.get("rho", 0.5), 0.01), base,
                        per_group={"rho": 1.0})
    for named in (True, False):  # names from the param groups, or from model=
        ours = _run(base, settings, {"rho": 1.0}, named=named)
        diff = max_diff(ours, ref)
        print(f"asam {base} named={named}: max |ours - reference| = {diff:.3g}")
        assert diff < 1e-9


def test_asam_differs_from_davda54_adaptive_sam() -> None:
    # T = |w| + eta on weights and 1 on biases is not SAM(adaptive=True)'s T = |w| everywhere.
    ours = _run("sgd", {"rho": 0.5}, None, named=False)
    model = make_model()
    davda = create_optimizer("sam", groups(model), *BASES["sgd"], settings={"rho": 0.5,
                                                                           "adaptive": True})
    for x, y in batches():
        davda.step(lambda x=x, y=y: (lambda loss: (davda.backward(loss), loss)[1])(
            loss_of(model, x, y)))
    assert max_diff(ours, [p.detach() for p in model.parameters()]) > 1e-6


def test_asam_refuses_unnamed_parameters_in_one_line() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="pass model=, or model.named_parameters") as info:
        create_optimizer("asam", model.parameters(), torch.optim.SGD, {"lr": 0.1})
    assert "\n" not in str(info.value)


def test_asam_record() -> None:
    info = get_method("asam")
    assert info.defaults == {"rho": 0.5, "eta": 0.01}
    assert info.passes == ("B", "B") and info.tune == "rho"
    assert info.batch_equivalents(0.5) == 2.0
