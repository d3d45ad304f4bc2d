"""One table config file, parsed and checked: `TableSpec`, `parse_spec`, `load_specs`.

The schema of the files in ``configs/`` is in the docstring of `agnostic_sam.reproduce.tables`,
which expands each spec into its training runs. Every check here raises UsageError naming the
file and the key, before any run is planned.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.yamlio import read_yaml

__all__ = [
    "CONFIG_DIR",
    "STUDIES",
    "TABLES",
    "TableSpec",
    "config_error",
    "load_specs",
    "paper_value",
    "parse_spec",
    "spec_of",
    "train_fields",
]

CONFIG_DIR = Path(__file__).parent / "configs"
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6", "figure1")
# The paper's protocols on the embedded digits data (not part of "all", which is the paper's own
# tables): Table 4's label noise and Table 2's small training sets, fixed and tuned radii.
STUDIES = ("table4-digits", "table2-digits", "family-digits")

_SPEC_KEYS = {"table", "cell", "metric", "base", "methods", "best_of", "grid",
              "tuning", "row", "x", "group", "panels", "paper", "title", "note", "cost"}
_REQUIRED_KEYS = ("table", "cell", "methods", "grid")
# val_noise: the held-out part carries the training noise; budget: the tune runs' budget
_TUNING_KEYS = {"val_fraction", "rho2_ratio", "seeds", "val_noise", "budget"}


@dataclass
class TableSpec:
    """One parsed config file (see `agnostic_sam.reproduce.tables` for the schema)."""

    path: Path
    table: str
    cell: str
    metric: str
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    best_of: dict[str, list[str]]
    grid: dict[str, list[Any]]
    tune: dict[str, tuple[float, ...]] = field(default_factory=dict)  # method -> candidates
    tuning: dict[str, Any] = field(default_factory=dict)
    row: str | None = None
    x: str | None = None
    group: str | None = None
    panels: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper: dict[str, str] = field(default_factory=dict)
    title: str | None = None
    note: str | None = None
    cost: bool = False  # the report shows each cell's measured cost and a cost figure


def train_fields() -> set[str]:
    """The names of TrainConfig's fields: what a config may set for a run."""
    from dataclasses import fields

    from agnostic_sam.train.config import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def config_error(path: Path, message: str) -> UsageError:
    """The one-line error of a config file: its name, then ``message``."""
    return UsageError(f"reproduce config {path.name}: {message}")


def _linked(values: list[Any]) -> bool:
    """A grid key whose values are all mappings: fields that change together."""
    return bool(values) and all(isinstance(v, dict) for v in values)


def _from_registry(data: dict[str, Any]) -> dict[str, Any]:
    """``methods: registry``: one method per registered method, not its variants (each tunable
    one with ``tune: grid``); ``registry`` in ``grid.method`` and a panel's ``methods`` lists
    them all."""
    from agnostic_sam.methods import get_method, list_methods

    names = list_methods(lambda m: m.variant_of is None)
    data = dict(data)
    # a method without a grid (a plugin's) trains at its defaults
    data["methods"] = {n: ({"optimizer": n, "tune": "grid"} if get_method(n).grid
                           else {"optimizer": n}) for n in names}
    grid = dict(data.get("grid") or {})
    if grid.get("method") == "registry":
        grid["method"] = names
    data["grid"] = grid
    panels = {}
    for name, entry in (data.get("panels") or {}).items():
        entry = dict(entry or {})
        if entry.get("methods") == "registry":
            entry["methods"] = names
        panels[name] = entry
    data["panels"] = panels
    return data


def _registry_grid(path: Path, fields: dict[str, Any]) -> list[float]:
    from agnostic_sam.methods import get_method

    try:
        info = get_method(str(fields.get("optimizer")))
    except ValueError as exc:
        raise config_error(path, str(exc)) from None
    if not info.grid:
        raise config_error(path, f"method '{info.name}' has no tuning grid in the registry")
    return list(info.grid)


def parse_spec(path: Path) -> TableSpec:
    """One config file, checked: unknown keys, non-TrainConfig fields and unknown methods raise
    UsageError naming the file and the key."""
    data = read_yaml(path, what="reproduce config")  # the strict reader: a mapping or UsageError
    _check_keys(path, data)
    if data["methods"] == "registry":  # every registered method, tuned over its own grid
        data = _from_registry(data)
    methods = {str(k): dict(v or {}) for k, v in data["methods"].items()}
    tune = _pop_tune(path, methods, dict(data.get("base") or {}))
    spec = TableSpec(
        path=path,
        table=str(data["table"]),
        cell=str(data["cell"]),
        metric=str(data.get("metric", "final_test_acc")),
        base=dict(data.get("base") or {}),
        methods=methods,
        best_of={str(k): list(v) for k, v in (data.get("best_of") or {}).items()},
        grid={str(k): list(v) if isinstance(v, list) else [v] for k, v in data["grid"].items()},
        tune=tune,
        tuning=dict(data.get("tuning") or {}),
        row=data.get("row"),
        x=data.get("x"),
        group=data.get("group"),
        panels={str(k): dict(v or {}) for k, v in (data.get("panels") or {}).items()},
        paper={str(k): str(v) for k, v in (data.get("paper") or {}).items()},
        title=data.get("title"),
        note=data.get("note"),
        cost=bool(data.get("cost", False)),
    )
    _check_fields(spec)
    _check_methods(spec)
    _check_study(spec)
    return spec


def _check_keys(path: Path, data: dict[str, Any]) -> None:
    """The file's top-level keys: none unknown, none of the required ones missing."""
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise config_error(path, f"unknown key '{sorted(unknown)[0]}'")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise config_error(path, f"missing key '{key}'")


def _pop_tune(path: Path, methods: dict[str, dict[str, Any]],
              base: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    """Each method's ``tune`` entry, taken out of its TrainConfig fields: the candidate radii,
    sorted and without repeats (``grid``: the tuned setting's own candidates, from the
    registry)."""
    tune = {}
    for name, entry in methods.items():
        if "tune" not in entry:
            continue
        candidates = entry.pop("tune")
        if candidates == "grid":
            candidates = _registry_grid(path, {**base, **entry})
        if not _positive_radii(candidates):
            raise config_error(path, f"methods.{name}.tune must list positive radii, "
                                     f"got {candidates!r}")
        tune[name] = tuple(sorted({float(r) for r in candidates}))
    return tune


def _positive_radii(candidates: Any) -> bool:
    """A non-empty list of finite positive numbers (booleans are not numbers here)."""
    return isinstance(candidates, list) and bool(candidates) and all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 and math.isfinite(r)
        for r in candidates
    )


def _check_fields(spec: TableSpec) -> None:
    """Every field set by ``base``, a method or the grid is a TrainConfig field; a linked grid
    key (a list of mappings) is checked mapping by mapping."""
    allowed = train_fields()
    sections = [("base", spec.base)] + [(f"methods.{m}", v) for m, v in spec.methods.items()]
    for key, values in spec.grid.items():
        if key == "method":
            continue
        if key in allowed:
            sections.append(("grid", {key: None}))
        elif _linked(values):
            sections += [(f"grid.{key}", v) for v in values]
        else:
            sections.append(("grid", {key: None}))
    for where, keys in sections:
        for key in keys:
            if key not in allowed:
                raise config_error(spec.path, f"'{key}' in {where} is not a TrainConfig field")


def _check_methods(spec: TableSpec) -> None:
    """The grid's methods and the ``best_of`` members are all in ``methods``."""
    for name in spec.grid.get("method", list(spec.methods)):
        if name not in spec.methods:
            raise config_error(spec.path, f"grid method '{name}' is not in methods")
    for cell_method, members in spec.best_of.items():
        for name in members:
            if name not in spec.methods:
                raise config_error(spec.path,
                                   f"best_of {cell_method} lists unknown method '{name}'")


def _check_study(spec: TableSpec) -> None:
    """The tuning and report keys of a digits protocol agree with its methods."""
    from agnostic_sam.methods import get_method

    path = spec.path
    unknown = set(spec.tuning) - _TUNING_KEYS
    if unknown:
        raise config_error(path, f"unknown tuning key '{sorted(unknown)[0]}'")
    if spec.tune and not 0.0 < float(spec.tuning.get("val_fraction", 0.0)) < 1.0:
        raise config_error(path, "tuned methods need tuning.val_fraction in (0, 1)")
    for name in spec.tune:
        optimizer = {**spec.base, **spec.methods[name]}.get("optimizer")
        try:
            tunable = get_method(str(optimizer)).tunable
        except ValueError as exc:
            raise config_error(path, str(exc)) from None
        if not tunable:
            raise config_error(path,
                               f"methods.{name}: optimizer '{optimizer}' has no radius to tune")
    if spec.panels and not spec.row:
        raise config_error(path, "panels need a row template")
    for panel, entry in spec.panels.items():
        members = list(entry.get("methods") or [])
        versus = dict(entry.get("versus") or {})
        for name in members + list(versus.values()):
            if name not in spec.methods:
                raise config_error(path, f"panel '{panel}' names unknown method '{name}'")
        for name in versus.values():
            if name not in members:
                raise config_error(path, f"panel '{panel}' pairs against '{name}', which it "
                                         "does not show")
    if spec.paper and set(spec.paper) != {"table", "cell"}:
        raise config_error(path, "paper needs exactly 'table' and 'cell'")


def load_specs(table: str) -> list[TableSpec]:
    """The parsed config files of ``table`` (one of TABLES or STUDIES), sorted by file name."""
    if table not in TABLES + STUDIES:
        raise UsageError(f"unknown table '{table}'; choose from "
                         f"{', '.join(TABLES + STUDIES)} or all")
    specs = [parse_spec(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    return [s for s in specs if s.table == table]


def spec_of(table: str) -> TableSpec:
    """The one config file of a study table (a digits protocol is one file)."""
    specs = load_specs(table)
    if len(specs) != 1:
        raise UsageError(f"{table} must come from exactly one config file, found {len(specs)}")
    return specs[0]


def paper_value(
    spec: TableSpec,
    overrides: dict[str, Any],
    paper: dict[str, Any],
) -> dict[str, Any] | None:
    """The paper's number a study row shows for context: ``spec.paper.cell`` formatted with the
    run's fields, in ``paper_numbers.json`` table ``spec.paper.table``; with ``*`` in the key, the
    mean over the matching cells. ``{"mean", "cells"}`` or None (the paper has no such cell)."""
    if not spec.paper:
        return None
    cells = paper["tables"].get(spec.paper["table"], {}).get("cells", {})
    try:
        pattern = spec.paper["cell"].format(**overrides)
    except KeyError:
        return None
    matched = [v["mean"] for k, v in cells.items() if fnmatch.fnmatchcase(k, pattern)]
    if not matched:
        return None
    return {"mean": math.fsum(matched) / len(matched), "cells": len(matched), "key": pattern}
