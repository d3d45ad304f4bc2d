"""Run identity: which run a config describes, and the name of that run.

Two configs describe the same run when they agree on every field that changes the numbers
(`IDENTITY_FIELDS`: all but where it is written, how it is shown and how many threads compute
it). `run_id` names a run by a hash of the identity fields that differ from `TrainConfig`'s
defaults, computed on the resolved config: spelling out a default gives the same id, and a field
added later with a default leaves every existing id unchanged.

`RunDir` (`rundir.py`) compares identities to refuse a directory holding another run, and
re-exports these names: the run directory stays the one place that says what "the same run" is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from agnostic_sam.methods import SHORTHANDS, get_method
from agnostic_sam.train.config import TrainConfig, budget_factor, config_to_dict, method_settings

__all__ = ["IDENTITY_FIELDS", "run_id", "run_identity"]

# Fields that do not change the numbers a run produces: where it is written, whether it resumes,
# how it is shown or logged, how many CPU threads compute it.
_NOT_IDENTITY = {"data_dir", "download", "threads", "out", "resume", "progress", "log"}
IDENTITY_FIELDS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_IDENTITY
)


# Values the radius fields had by default before they meant "the method's default" (0.2): a run
# that left one unset is identified by the value it trained with, or by this when its method has
# no such setting, so every 0.2 run keeps its identity and id.
_SHORTHAND_IDENTITY = {"rho": 0.05, "rho1": 0.1, "rho2": 0.05}


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that define which run it is (see the module docstring), with the
    method's settings canonical: an unset radius is the value the method used, and
    ``method_args`` holds exactly the settings (other than the shorthand fields) that differ
    from the method's defaults."""
    values = config_to_dict(cfg)
    identity = {key: values[key] for key in IDENTITY_FIELDS}
    try:
        info = get_method(cfg.optimizer)
        settings = method_settings(cfg)
    except ValueError:  # not a run any command will train; compared as written
        return identity
    if identity.get("budget") == "passes" and budget_factor(cfg) == 1.0:
        # the same steps as under an epochs budget (the reference itself, or a method of its
        # cost): the same run, trained once and shared by both budgets
        identity["budget"] = "epochs"
    if identity.get("budget") == "epochs":  # the reference only matters for a passes budget
        identity["budget_reference"] = TrainConfig.budget_reference
    for key, legacy in _SHORTHAND_IDENTITY.items():
        if identity[key] is None:
            identity[key] = settings.get(key, legacy)
    identity["method_args"] = {
        k: v for k, v in settings.items()
        if k not in SHORTHANDS and v != info.setting(k).default
    }
    return identity


def run_id(cfg: TrainConfig) -> str:
    """``<dataset>-<model>-<optimizer>-seed<k>-<hash>``, the hash over the identity fields that
    differ from the defaults."""
    defaults = run_identity(TrainConfig())
    changed = {k: v for k, v in run_identity(cfg).items() if v != defaults[k]}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.dataset}-{cfg.model}-{cfg.optimizer}-seed{cfg.seed}-{digest}"
