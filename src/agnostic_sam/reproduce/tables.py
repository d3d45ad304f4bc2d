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

The files are parsed and checked by `agnostic_sam.reproduce.spec`; the --dry-run listing (steps
per epoch, totals) is `agnostic_sam.reproduce.listing`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.reproduce.spec import (
    STUDIES,
    TABLES,
    TableSpec,
    config_error,
    load_specs,
    paper_value,
    parse_spec,
    spec_of,
    train_fields,
)

__all__ = [
    "SMOKE_SHAPES",
    "SMOKE_WEIGHTS",
    "Run",
    "plan",
    "unique_runs",
    "smoke_overrides",
    "with_defaults",
    # the config files' names (`agnostic_sam.reproduce.spec`), importable from here as before
    "STUDIES",
    "TABLES",
    "TableSpec",
    "load_specs",
    "paper_value",
    "parse_spec",
    "spec_of",
]

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


def _expand(spec: TableSpec, seeds: list[int] | None) -> list[Run]:
    grid = dict(spec.grid)
    grid.setdefault("method", list(spec.methods))
    if seeds is not None:
        grid["seed"] = list(seeds)
    # best_of members all report under one cell-method name
    cell_method_of = {m: cm for cm, members in spec.best_of.items() for m in members}
    fields = train_fields()
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
            raise config_error(spec.path, f"cell uses {exc} which no run sets") from None
        runs.append(Run(spec.table, cell, method, cell_method, spec.metric, overrides,
                        tune=spec.tune.get(method), row=row))
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
    """First occurrence of each run id, order kept (pending tuned runs have none: left out)."""
    seen: dict[str, Run] = {}
    for run in runs:
        if not run.pending:
            seen.setdefault(run.run_id, run)
    return list(seen.values())


def with_defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig's defaults under ``overrides``, unvalidated (a listing needs no full config)."""
    from dataclasses import asdict

    from agnostic_sam.train.config import TrainConfig

    return {**asdict(TrainConfig()), **overrides}


def smoke_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The same run shrunk to two optimizer steps of the ``_mini`` model on synthetic data.

    The synthetic data keep the real set's image size and class count (``SMOKE_SHAPES``), so the
    model's stem and head have the real shapes. A ``weights`` value becomes ``SMOKE_WEIGHTS``, for
    which the runner writes a ``_mini`` state dict: the loading path is exercised without a network.
    The small in-memory sets (``SMOKE_KEEPS_DATA``: digits) are kept as they are.
    """
    dataset = with_defaults(overrides)["dataset"]
    smoke = dict(overrides)
    smoke.update(model=f"{with_defaults(overrides)['model']}_mini", epochs=1, max_steps=2)
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
    fields = train_fields()
    for key, value in (("num_classes", num_classes),) + SMOKE_DATA_SIZES:
        if key in fields:
            smoke[key] = value
    return smoke
