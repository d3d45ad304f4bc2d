"""Own-time benchmark: the optimizer's work outside its passes when passes are cheap.

A deep narrow MLP (60 Linear + LayerNorm blocks of width 32: 242 parameter tensors) at batch 16
on one CPU thread, so that one forward+backward pass costs about what a base optimizer step
costs. Every method of the registry (`agnostic_sam.methods.list_methods()`) is built with its
defaults over SGD (momentum 0.9, weight decay 5e-4) and stepped in interleaved rounds. Per
method, medians over every measured step:

- pass ms:  time inside the closures of one step (forward + backward, all passes)
- step ms:  the whole ``opt.step(...)`` call
- own ms:   step - pass: the optimizer's own work (norms, perturbations, copies, checks,
            the base step it calls)
- own/base: own ms over the base step: ``torch.optim.SGD.step() + zero_grad()`` alone, with
            the same settings, timed in the same rounds

and the hook overhead: one backward pass through a model whose parameters an optimizer holds,
over the same backward through an identical model no optimizer holds (ratio of medians).

``--baseline REV`` (repeatable) also times the package as it was at git revision REV, in the
same interleaved rounds (rows "name (REV)"): REV's ``src/agnostic_sam`` is exported to a
temporary directory as the package ``agnostic_sam_b<k>`` and imported beside this one.

    OMP_NUM_THREADS=1 python benchmarks/own_time.py --threads 1 [--rounds 15 --steps 5]
        [--out benchmarks/results/cpu_own_time]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agnostic_sam.methods import create_optimizer, get_method, list_methods

BASE_KWARGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
# The clock (--clock): this thread's CPU time by default, so that other processes on a shared
# machine add no waiting time (one thread does all the work: torch and autograd run in it).
CLOCK = [time.thread_time]


def make_model(depth: int, width: int, classes: int, seed: int) -> nn.Module:
    """`depth` blocks Linear(width, width) + LayerNorm + ReLU, then a Linear head:
    4 * depth + 2 parameter tensors."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class Timed:
    """The closures of one method; `spent` accumulates the seconds spent inside them."""

    def __init__(self, model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.opt, self.x, self.y = model, opt, x, y
        self.spent = 0.0

    def closure(self, x: torch.Tensor, y: torch.Tensor, per_sample: bool) -> Any:
        def run(index: Any = None, backward: bool = True) -> torch.Tensor:
            t0 = CLOCK[0]()
            xb, yb = (x, y) if index is None else (x[index], y[index])
            losses = F.cross_entropy(self.model(xb), yb, reduction="none")
            if backward:
                self.opt.backward(losses.mean())
            # Detached before the clock stops: the autograd graph is freed here, as part of
            # the pass, not later in the optimizer's time.
            out = losses.detach() if per_sample else losses.mean().detach()
            del losses
            self.spent += CLOCK[0]() - t0
            return out

        return run


def build(name: str, model0: nn.Module, x: torch.Tensor, y: torch.Tensor,
          registry: Any = None) -> tuple[Any, Timed]:
    """Method `name` of `registry` (a package's `methods` module; default this package's) over
    its own copy of the model; returns (step function, timer)."""
    info = registry.get_method(name) if registry else get_method(name)
    make = registry.create_optimizer if registry else create_optimizer
    model = copy.deepcopy(model0)
    # A baseline registry may predate the records' defaults: give it the same radii.
    extra = {"radii": {"rho": 0.05, "rho1": 0.1, "rho2": 0.05}} if registry else {}
    opt = make(name, model.parameters(), torch.optim.SGD, dict(BASE_KWARGS), model=model,
               **extra)
    timer = Timed(model, opt, x, y)
    per_sample = getattr(info, "closure", "loss") == "per-sample"
    if info.splits_batch:
        n_t = round(0.7 * len(x))
        closures = (timer.closure(x[:n_t], y[:n_t], per_sample),
                    timer.closure(x[n_t:], y[n_t:], per_sample))
    else:
        closures = (timer.closure(x, y, per_sample),)
    return (lambda: opt.step(*closures)), timer


def base_step(model0: nn.Module, x: torch.Tensor, y: torch.Tensor, foreach: bool | None) -> Any:
    """The base optimizer's own step + zero_grad, timed right after a forward + backward pass
    (untimed), in the state a training step finds it (caches as a backward pass leaves them).
    ``foreach=None``: torch's default (on the CPU its per-tensor loop); True: its multi-tensor
    step, which the package's wrappers take on the CPU where it gives the same bits."""
    model = copy.deepcopy(model0)
    opt = torch.optim.SGD(model.parameters(), foreach=foreach, **BASE_KWARGS)

    def run() -> float:
        F.cross_entropy(model(x), y).backward()
        t0 = CLOCK[0]()
        opt.step()
        opt.zero_grad()
        return CLOCK[0]() - t0

    return run


def backward_timer(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    def run() -> float:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t0 = CLOCK[0]()
        loss.backward()
        dt = CLOCK[0]() - t0
        model.zero_grad(set_to_none=True)
        return dt

    return run


def baseline_package(rev: str, name: str) -> str:
    """Export `rev`'s src/agnostic_sam as the importable package `name`."""
    root = Path(__file__).resolve().parents[1]
    tar = subprocess.run(["git", "archive", rev, "src/agnostic_sam"], cwd=root,
                         capture_output=True, check=True).stdout
    where = Path(tempfile.mkdtemp(prefix="own_time_baseline_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(where, filter="data")
    package = where / name
    (where / "src" / "agnostic_sam").rename(package)
    for path in package.rglob("*.py"):
        text = re.sub(r"\bagnostic_sam\b(?!\.py)", name, path.read_text())
        # The module optim/agnostic_sam.py keeps its name.
        text = text.replace(f"optim.{name}", "optim.agnostic_sam")
        text = text.replace(f"optim import {name}", "optim import agnostic_sam")
        path.write_text(text)
    sys.path.insert(0, str(where))
    return name


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model0 = make_model(args.depth, args.width, 10, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.width, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    names = args.methods.split(",") if args.methods else list_methods()
    steps = {name: build(name, model0, x, y) for name in names}
    # Hook overhead: a model held by an optimizer (hooks, if any, registered) vs. a fresh copy.
    held = copy.deepcopy(model0)
    holders = [create_optimizer("sam", held.parameters(), torch.optim.SGD, dict(BASE_KWARGS))]
    models = {"held": held, "free": copy.deepcopy(model0)}
    for k, rev in enumerate(args.baseline):
        old = importlib.import_module(baseline_package(rev, f"agnostic_sam_b{k}") + ".methods")
        for name in names:
            if name in old.list_methods():
                steps[f"{name} ({rev})"] = build(name, model0, x, y, old)
        models[f"held ({rev})"] = copy.deepcopy(model0)
        holders.append(old.create_optimizer("sam", models[f"held ({rev})"].parameters(),
                                            torch.optim.SGD, dict(BASE_KWARGS),
                                            radii={"rho": 0.05}))
    base = base_step(model0, x, y, None)
    base_foreach = base_step(model0, x, y, True)
    bwd = {key: backward_timer(m, x, y) for key, m in models.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {"step": [], "pass": []} for n in steps}
    base_ms: list[float] = []
    base_foreach_ms: list[float] = []
    bwd_ms: dict[str, list[float]] = {key: [] for key in bwd}
    for r in range(args.rounds + 1):  # round 0 warms every path up
        for name, (step, timer) in steps.items():
            for _ in range(args.steps):
                timer.spent = 0.0
                t0 = CLOCK[0]()
                step()
                total = CLOCK[0]() - t0
                if r:
                    samples[name]["step"].append(total * 1e3)
                    samples[name]["pass"].append(timer.spent * 1e3)
        for _ in range(args.steps):
            dt, dt_foreach = base(), base_foreach()
            if r:
                base_ms.append(dt * 1e3)
                base_foreach_ms.append(dt_foreach * 1e3)
        for _ in range(args.steps * 4):
            for key in list(bwd) if r % 2 else list(bwd)[::-1]:
                dt = bwd[key]()
                if r:
                    bwd_ms[key].append(dt * 1e3)
    del holders
    base_med = statistics.median(base_ms)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "param_tensors": sum(1 for _ in model0.parameters()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "load": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
        "base_step_ms": base_med,
        "base_step_foreach_ms": statistics.median(base_foreach_ms),
        "backward_ms": {k: statistics.median(v) for k, v in bwd_ms.items()},
        "hook_overhead": {key: statistics.median(v) / statistics.median(bwd_ms["free"])
                          for key, v in bwd_ms.items() if key != "free"},
        "methods": {name: summary(s, base_med) for name, s in samples.items()},
    }


def summary(samples: dict[str, list[float]], base_ms: float) -> dict[str, float]:
    """Medians of one method's steps: pass, step, own = step - pass, own / base step."""
    own = [a - b for a, b in zip(samples["step"], samples["pass"])]
    return {
        "pass_ms": statistics.median(samples["pass"]),
        "step_ms": statistics.median(samples["step"]),
        "own_ms": statistics.median(own),
        "own_over_base": statistics.median(own) / base_ms,
        "own_share": statistics.median([o / t for o, t in zip(own, samples["step"])]),
    }


def markdown(result: dict[str, Any], command: str) -> str:
    c = result["config"]
    rows = [
        f"# Own time, {c['depth']}-block MLP width {c['width']} "
        f"({result['param_tensors']} parameter tensors), batch {c['batch_size']}, "
        f"{c['threads']} thread(s)",
        "",
        f"`{command}`; torch {result['torch']}; medians of {c['rounds']} interleaved rounds x "
        f"{c['steps']} steps; {c.get('clock', 'cpu')} time; load average {result['load']}.",
        "",
        f"Base step (SGD momentum, step + zero_grad): {result['base_step_ms']:.2f} ms with "
        "torch's default (on the CPU a per-tensor loop); "
        f"{result['base_step_foreach_ms']:.2f} ms multi-tensor (foreach=True, which the wrappers "
        "take on the CPU where it is the same bits). "
        "Backward pass, parameters held by an optimizer / not: "
        + "; ".join(f"{key} {result['backward_ms'][key]:.2f} / "
                    f"{result['backward_ms']['free']:.2f} ms = {ratio:.3f}"
                    for key, ratio in result["hook_overhead"].items()) + ".",
        "",
        "| method | pass ms | step ms | own ms | own / base step | own / multi-tensor base step "
        "| own share of step |",
        "|---|---|---|---|---|---|---|",
    ]
    foreach_ms = result["base_step_foreach_ms"]
    for name, m in result["methods"].items():
        rows.append(f"| {name} | {m['pass_ms']:.2f} | {m['step_ms']:.2f} | {m['own_ms']:.2f} | "
                    f"{m['own_over_base']:.2f} | {m['own_ms'] / foreach_ms:.2f} | "
                    f"{100 * m['own_share']:.1f}% |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=60, help="Linear+LayerNorm blocks")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5, help="steps per method per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="", help="comma-separated (default: the whole registry)")
    ap.add_argument("--baseline", action="append", default=[], metavar="REV",
                    help="also time the package at git revision REV in the same rounds "
                    "(repeatable)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (robust on a shared machine); wall")
    ap.add_argument("--out", default="", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    CLOCK[0] = time.thread_time if args.clock == "cpu" else time.perf_counter
    result = measure(args)
    command = "OMP_NUM_THREADS=1 python benchmarks/own_time.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = markdown(result, command.strip())
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
