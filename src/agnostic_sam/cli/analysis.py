"""`agnostic-sam hessian | landscape | congruence`: analyses of finished training runs (paper Sec. 5.3).

All three read run directories written by `agnostic-sam train`. `hessian` and `landscape` use the
run's training loss on the first N batches of its training set (see `agnostic_sam.analysis.runs`);
`congruence` reads `cos_train_val` from each run's `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from agnostic_sam.errors import UsageError

__all__ = ["register", "run_congruence", "run_hessian", "run_landscape"]


def register(subparsers: argparse._SubParsersAction) -> None:
    h = subparsers.add_parser(
        "hessian", help="top Hessian eigenvalues and trace of a trained model",
        description="Power iteration (top-k eigenvalues, largest magnitude) and Hutchinson trace of the "
                    "Hessian of the run's training loss on its first N training batches; writes DIR/hessian.json.")
    h.add_argument("--run", required=True, metavar="DIR", help="run directory made by `agnostic-sam train`")
    h.add_argument("--batches", type=int, default=4, metavar="N", help="training batches to use (default 4)")
    h.add_argument("--batch-size", type=int, default=None, metavar="B", help="default: the run's batch size")
    h.add_argument("--k", type=int, default=1, metavar="K", help="number of top eigenvalues (default 1)")
    h.add_argument("--iters", type=int, default=100, metavar="N", help="max power iterations per eigenvalue")
    h.add_argument("--tol", type=float, default=1e-4, help="relative change that stops power iteration")
    h.add_argument("--trace-samples", type=int, default=100, metavar="N",
                   help="Hutchinson samples for the trace; 0 skips it (default 100)")
    h.add_argument("--seed", type=int, default=0, metavar="S")
    h.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:N (default auto)")
    h.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    h.set_defaults(func=run_hessian)

    ls = subparsers.add_parser(
        "landscape", help="filter-normalized 2-D loss landscapes, several runs side by side",
        description="Loss on a grid theta + a*d1 + b*d2 along two filter-normalized random directions "
                    "(the same seed for every run); writes landscape.json, landscape_contour.png and "
                    "landscape_surface.png with one shared colour scale.")
    ls.add_argument("--run", required=True, action="append", metavar="DIR", help="run directory (repeatable)")
    ls.add_argument("--label", action="append", default=None, metavar="NAME",
                    help="panel title per --run, in order (default: the run's optimizer)")
    ls.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the run dir; "
                    "required with several runs)")
    ls.add_argument("--steps", type=int, default=21, metavar="N", help="grid points per axis (default 21)")
    ls.add_argument("--span", type=float, default=1.0, metavar="X", help="grid covers [-X, X]^2 (default 1)")
    ls.add_argument("--batches", type=int, default=4, metavar="N", help="training batches to use (default 4)")
    ls.add_argument("--batch-size", type=int, default=None, metavar="B", help="default: the run's batch size")
    ls.add_argument("--vmax", type=float, default=None, help="clip the colour scale at this loss")
    ls.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the directions (default 0)")
    ls.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:N (default auto)")
    ls.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    ls.set_defaults(func=run_landscape)

    c = subparsers.add_parser(
        "congruence", help="plot cos(train grad, val grad) over epochs",
        description="One line per run: the epoch mean of cos(grad L_{B^t}, grad L_{B^v}) that "
                    "Agnostic-SAM records in metrics.jsonl (runs without it are skipped with a note).")
    c.add_argument("--run", required=True, action="append", metavar="DIR", help="run directory (repeatable)")
    c.add_argument("--label", action="append", default=None, metavar="NAME", help="legend entry per --run")
    c.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    c.set_defaults(func=run_congruence)


def _optimizer_of(run_dir: Path) -> str | None:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config.get("optimizer") if isinstance(config, dict) else None


def _labels(runs: list[Path], given: list[str] | None) -> list[str]:
    """Given labels, else each run's optimizer; runs sharing an optimizer add their folder name."""
    if given is not None:
        if len(given) != len(runs):
            raise UsageError(f"{len(given)} --label for {len(runs)} --run; give one per run or none")
        return list(given)
    names = [_optimizer_of(r) or r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.name})" for n, r in zip(names, runs)]


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def run_hessian(args: argparse.Namespace) -> int:
    from agnostic_sam.analysis import hessian_trace, top_eigenvalues
    from agnostic_sam.analysis.runs import check_run_dir, load_run, run_batches, run_loss

    run_dir = check_run_dir(args.run)
    _set_threads(args.threads)
    if args.trace_samples < 0:
        raise UsageError(f"--trace-samples must be >= 0, got {args.trace_samples}")
    start = time.perf_counter()
    model, cfg = load_run(run_dir, args.device)
    data = run_batches(cfg, args.batches, batch_size=args.batch_size, seed=args.seed)
    loss_fn = run_loss(cfg)
    eigenvalues = top_eigenvalues(model, loss_fn, data, k=args.k, iters=args.iters, tol=args.tol,
                                  seed=args.seed, progress=True)
    trace = (hessian_trace(model, loss_fn, data, samples=args.trace_samples, seed=args.seed, progress=True)
             if args.trace_samples > 0 else None)
    param = next(model.parameters())
    result: dict[str, Any] = {
        "run": str(run_dir),
        "eigenvalues": eigenvalues,
        # Natural log, as the paper reports the top eigenvalue (Sec. 5.3); undefined for <= 0.
        "log_eigenvalues": [math.log(v) if v > 0 else None for v in eigenvalues],
        "trace": trace,
        "num_examples": sum(int(x.shape[0]) for x, _ in data),
        "seconds": time.perf_counter() - start,
        "settings": {"batches": len(data), "batch_size": int(data[0][0].shape[0]), "k": args.k,
                     "iters": args.iters, "tol": args.tol, "trace_samples": args.trace_samples,
                     "seed": args.seed, "device": str(param.device), "dtype": str(param.dtype).replace("torch.", ""),
                     "loss": "cross_entropy", "label_smoothing": float(loss_fn.label_smoothing),
                     "mode": "eval", "data": "train"},
    }
    out = run_dir / "hessian.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    top = eigenvalues[0]
    log_text = f"{math.log(top):.3f}" if top > 0 else "undefined"
    trace_text = f", trace {trace:.4g}" if trace is not None else ""
    print(f"{run_dir}: top eigenvalue {top:.4g} (ln {log_text}){trace_text} -> {out}")
    return 0


def run_landscape(args: argparse.Namespace) -> int:
    from agnostic_sam.analysis import loss_surface
    from agnostic_sam.analysis.plots import plot_landscape_contours, plot_landscape_surfaces
    from agnostic_sam.analysis.runs import check_run_dir, load_run, run_batches, run_loss

    runs = [check_run_dir(r) for r in args.run]
    if args.out is None and len(runs) > 1:
        raise UsageError("--out DIR is required with several --run")
    labels = _labels(runs, args.label)
    _set_threads(args.threads)
    out_dir = Path(args.out) if args.out is not None else runs[0]
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a folder")
    surfaces = []
    for run_dir, label in zip(runs, labels):
        model, cfg = load_run(run_dir, args.device)
        data = run_batches(cfg, args.batches, batch_size=args.batch_size, seed=args.seed)
        surface = loss_surface(model, run_loss(cfg), data, steps=args.steps, span=args.span,
                               seed=args.seed, progress=True)
        surfaces.append({"run": str(run_dir), "label": label, **surface})
        centre = surface["loss"][args.steps // 2][args.steps // 2]
        print(f"{run_dir}: loss {min(min(r) for r in surface['loss']):.4g}..{max(max(r) for r in surface['loss']):.4g}"
              f" on the grid, {centre:.4g} at the centre")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "landscape.json").write_text(json.dumps(
        {"runs": surfaces, "settings": {"steps": args.steps, "span": args.span, "batches": args.batches,
                                        "seed": args.seed, "filter_normalize": True,
                                        "mode": "eval", "data": "train"}}, indent=2) + "\n")
    contour = plot_landscape_contours(surfaces, labels, out_dir / "landscape_contour.png", vmax=args.vmax)
    surface_png = plot_landscape_surfaces(surfaces, labels, out_dir / "landscape_surface.png", vmax=args.vmax)
    print(f"wrote {out_dir / 'landscape.json'}, {contour}, {surface_png}")
    return 0


def run_congruence(args: argparse.Namespace) -> int:
    from agnostic_sam.analysis.plots import plot_congruence
    from agnostic_sam.analysis.runs import check_run_dir, read_metrics

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    runs = [check_run_dir(r, need=("metrics.jsonl",)) for r in args.run]
    labels = _labels(runs, args.label)
    series = {}
    for run_dir, label in zip(runs, labels):
        rows = [r for r in read_metrics(run_dir) if r.get("cos_train_val") is not None]
        if not rows:
            print(f"note: {run_dir} has no cos_train_val in metrics.jsonl (only Agnostic-SAM records it); skipped")
            continue
        series[label] = ([r.get("epoch", i + 1) for i, r in enumerate(rows)],
                         [float(r["cos_train_val"]) for r in rows])
    if not series:
        raise UsageError("no run has cos_train_val in metrics.jsonl: train with --optimizer agnostic-sam")
    plot_congruence(series, out)
    print(f"wrote {out} ({len(series)} run{'s' if len(series) != 1 else ''})")
    return 0
