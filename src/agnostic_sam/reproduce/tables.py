r"""The paper's tables as lists of training runs, read from the YAML files in ``configs/``.

A table config file describes one family of cells (one table, one block of rows):

.. code-block:: yaml

    table: table1                      # which report table the cells belong to
    title: "..."                       # optional: the report's heading (studies); note: a remark
    cell: "{dataset}/{model}/{method}"  # cell key; {field} is any TrainConfig field or `method`
    metric: final_test_acc             # a result.json key, or seconds_per_epoch
    base: {epochs: 200, lr: 0.1}       # TrainConfig fields shared by every run
    methods:                           # method name -> TrainConfig fields (optimizer, radii, split)
      sam: {optimizer: sam, rho: 0.05}
    best_of:                           # optional: one cell method = the best of several methods
      sam: [sam-rho0.02, sam-rho0.05]
    grid:                              # lists, expanded as a Cartesian product
      model: [wrn28_10, densenet121]
      method: [sam]
      seed: [0, 1, 2]

Each grid point becomes a :class:`Run` whose ``overrides`` are ``base | methods[method] | point``.
A grid key that is not a TrainConfig field and lists mappings links fields that change together
(``subset: [{train_fraction: 0.1, epochs: 100}, ...]``): each mapping is one grid value.

A run is identified by its resolved TrainConfig (``Run.run_id``:
`agnostic_sam.train.rundir.run_id`), so the same training run listed by two tables (Table 5 reuses
Table 1's SAM runs), or spelled with a default written out, is trained once and read by both.

The digits protocols (``STUDIES``) add radius tuning and a paired report:

.. code-block:: yaml

    methods:
      sam-tuned: {optimizer: sam, tune: [0.05, 0.1, 0.2, 0.4]}   # candidates for the radius
    tuning: {val_fraction: 0.1, rho2_ratio: 0.5, seeds: [0, 1, 2]}
    row: "{model}/noise{noise_rate}"          # a report row: the cell key without the method
    x: noise_rate                             # the figure's x axis; rows differ in x and `group`
    group: model                              # one figure row (and report block) per value
    panels:                                   # methods shown and paired together
      fixed radii: {methods: [sgd, sam], versus: {SGD: sgd, SAM: sam}}
      tuned radii: {methods: [sgd, sam-tuned], versus: {SGD: sgd, SAM: sam-tuned}}
    paper: {table: table4, cell: "cifar10/resnet32/noise{noise_rate}/{optimizer}"}

A method with ``tune`` is trained, for every candidate ``r`` and tuning seed, on the training set
minus a stratified held-out part (``val_fraction``; the test set is never opened), with the
method's radius fields set by the method registry (``rho = r``, or ``rho1 = r, rho2 = r *
rho2_ratio``). Its final runs (the grid's seeds, full training set, test set once) get the radius
that `agnostic_sam.compare.select_radius` picks; see `agnostic_sam.reproduce.tuning`.
``paper.cell`` may hold ``*``: the paper's value is then the mean of the matching cells.
"""

from __future__ import annotations

import fnmatch
import itertools
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
    "TRAIN_SIZES",
    "SMOKE_SHAPES",
    "SMOKE_WEIGHTS",
    "Run",
    "TableSpec",
    "load_specs",
    "paper_value",
    "parse_spec",
    "plan",
    "spec_of",
    "unique_runs",
    "steps_per_epoch",
    "smoke_overrides",
    "format_plan",
]

CONFIG_DIR = Path(__file__).parent / "configs"
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6", "figure1")
# The paper's protocols on the embedded digits data (not part of "all", which is the paper's own
# tables): Table 4's label noise and Table 2's small training sets, fixed and tuned radii.
STUDIES = ("table4-digits", "table2-digits", "family-digits")

# Training-set sizes (images) as the paper states them (Sec. 4.1); used by --dry-run only.
TRAIN_SIZES = {
    "cifar10": 50_000,
    "cifar100": 50_000,
    "flowers102": 2_040,  # train + val splits joined, as the paper does
    "stanford_cars": 8_144,
    "fgvc_aircraft": 6_667,  # trainval
    "oxford_pets": 3_680,
    "digits": 1_437,  # the fixed stratified 80/20 split of scikit-learn's 1,797 images
}

# --smoke: (image side in pixels, number of classes) of synthetic data standing in for each set.
# All are RGB. Class counts are the torchvision data sets' (Cars has 196 classes, Aircraft 100
# variants); the small sets keep the paper's 224x224 input.
SMOKE_SHAPES = {
    "cifar10": (32, 10),
    "cifar100": (32, 100),
    "flowers102": (224, 102),
    "stanford_cars": (224, 196),
    "fgvc_aircraft": (224, 100),
    "oxford_pets": (224, 37),
}
# --smoke batch size: small enough for _mini models at 224x224 on one CPU core (two steps each).
SMOKE_BATCH_SIZE = 8
# --smoke synthetic training / test set sizes (images): two batches to train, a few to evaluate.
SMOKE_DATA_SIZES = (("train_size", 64), ("test_size", 32))
# --smoke stand-in for a `weights` value: the runner writes a *_mini state dict in its place.
SMOKE_WEIGHTS = "smoke:mini-state-dict"
# --smoke keeps these in-memory data sets (small, no download) and only shrinks model and steps.
SMOKE_KEEPS_DATA = ("digits",)

_SPEC_KEYS = {"table", "cell", "metric", "base", "methods", "best_of", "grid",
              "tuning", "row", "x", "group", "panels", "paper", "title", "note", "cost"}
# val_noise: the held-out part carries the training noise; budget: the tune runs' budget
_TUNING_KEYS = {"val_fraction", "rho2_ratio", "seeds", "val_noise", "budget"}


@dataclass
class Run:
    """One training run and the report cell it feeds.

    ``method`` is the config's method name (``sam-rho0.05``); ``cell_method`` the name in the cell
    key (``sam``): they differ only for ``best_of`` cells, where the report keeps the best method.
    """

    table: str
    cell: str
    method: str
    cell_method: str
    metric: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # "final": a run the report reads; "tune": a held-out run of a radius candidate
    phase: str = "final"
    # the radius candidate of a tune run; the chosen radius of a tuned final run once resolved
    radius: float | None = None
    # the candidates of a tuned final run (None: the config's own radii)
    tune: tuple[float, ...] | None = None
    row: str | None = None  # the report row (studies), e.g. "cnn/noise0.2"
    # (overrides as text, id): run_id resolves a config, so it is cached until overrides change
    _id_cache: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def pending(self) -> bool:
        """A tuned final run whose radius is not chosen yet: it has no run id."""
        return self.tune is not None and self.radius is None

    def config(self) -> Any:
        """The run's resolved, validated TrainConfig (defaults < overrides)."""
        from agnostic_sam.train import load_config

        if self.pending:
            raise ValueError(f"{self.cell}: the radius is chosen by tuning first")
        return load_config(None, self.overrides)

    @property
    def run_id(self) -> str:
        """`agnostic_sam.train.rundir.run_id` of the resolved config: one definition of "the
        same run" for train, compare and reproduce."""
        from agnostic_sam.train.rundir import run_id

        key = repr(sorted(self.overrides.items()))
        if self._id_cache is None or self._id_cache[0] != key:
            self._id_cache = (key, run_id(self.config()))
        return self._id_cache[1]


@dataclass
class TableSpec:
    """One parsed config file (see the module docstring for the schema)."""

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


def _train_fields() -> set[str]:
    from dataclasses import fields

    from agnostic_sam.train.config import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def _fail(path: Path, message: str) -> UsageError:
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
        raise _fail(path, str(exc)) from None
    if not info.grid:
        raise _fail(path, f"method '{info.name}' has no tuning grid in the registry")
    return list(info.grid)


def parse_spec(path: Path) -> TableSpec:
    """One config file, checked: unknown keys, non-TrainConfig fields and unknown methods raise
    UsageError naming the file and the key."""
    data = read_yaml(path, what="reproduce config")  # the strict reader: a mapping or UsageError
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise _fail(path, f"unknown key '{sorted(unknown)[0]}'")
    for key in ("table", "cell", "methods", "grid"):
        if key not in data:
            raise _fail(path, f"missing key '{key}'")
    if data["methods"] == "registry":  # every registered method, tuned over its own grid
        data = _from_registry(data)
    methods = {str(k): dict(v or {}) for k, v in data["methods"].items()}
    tune = {}
    for name, entry in methods.items():
        if "tune" in entry:
            candidates = entry.pop("tune")
            if candidates == "grid":  # the tuned setting's own candidates, from the registry
                candidates = _registry_grid(path, {**(data.get("base") or {}), **entry})
            if not isinstance(candidates, list) or not candidates or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0
                and math.isfinite(r)
                for r in candidates
            ):
                raise _fail(path, f"methods.{name}.tune must list positive radii, "
                                  f"got {candidates!r}")
            tune[name] = tuple(sorted({float(r) for r in candidates}))
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
    allowed = _train_fields()
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
                raise _fail(path, f"'{key}' in {where} is not a TrainConfig field")
    for name in spec.grid.get("method", list(spec.methods)):
        if name not in spec.methods:
            raise _fail(path, f"grid method '{name}' is not in methods")
    for cell_method, members in spec.best_of.items():
        for name in members:
            if name not in spec.methods:
                raise _fail(path, f"best_of {cell_method} lists unknown method '{name}'")
    _check_study(spec)
    return spec


def _check_study(spec: TableSpec) -> None:
    """The tuning and report keys of a digits protocol agree with its methods."""
    from agnostic_sam.methods import get_method

    path = spec.path
    unknown = set(spec.tuning) - _TUNING_KEYS
    if unknown:
        raise _fail(path, f"unknown tuning key '{sorted(unknown)[0]}'")
    if spec.tune and not 0.0 < float(spec.tuning.get("val_fraction", 0.0)) < 1.0:
        raise _fail(path, "tuned methods need tuning.val_fraction in (0, 1)")
    for name in spec.tune:
        optimizer = {**spec.base, **spec.methods[name]}.get("optimizer")
        try:
            tunable = get_method(str(optimizer)).tunable
        except ValueError as exc:
            raise _fail(path, str(exc)) from None
        if not tunable:
            raise _fail(path, f"methods.{name}: optimizer '{optimizer}' has no radius to tune")
    if spec.panels and not spec.row:
        raise _fail(path, "panels need a row template")
    for panel, entry in spec.panels.items():
        members = list(entry.get("methods") or [])
        versus = dict(entry.get("versus") or {})
        for name in members + list(versus.values()):
            if name not in spec.methods:
                raise _fail(path, f"panel '{panel}' names unknown method '{name}'")
        for name in versus.values():
            if name not in members:
                raise _fail(path, f"panel '{panel}' pairs against '{name}', which it does not show")
    if spec.paper and set(spec.paper) != {"table", "cell"}:
        raise _fail(path, "paper needs exactly 'table' and 'cell'")


def load_specs(table: str) -> list[TableSpec]:
    """The parsed config files of ``table`` (one of TABLES or STUDIES), sorted by file name."""
    if table not in TABLES + STUDIES:
        raise UsageError(f"unknown table '{table}'; choose from "
                         f"{', '.join(TABLES + STUDIES)} or all")
    specs = [parse_spec(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    return [s for s in specs if s.table == table]


def _expand(spec: TableSpec, seeds: list[int] | None) -> list[Run]:
    grid = dict(spec.grid)
    grid.setdefault("method", list(spec.methods))
    if seeds is not None:
        grid["seed"] = list(seeds)
    # best_of members all report under one cell-method name
    cell_method_of = {m: cm for cm, members in spec.best_of.items() for m in members}
    fields = _train_fields()
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point: dict[str, Any] = {}
        for key, value in zip(keys, values):
            # a linked grid value sets several fields at once
            point.update(value if key not in fields and isinstance(value, dict) else {key: value})
        method = point.pop("method")
        overrides = {**spec.base, **spec.methods[method], **point}
        cell_method = cell_method_of.get(method, method)
        try:
            cell = spec.cell.format(method=cell_method, **overrides)
            row = spec.row.format(**overrides) if spec.row else None
        except KeyError as exc:
            raise _fail(spec.path, f"cell uses {exc} which no run sets") from None
        runs.append(Run(spec.table, cell, method, cell_method, spec.metric, overrides,
                        tune=spec.tune.get(method), row=row))
    return runs


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


def plan(table: str, *, seeds: list[int] | None = None, smoke: bool = False) -> list[Run]:
    """Every run of ``table`` (or of all tables for ``"all"``), in config-file and grid order.

    ``seeds`` replaces every config's seed list. ``smoke`` turns each run into a two-step run of a
    ``_mini`` model on synthetic data of the same shape (:func:`smoke_overrides`). A run shared by
    two tables appears once per table; :func:`unique_runs` removes the repeats for training.
    """
    tables = TABLES if table == "all" else (table,)
    runs = [run for t in tables for spec in load_specs(t) for run in _expand(spec, seeds)]
    if smoke:
        for run in runs:
            run.overrides = smoke_overrides(run.overrides)
    return runs


def spec_of(table: str) -> TableSpec:
    """The one config file of a study table (a digits protocol is one file)."""
    specs = load_specs(table)
    if len(specs) != 1:
        raise UsageError(f"{table} must come from exactly one config file, found {len(specs)}")
    return specs[0]


def unique_runs(runs: list[Run]) -> list[Run]:
    """First occurrence of each run id, order kept (pending tuned runs have none: left out)."""
    seen: dict[str, Run] = {}
    for run in runs:
        if not run.pending:
            seen.setdefault(run.run_id, run)
    return list(seen.values())


def _resolved(overrides: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig's defaults under ``overrides``, unvalidated (a listing needs no full config)."""
    from dataclasses import asdict

    from agnostic_sam.train.config import TrainConfig

    return {**asdict(TrainConfig()), **overrides}


def _stratified_keep(n: int, held_fraction: float) -> int:
    """Examples left after a stratified hold-out of ``held_fraction`` (scikit-learn's sizes:
    ``ceil(fraction * n)`` held out)."""
    return n - math.ceil(held_fraction * n)


def steps_per_epoch(overrides: dict[str, Any]) -> int:
    """Optimizer steps in one epoch, from the data set's known training-set size.

    As the trainer does: every method takes one step per full mini-batch ``B`` (the last partial
    batch is dropped; the Agnostic-SAM family splits ``B`` into ``B^t``/``B^v``). With
    ``split: fixed`` an epoch is one pass over ``S^t`` (``round(r N)`` images) in pieces of
    ``|B^t| = round(r |B|)``. A held-out part (``val_fraction``) and a training subset
    (``train_fraction``) shrink ``N`` first. Unset fields take TrainConfig's defaults.
    """
    from agnostic_sam.methods import get_method
    from agnostic_sam.optim import split_sizes

    cfg = _resolved(overrides)
    dataset = cfg["dataset"]
    if dataset not in TRAIN_SIZES:
        raise UsageError(f"no known training-set size for data set '{dataset}'")
    n = TRAIN_SIZES[dataset]
    if cfg.get("val_fraction"):
        n = _stratified_keep(n, float(cfg["val_fraction"]))
    if cfg["train_fraction"] < 1.0:
        n = _stratified_keep(n, 1.0 - float(cfg["train_fraction"]))
    batch = int(cfg["batch_size"])
    if cfg["split"] == "fixed" and get_method(cfg["optimizer"]).splits_batch:
        ratio = float(cfg["split_ratio"])
        n, batch = round(ratio * n), split_sizes(batch, ratio)[0]
    return n // batch


def smoke_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The same run shrunk to two optimizer steps of the ``_mini`` model on synthetic data.

    The synthetic data keep the real set's image size and class count (``SMOKE_SHAPES``), so the
    model's stem and head have the real shapes. A ``weights`` value becomes ``SMOKE_WEIGHTS``, for
    which the runner writes a ``_mini`` state dict: the loading path is exercised without a network.
    The small in-memory sets (``SMOKE_KEEPS_DATA``: digits) are kept as they are.
    """
    dataset = _resolved(overrides)["dataset"]
    smoke = dict(overrides)
    smoke.update(model=f"{_resolved(overrides)['model']}_mini", epochs=1, max_steps=2)
    if dataset in SMOKE_KEEPS_DATA:
        return smoke
    if dataset not in SMOKE_SHAPES:
        raise UsageError(f"no smoke shape for data set '{dataset}'")
    size, num_classes = SMOKE_SHAPES[dataset]
    smoke.update(dataset="synthetic", image_size=size, batch_size=SMOKE_BATCH_SIZE)
    if "weights" in overrides:
        smoke["weights"] = SMOKE_WEIGHTS
    # The synthetic set's shape options, set where TrainConfig carries them (build_data accepts
    # num_classes, train_size, test_size for `synthetic`).
    fields = _train_fields()
    for key, value in (("num_classes", num_classes),) + SMOKE_DATA_SIZES:
        if key in fields:
            smoke[key] = value
    return smoke


def _listing_line(name: str, overrides: dict[str, Any], cells: str) -> tuple[str, int]:
    cfg = _resolved(overrides)
    epochs, max_steps = int(cfg["epochs"]), cfg["max_steps"]
    if cfg["dataset"] in TRAIN_SIZES:
        from agnostic_sam.train.config import TrainConfig, budget_factor

        per_epoch: int | str = steps_per_epoch(overrides)
        # a passes budget stretches a cheaper method's run (the trainer's planned_steps)
        planned = max(1, round(epochs * int(per_epoch) * budget_factor(TrainConfig(**cfg))))
        steps = planned if max_steps is None else min(planned, max_steps)
    else:  # --smoke: synthetic data, the step cap decides
        per_epoch, steps = "-", int(max_steps or 0)
    return f"{name:<62} {epochs:>6} {per_epoch:>8} {steps:>9}  {cells}", steps


def format_plan(runs: list[Run], tune_runs: list[Run] | None = None) -> str:
    """The --dry-run listing: one line per training run, cells it feeds, and totals.

    With ``tune_runs`` (a study with tuned radii) the held-out tuning runs come first; a tuned
    final run whose radius is not chosen yet is listed as ``<...>-seed<k>-after-tuning``.
    """
    lines = []
    total = 0
    header = f"{'run':<62} {'epochs':>6} {'steps/ep':>8} {'steps':>9}  cells"
    tune_unique = unique_runs(tune_runs or [])
    if tune_unique:
        lines += ["tuning (held-out val_fraction, test set never opened): "
                  f"{len(tune_unique)} runs", header]
        for run in tune_unique:
            line, steps = _listing_line(run.run_id, run.overrides,
                                        f"tune {run.cell} r={run.radius:g}")
            lines.append(line)
            total += steps
        lines.append("final runs (full training set, test set once):")
    lines.append(header)
    # a pending run has no id yet: it is one per (cell, seed) until its radius is chosen
    cells_of: dict[Any, list[str]] = {}
    first: dict[Any, Run] = {}
    for run in runs:
        key = (run.cell, run.overrides.get("seed")) if run.pending else run.run_id
        cells_of.setdefault(key, []).append(f"{run.table}:{run.cell}")
        first.setdefault(key, run)
    names = list(cells_of)
    for key in names:
        line, steps = _listing_line(_listing_name(first[key]), first[key].overrides,
                                    " ".join(cells_of[key]))
        lines.append(line)
        total += steps
    n_cells = len({(r.table, r.cell) for r in runs})
    n_runs = len(names) + len(tune_unique)
    lines.append(f"{n_runs} training runs, {n_cells} table cells, {total} optimizer steps in total")
    return "\n".join(lines)


def _listing_name(run: Run) -> str:
    if not run.pending:
        return run.run_id
    cfg = _resolved(run.overrides)
    return f"{cfg['dataset']}-{cfg['model']}-{cfg['optimizer']}-seed{cfg['seed']}-<tuned>"
