r"""The paper's tables as lists of training runs, read from the YAML files in ``configs/``.

A table config file describes one family of cells (one table, one block of rows):

.. code-block:: yaml

    table: table1                      # which report table the cells belong to
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
A run is identified by the content of its overrides (:func:`run_id`), so the same training run
listed by two tables (Table 5 reuses Table 1's SAM runs) is trained once and read by both.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agnostic_sam.errors import UsageError

__all__ = [
    "CONFIG_DIR",
    "NOT_IDENTITY",
    "TABLES",
    "TRAIN_SIZES",
    "SMOKE_SHAPES",
    "SMOKE_WEIGHTS",
    "Run",
    "TableSpec",
    "load_specs",
    "plan",
    "unique_runs",
    "run_id",
    "steps_per_epoch",
    "smoke_overrides",
    "format_plan",
]

CONFIG_DIR = Path(__file__).parent / "configs"
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6", "figure1")

# Training-set sizes (images) as the paper states them (Sec. 4.1); used by --dry-run only.
TRAIN_SIZES = {
    "cifar10": 50_000,
    "cifar100": 50_000,
    "flowers102": 2_040,  # train + val splits joined, as the paper does
    "stanford_cars": 8_144,
    "fgvc_aircraft": 6_667,  # trainval
    "oxford_pets": 3_680,
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

_SPEC_KEYS = {"table", "cell", "metric", "base", "methods", "best_of", "grid"}
# Fields that locate or display a run but do not change its numbers: not part of its identity.
NOT_IDENTITY = {"out", "resume", "progress", "device", "data_dir", "download", "workers", "threads"}


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

    @property
    def run_id(self) -> str:
        return run_id(self.overrides)


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


def _train_fields() -> set[str]:
    from dataclasses import fields

    from agnostic_sam.train.config import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def _parse_spec(path: Path) -> TableSpec:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise UsageError(f"reproduce config {path.name} must hold a mapping")
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise UsageError(f"reproduce config {path.name}: unknown key '{sorted(unknown)[0]}'")
    for key in ("table", "cell", "methods", "grid"):
        if key not in data:
            raise UsageError(f"reproduce config {path.name}: missing key '{key}'")
    spec = TableSpec(
        path=path,
        table=str(data["table"]),
        cell=str(data["cell"]),
        metric=str(data.get("metric", "final_test_acc")),
        base=dict(data.get("base") or {}),
        methods={str(k): dict(v or {}) for k, v in data["methods"].items()},
        best_of={str(k): list(v) for k, v in (data.get("best_of") or {}).items()},
        grid={str(k): list(v) if isinstance(v, list) else [v] for k, v in data["grid"].items()},
    )
    allowed = _train_fields()
    for where, keys in [("base", spec.base), ("grid", spec.grid)] + [
        (f"methods.{m}", v) for m, v in spec.methods.items()
    ]:
        for key in keys:
            if key not in allowed and not (where == "grid" and key == "method"):
                raise UsageError(f"reproduce config {path.name}: '{key}' in {where} is not a TrainConfig field")
    for name in spec.grid.get("method", list(spec.methods)):
        if name not in spec.methods:
            raise UsageError(f"reproduce config {path.name}: grid method '{name}' is not in methods")
    for cell_method, members in spec.best_of.items():
        for name in members:
            if name not in spec.methods:
                raise UsageError(f"reproduce config {path.name}: best_of {cell_method} lists unknown method '{name}'")
    return spec


def load_specs(table: str) -> list[TableSpec]:
    """The parsed config files of ``table`` (one of TABLES), sorted by file name."""
    if table not in TABLES:
        raise UsageError(f"unknown table '{table}'; choose from {', '.join(TABLES)} or all")
    specs = [_parse_spec(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    return [s for s in specs if s.table == table]


def _expand(spec: TableSpec, seeds: list[int] | None) -> list[Run]:
    grid = dict(spec.grid)
    grid.setdefault("method", list(spec.methods))
    if seeds is not None:
        grid["seed"] = list(seeds)
    # best_of members all report under one cell-method name
    cell_method_of = {m: cm for cm, members in spec.best_of.items() for m in members}
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        method = point.pop("method")
        overrides = {**spec.base, **spec.methods[method], **point}
        cell_method = cell_method_of.get(method, method)
        try:
            cell = spec.cell.format(method=cell_method, **overrides)
        except KeyError as exc:
            raise UsageError(f"reproduce config {spec.path.name}: cell uses {exc} which no run sets") from None
        runs.append(Run(spec.table, cell, method, cell_method, spec.metric, overrides))
    return runs


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


def unique_runs(runs: list[Run]) -> list[Run]:
    """First occurrence of each run id, order kept."""
    seen: dict[str, Run] = {}
    for run in runs:
        seen.setdefault(run.run_id, run)
    return list(seen.values())


def run_id(overrides: dict[str, Any]) -> str:
    """``<dataset>-<model>-<optimizer>-seed<k>-<hash>``: readable, and unique per run content.

    The hash covers every field that changes the run's numbers (not its folder, device or
    progress display), so two tables listing the same run share one directory.
    """
    identity = {k: v for k, v in sorted(overrides.items()) if k not in NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    o = overrides
    return f"{o.get('dataset', 'digits')}-{o.get('model', 'mlp')}-{o.get('optimizer', 'agnostic-sam')}-seed{o.get('seed', 0)}-{digest}"


def steps_per_epoch(overrides: dict[str, Any]) -> int:
    """Optimizer steps in one epoch, from the data set's known training-set size.

    As the trainer does: every method takes one step per full mini-batch ``B`` (the last partial
    batch is dropped; the Agnostic-SAM family splits ``B`` into ``B^t``/``B^v``). With
    ``split: fixed`` an epoch is one pass over ``S^t`` (``round(r N)`` images) in pieces of
    ``|B^t| = round(r |B|)``.
    """
    from agnostic_sam.train.config import AGNOSTIC_OPTIMIZERS, split_sizes

    dataset = overrides.get("dataset", "digits")
    if dataset not in TRAIN_SIZES:
        raise UsageError(f"no known training-set size for data set '{dataset}'")
    n = TRAIN_SIZES[dataset]
    batch = int(overrides.get("batch_size", 64))
    if overrides.get("split") == "fixed" and overrides.get("optimizer") in AGNOSTIC_OPTIMIZERS:
        ratio = float(overrides.get("split_ratio", 0.7))
        n, batch = round(ratio * n), split_sizes(batch, ratio)[0]
    return n // batch


def smoke_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The same run shrunk to two optimizer steps of the ``_mini`` model on synthetic data.

    The synthetic data keep the real set's image size and class count (``SMOKE_SHAPES``), so the
    model's stem and head have the real shapes. A ``weights`` value becomes ``SMOKE_WEIGHTS``, for
    which the runner writes a ``_mini`` state dict: the loading path is exercised without a network.
    """
    dataset = overrides.get("dataset", "digits")
    if dataset not in SMOKE_SHAPES:
        raise UsageError(f"no smoke shape for data set '{dataset}'")
    size, num_classes = SMOKE_SHAPES[dataset]
    smoke = dict(overrides)
    smoke.update(
        dataset="synthetic",
        image_size=size,
        model=f"{overrides['model']}_mini",
        batch_size=SMOKE_BATCH_SIZE,
        epochs=1,
        max_steps=2,
    )
    if "weights" in overrides:
        smoke["weights"] = SMOKE_WEIGHTS
    # The synthetic set's shape options, set where TrainConfig carries them (build_data accepts
    # num_classes, train_size, test_size for `synthetic`).
    fields = _train_fields()
    for key, value in (("num_classes", num_classes),) + SMOKE_DATA_SIZES:
        if key in fields:
            smoke[key] = value
    return smoke


def format_plan(runs: list[Run]) -> str:
    """The --dry-run listing: one line per training run, cells it feeds, and totals."""
    lines = [f"{'run':<62} {'epochs':>6} {'steps/ep':>8} {'steps':>9}  cells"]
    cells_of: dict[str, list[str]] = {}
    for run in runs:
        cells_of.setdefault(run.run_id, []).append(f"{run.table}:{run.cell}")
    total = 0
    unique = unique_runs(runs)
    for run in unique:
        epochs = int(run.overrides.get("epochs", 30))
        max_steps = run.overrides.get("max_steps")
        if run.overrides.get("dataset") in TRAIN_SIZES:
            per_epoch: int | str = steps_per_epoch(run.overrides)
            steps = epochs * int(per_epoch) if max_steps is None else min(epochs * int(per_epoch), max_steps)
        else:  # --smoke: synthetic data, the step cap decides
            per_epoch, steps = "-", int(max_steps or 0)
        total += steps
        lines.append(f"{run.run_id:<62} {epochs:>6} {per_epoch:>8} {steps:>9}  {' '.join(cells_of[run.run_id])}")
    n_cells = len({(r.table, r.cell) for r in runs})
    lines.append(f"{len(unique)} training runs, {n_cells} table cells, {total} optimizer steps in total")
    return "\n".join(lines)
