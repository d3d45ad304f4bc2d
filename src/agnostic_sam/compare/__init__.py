"""Several optimizers x seeds: run them, tabulate them, pair them, and tune their radii honestly.

- `config`: what a comparison runs (`CompareConfig` from defaults < YAML < flags, `PlannedRun`);
- `run`: plans the runs, trains them with the launcher, tunes the radii (`compare`,
  `select_radius`);
- `report`: reads the finished runs and writes ``comparison.{json,md}`` and the curve plot.

Imports go one way: ``report -> config <- run -> report``. The public names are re-exported
here, so ``from agnostic_sam.compare import compare`` is the entry point.
"""

from agnostic_sam.compare.config import (
    COMPARE_KEYS,
    CompareConfig,
    PlannedRun,
    load_compare_config,
)
from agnostic_sam.compare.report import write_report
from agnostic_sam.compare.run import compare, select_radius

__all__ = [
    "COMPARE_KEYS",
    "CompareConfig",
    "PlannedRun",
    "compare",
    "load_compare_config",
    "select_radius",
    "write_report",
]
