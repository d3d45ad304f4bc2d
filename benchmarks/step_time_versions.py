"""Step time of the core methods on CIFAR ResNet-18, batch 64 (benchmarks/step_time.py's model,
batch and 45/19 split), one thread: the package now and at git revision REV built in one process
and stepped in interleaved rounds; CPU time of each step (robust on a shared machine).

    OMP_NUM_THREADS=1 python benchmarks/step_time_versions.py [--rounds 3] [--rev 6e5f142]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import own_time  # noqa: E402

from agnostic_sam import methods as now  # noqa: E402
from agnostic_sam.models import create_model  # noqa: E402

CORE = ("sgd", "sam", "agnostic-sam", "agnostic-sam-simpler")
BASE = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
RADII = {"rho": 0.05, "rho1": 0.1, "rho2": 0.05}


def step_of(registry: Any, name: str, model0: torch.nn.Module, x: torch.Tensor,
            y: torch.Tensor) -> Any:
    model = copy.deepcopy(model0)
    opt = registry.create_optimizer(name, model.parameters(), torch.optim.SGD, dict(BASE),
                                    radii=RADII, model=model)

    def closure(xs: torch.Tensor, ys: torch.Tensor) -> Any:
        def run() -> torch.Tensor:
            loss = F.cross_entropy(model(xs), ys)
            opt.backward(loss)
            return loss.detach()

        return run

    split = registry.get_method(name).splits_batch
    closures = (closure(x[:45], y[:45]), closure(x[45:], y[45:])) if split else (closure(x, y),)
    return lambda: opt.step(*closures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rev", default="6e5f142")
    args = ap.parse_args()
    torch.set_num_threads(1)
    package = own_time.baseline_package(args.rev, "agnostic_sam_b0")
    old = importlib.import_module(package + ".methods")
    torch.manual_seed(0)
    model0 = create_model("resnet18", num_classes=10, in_channels=3, image_size=32).train()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    steps = {(name, tag): step_of(reg, name, model0, x, y)
             for tag, reg in (("now", now), (args.rev, old)) for name in CORE}
    times: dict[Any, list[float]] = {key: [] for key in steps}
    for r in range(args.rounds + 1):  # round 0 warms up
        for key, step in steps.items():
            t0 = time.thread_time()
            step()
            if r:
                times[key].append((time.thread_time() - t0) * 1e3)
        print(f"round {r} done", file=sys.stderr, flush=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    sam_now, sam_old = med[("sam", "now")], med[("sam", args.rev)]
    print(f"| method | ms/step now | ms/step {args.rev} | now / {args.rev} | ratio to SAM now | "
          f"ratio to SAM {args.rev} |\n|---|---|---|---|---|---|")
    for name in CORE:
        a, b = med[(name, "now")], med[(name, args.rev)]
        print(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.3f} | {a / sam_now:.3f} | "
              f"{b / sam_old:.3f} |")


if __name__ == "__main__":
    main()
