"""The method registry: what each record says, a method registered from outside the package
trained by `train` and listed by `compare`, and no optimizer name compared outside the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from agnostic_sam import SAM, AgnosticSAM, Plain
from agnostic_sam.compare import CompareConfig, compare
from agnostic_sam.methods import (
    METHODS,
    create_optimizer,
    get_method,
    list_methods,
    register_method,
)
from agnostic_sam.train import load_checkpoint, load_config, train

SRC = Path(__file__).resolve().parents[1] / "src" / "agnostic_sam"
BUILT_IN = ("sgd", "sam", "agnostic-sam", "agnostic-sam-simpler")


def test_built_in_records() -> None:
    assert list_methods()[:4] == list(BUILT_IN)
    assert [get_method(n).splits_batch for n in BUILT_IN] == [False, False, True, True]
    assert [get_method(n).setting_names for n in BUILT_IN] == [
        (), ("rho", "adaptive"), ("rho1", "rho2", "adaptive"), ("rho1", "rho2", "adaptive")
    ]
    assert [get_method(n).tune for n in BUILT_IN] == [None, "rho", "rho1", "rho1"]
    assert [get_method(n).closures for n in BUILT_IN] == [1, 1, 2, 2]
    assert [get_method(n).buffers for n in BUILT_IN] == [0, 1, 2, 2]
    # forward + backward work per step in batches: |B|, 2|B|, 2|B|, |B| + |B^t|
    assert [get_method(n).batch_equivalents(0.7) for n in BUILT_IN] == pytest.approx([1, 2, 2, 1.7])
    assert get_method("agnostic-sam").tuned_settings(0.2, 0.5) == {"rho1": 0.2, "rho2": 0.1}
    assert get_method("sam").tuned_settings(0.2, 0.5) == {"rho": 0.2}
    assert get_method("sgd").tuned_settings(0.2, 0.5) == {} and not get_method("sgd").tunable
    # the defaults are the 0.2 TrainConfig radii, the class signatures' defaults
    assert get_method("sam").defaults == {"rho": 0.05, "adaptive": False}
    assert get_method("agnostic-sam").defaults == {"rho1": 0.1, "rho2": 0.05, "adaptive": False}


@pytest.mark.parametrize("name, cls", [("sgd", Plain), ("sam", SAM), ("agnostic-sam", AgnosticSAM),
                                       ("agnostic-sam-simpler", AgnosticSAM)])
def test_create_optimizer_builds_each_method(name, cls) -> None:
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(name, model.parameters(), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
                           radii={"rho": 0.07, "rho1": 0.3, "rho2": 0.2}, adaptive=False)
    assert isinstance(opt, cls) and opt.param_groups[0]["momentum"] == 0.9
    if name == "agnostic-sam-simpler":
        assert opt.variant == "simpler"
    # only this method's radii are taken from the 0.2 keyword
    radii = {k: opt.param_groups[0][k] for k in ("rho", "rho1", "rho2") if k in opt.param_groups[0]}
    assert radii == {"sgd": {}, "sam": {"rho": 0.07}}.get(name, {"rho1": 0.3, "rho2": 0.2})


def test_unknown_and_bad_registrations_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose from sgd, sam"):
        get_method("adam")
    with pytest.raises(ValueError, match="already registered"):
        register_method("sam", description="again")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="invalid passes"):
        register_method("odd", description="x", passes=("B", "B^t"))
    with pytest.raises(ValueError, match=r"method 'sam': unknown setting 'alpha'; the settings "
                                         r"are rho, adaptive"):
        create_optimizer("sam", torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, {"lr": 0.1},
                         settings={"alpha": 0.1})
    with pytest.raises(ValueError, match=r"invalid rho=-1.0: must be a float in \[0, inf\)"):
        create_optimizer("sam", torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, {"lr": 0.1},
                         settings={"rho": -1.0})


# A user's own method, registered from this file (outside the package): SAM whose radius is
# twice the configured rho. Nothing in the package knows its name.
@register_method("test-double-rho-sam", description="SAM at twice rho (a test's own method)",
                 radius_keys=("rho",), passes=("B", "B"), adaptive=True)
def _double_rho_sam(params, base_optimizer, base_kwargs, radii, **options):
    return SAM(params, base_optimizer, rho=2 * radii["rho"], **options, **base_kwargs)


def _run_cfg(tmp_path, **overrides):
    base = {"epochs": 1, "max_steps": 4, "threads": 1, "progress": False, "device": "cpu"}
    return load_config(None, {**base, **overrides})


def test_a_method_registered_outside_the_package_trains_and_is_compared(tmp_path) -> None:
    assert "test-double-rho-sam" in list_methods()
    # train accepts it, and it is exactly SAM at twice the radius
    mine = train(
        _run_cfg(tmp_path, optimizer="test-double-rho-sam", rho=0.1, out=str(tmp_path / "a"))
    )
    train(_run_cfg(tmp_path, optimizer="sam", rho=0.2, out=str(tmp_path / "b")))
    assert mine["optimizer"] == "test-double-rho-sam" and mine["steps"] == 4
    wa = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # compare lists it next to the built-in ones, with its radius from the record
    cc = CompareConfig(train=_run_cfg(tmp_path, out=str(tmp_path / "cmp"), rho=0.1),
                       optimizers=["sgd", "test-double-rho-sam"], seeds=[0])
    report = compare(cc, print_report=False)
    assert report["summary"]["test-double-rho-sam"]["radius"] == "rho=0.1"
    assert "| test-double-rho-sam | rho=0.1 |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_the_cli_offers_every_registered_method(capsys) -> None:
    # `agnostic-sam methods` lists every one; `train --help` (which loads no registry) says so
    from agnostic_sam.cli import build_parser, main

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "`agnostic-sammethods`listseveryone" in "".join(text.split())  # wrapped at hyphens
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    for name in METHODS:
        assert f"| `{name}` |" in listed, name


# A name literal compared with ==, !=, in (...), or used as a match case: only methods.py may.
_NAMES = "|".join(re.escape(n) for n in BUILT_IN)
_COMPARISON = re.compile(
    rf"""(==|!=|\bin\b)\s*[(\[{{]?\s*["']({_NAMES})["']"""
    rf"""|["']({_NAMES})["']\s*(==|!=)"""
    rf"""|case\s+["']({_NAMES})["']"""
)


def test_no_module_outside_the_registry_compares_an_optimizer_name() -> None:
    hits = []
    for path in SRC.rglob("*.py"):
        if path.parent == SRC / "methods":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if _COMPARISON.search(line):
                hits.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert hits == []
