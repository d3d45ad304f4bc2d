"""Wall time of `agnostic-sam --help` and `agnostic-sam train --help` (median of 5), next to
`python -c "import torch"` (the floor of any command that needs the method registry).

    python benchmarks/help_time.py                      # this checkout
    git archive 857932f src | tar -x -C /tmp/before
    python benchmarks/help_time.py --before /tmp/before/src    # and an older tree, interleaved

Runs are interleaved so that both trees see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="SRC", help="an older src/ to time as well")
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("agnostic-sam"))
    trees = {"": None} if args.before is None else {"before ": args.before, "after ": None}
    cases: dict[str, tuple[list[str], str | None]] = {}
    for label, src in trees.items():
        cases[f"{label}agnostic-sam --help"] = ([exe, "--help"], src)
        cases[f"{label}agnostic-sam train --help"] = ([exe, "train", "--help"], src)
    cases["python -c 'import torch'"] = ([sys.executable, "-c", "import torch"], None)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, (argv, src) in cases.items():
            env = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "AGNOSTIC_SAM_PLUGINS")}
            if src is not None:
                env["PYTHONPATH"] = src
            start = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True, cwd="/")
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        runs = " ".join(f"{t:.2f}" for t in ts)
        print(f"{name:36s} median {statistics.median(ts):6.2f} s  (runs {runs})")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
