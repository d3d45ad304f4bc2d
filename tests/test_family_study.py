"""The family study (issue 20): every registered method in the family-digits config, its report
with cost columns and the accuracy-against-cost figure (a smoke run: slow)."""

from __future__ import annotations

import json

import pytest

from agnostic_sam.methods import get_method, list_methods
from agnostic_sam.methods.builtin import BUILT_IN
from agnostic_sam.reproduce import plan, spec_of, tune_plan


def test_the_study_lists_every_registered_method_with_its_registry_grid() -> None:
    spec = spec_of("family-digits")
    methods = list_methods(lambda m: m.variant_of is None)  # the methods, not "-sched" variants
    assert list(spec.methods) == methods and "sam-sched" not in methods
    for name in methods:
        info = get_method(name)
        assert spec.tune.get(name) == (tuple(sorted(info.grid)) if info.grid else None)
    runs = plan("family-digits", seeds=[0])
    tune = tune_plan(runs, spec, seeds=[0])
    # tuning at the epochs budget on a noisy held-out part, shared by both budgets' cells
    assert {r.overrides["budget"] for r in tune} == {"epochs"}
    assert all(r.overrides["val_noise"] and r.overrides["val_fraction"] == 0.1 for r in tune)
    assert len({r.run_id for r in tune}) == len(tune) // 2


@pytest.mark.slow
def test_smoke_study_reports_cost_and_draws_the_frontier(tmp_path) -> None:
    from agnostic_sam.reproduce import reproduce

    report = reproduce("family-digits", out=tmp_path, seeds=[0, 1], tune_seeds=[0], smoke=True,
                       progress=False, jobs=2, log=lambda line: None)
    study = report["tables"]["family-digits"]
    cells = [c for p in study["panels"] for r in p["rows"] for c in r["methods"]]
    assert {c["method"] for c in cells} == set(list_methods(lambda m: m.variant_of is None))
    # the package's methods (methods other test modules registered in this process are not
    # known to the worker processes: their runs fail there, as a user's plugin would without
    # AGNOSTIC_SAM_PLUGINS)
    ours = [c for c in cells if c["method"] in BUILT_IN]
    assert len({c["method"] for c in ours}) == len([m for m in BUILT_IN
                                                     if get_method(m).variant_of is None])
    assert all(c["n"] == 2 and c["cost_batches"] and c["seconds"] for c in ours)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    text = (tmp_path / "report.md").read_text()
    assert "work per run (batches)" in text and "wall time per run on" in text
    assert json.loads((tmp_path / "report.json").read_text())["tables"]["family-digits"]["cost"]
