"""`agnostic-sam hessian | landscape | congruence`: analyses of finished
training runs (paper Sec. 5.3).

All three read run directories written by `agnostic-sam train`. `hessian` and `landscape` use the
run's training loss on the first N batches of its training set (see `agnostic_sam.analysis.runs`);
`congruence` reads `cos_train_val` from each run's `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from agnostic_sam.errors import UsageError

__all__ = ["check_output_folder", "register", "run_congruence", "run_hessian", "run_landscape"]

# Bounds of the flags no analysis can use (typos): refused before a run is loaded.
MAX_BATCHES = 10**6
MAX_BATCH_SIZE = 10**7
MAX_THREADS = 4096
# Result folders there are not folders a user means: writes fail or vanish.
SPECIAL_ROOTS = (Path("/proc"), Path("/sys"))


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_hessian(subparsers)
    _register_landscape(subparsers)
    _register_congruence(subparsers)


def _register_hessian(subparsers: argparse._SubParsersAction) -> None:
    h = subparsers.add_parser(
        "hessian", help="top Hessian eigenvalues and trace of a trained model",
        description="Power iteration (top-k eigenvalues, largest magnitude) and Hutchinson trace "
                    "of the Hessian of the run's training loss on its first N training batches; "
                    "writes DIR/hessian.json.")
    h.add_argument("--run", required=True, metavar="DIR",
                   help="run directory made by `agnostic-sam train`")
    h.add_argument("--batches", type=int, default=4, metavar="N",
                   help="training batches to use (default 4)")
    h.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="default: the run's batch size")
    h.add_argument("--k", type=int, default=1, metavar="K",
                   help="number of top eigenvalues (default 1)")
    h.add_argument("--iters", type=int, default=100, metavar="N",
                   help="max power iterations per eigenvalue")
    h.add_argument("--tol", type=float, default=1e-4,
                   help="relative change that stops power iteration")
    h.add_argument("--trace-samples", type=int, default=100, metavar="N",
                   help="Hutchinson samples for the trace; 0 skips it (default 100)")
    h.add_argument("--seed", type=int, default=0, metavar="S")
    h.add_argument("--device", default="auto", metavar="D",
                   help="auto, cpu, cuda, cuda:N (default auto)")
    h.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's)")
    h.set_defaults(func=run_hessian)


def _register_landscape(subparsers: argparse._SubParsersAction) -> None:
    ls = subparsers.add_parser(
        "landscape", help="filter-normalized 2-D loss landscapes, several runs side by side",
        description="Loss on a grid theta + a*d1 + b*d2 along two filter-normalized random "
                    "directions (the same seed for every run); writes landscape.json, "
                    "landscape_contour.png and landscape_surface.png with one shared colour scale.")
    ls.add_argument("--run", required=True, action="append", metavar="DIR",
                    help="run directory (repeatable)")
    ls.add_argument("--label", action="append", default=None, metavar="NAME",
                    help="panel title per --run, in order (default: the run's optimizer)")
    ls.add_argument("--out", default=None, metavar="DIR",
                    help="output folder (default: the run dir; "
                    "required with several runs)")
    ls.add_argument("--steps", type=int, default=21, metavar="N",
                    help="grid points per axis (default 21)")
    ls.add_argument("--span", type=float, default=1.0, metavar="X",
                    help="grid covers [-X, X]^2 (default 1)")
    ls.add_argument("--batches", type=int, default=4, metavar="N",
                    help="training batches to use (default 4)")
    ls.add_argument("--batch-size", type=int, default=None, metavar="B",
                    help="default: the run's batch size")
    ls.add_argument("--vmax", type=float, default=None, help="clip the colour scale at this loss")
    ls.add_argument("--seed", type=int, default=0, metavar="S",
                    help="seed of the directions (default 0)")
    ls.add_argument("--device", default="auto", metavar="D",
                    help="auto, cpu, cuda, cuda:N (default auto)")
    ls.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch CPU threads (default: torch's)")
    ls.set_defaults(func=run_landscape)


def _register_congruence(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser(
        "congruence", help="plot cos(train grad, val grad) over epochs",
        description="One line per run: the epoch mean of cos(grad L_{B^t}, grad L_{B^v}) that "
                    "Agnostic-SAM records in metrics.jsonl (runs without it are skipped with a "
                    "note).")
    c.add_argument("--run", required=True, action="append", metavar="DIR",
                   help="run directory (repeatable)")
    c.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="legend entry per --run")
    c.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    c.set_defaults(func=run_congruence)


def _optimizer_of(run_dir: Path) -> str | None:
    from agnostic_sam.yamlio import read_yaml

    try:
        config = read_yaml(run_dir / "config.yaml")
    except UsageError:
        return None
    optimizer = config.get("optimizer")
    return optimizer if isinstance(optimizer, str) else None


def _labels(runs: list[Path], given: list[str] | None) -> list[str]:
    """Given labels, else each run's optimizer; runs sharing an optimizer add their folder name."""
    if given is not None:
        if len(given) != len(runs):
            raise UsageError(f"{len(given)} --label for {len(runs)} --run; "
                             "give one per run or none")
        return list(given)
    names = [_optimizer_of(r) or r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.name})" for n, r in zip(names, runs)]


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _check_common(args: argparse.Namespace) -> None:
    """The flags hessian and landscape share, checked before any run is loaded."""
    from agnostic_sam.analysis.common import check_count, check_seed
    from agnostic_sam.train.build import resolve_device

    check_count("--batches", args.batches, 1, MAX_BATCHES, UsageError)
    if args.batch_size is not None:
        check_count("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE, UsageError)
    check_seed(args.seed, "--seed", UsageError)
    if args.threads is not None:
        check_count("--threads", args.threads, 1, MAX_THREADS, UsageError)
    resolve_device(args.device)


def check_output_folder(flag: str, path: str | Path) -> Path:
    """`path` as a folder results can be written to (it may not exist yet), else UsageError
    naming `flag`: an empty name, an existing file, a path under a file, a read-only, forbidden
    or special (/proc, /sys) place. Checked before any work, so a failure costs nothing."""
    text = str(path)
    if not text.strip():
        raise UsageError(f"{flag} must name a folder, got an empty string")
    from agnostic_sam.train.rundir import check_path_names

    check_path_names(flag, text)
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a folder")
    real = ancestor.resolve()
    if any(real == root or root in real.parents for root in SPECIAL_ROOTS):
        raise UsageError(f"{flag} {path}: {real} is a special file system, not a place for results")
    if not os.access(ancestor, os.W_OK | os.X_OK) or os.statvfs(ancestor).f_flag & os.ST_RDONLY:
        raise UsageError(f"{flag} {path}: cannot write to {ancestor} (read-only or no permission)")
    return path


def _write_json(path: Path, value: Any) -> None:
    """Strict JSON (non-finite numbers as null), written atomically: whole or not at all."""
    from agnostic_sam.train.checkpoint import atomic_write_text
    from agnostic_sam.train.rundir import strict_json

    try:
        atomic_write_text(path, strict_json(value, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_figure(plot: Any, *args: Any, **kwargs: Any) -> Path:
    try:
        return plot(*args, **kwargs)
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename or args[-1]}: "
                         f"{exc.strerror or exc}") from None


def run_hessian(args: argparse.Namespace) -> int:
    from agnostic_sam.analysis import hessian_trace, top_eigenvalues
    from agnostic_sam.analysis.common import check_count, check_real
    from agnostic_sam.analysis.hessian import MAX_EIGENVALUES, MAX_ITERATIONS
    from agnostic_sam.analysis.runs import check_run_dir, load_run, run_batches, run_loss

    _check_common(args)
    check_count("--k", args.k, 1, MAX_EIGENVALUES, UsageError)
    check_count("--iters", args.iters, 1, MAX_ITERATIONS, UsageError)
    check_real("--tol", args.tol, 0.0, error=UsageError)
    check_count("--trace-samples", args.trace_samples, 0, MAX_ITERATIONS, UsageError)
    run_dir = check_run_dir(args.run)
    check_output_folder("--run", run_dir)
    _set_threads(args.threads)
    start = time.perf_counter()
    model, cfg = load_run(run_dir, args.device)
    data = run_batches(cfg, args.batches, batch_size=args.batch_size, seed=args.seed)
    loss_fn = run_loss(cfg)
    eigenvalues = top_eigenvalues(model, loss_fn, data, k=args.k, iters=args.iters, tol=args.tol,
                                  seed=args.seed, progress=True)
    trace = (hessian_trace(model, loss_fn, data, samples=args.trace_samples, seed=args.seed,
                           progress=True)
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
                     "seed": args.seed, "device": str(param.device),
                     "dtype": str(param.dtype).replace("torch.", ""),
                     "loss": "cross_entropy", "label_smoothing": float(loss_fn.label_smoothing),  # type: ignore[arg-type]
                     "mode": "eval", "data": "train"},
    }
    out = run_dir / "hessian.json"
    _write_json(out, result)
    top = eigenvalues[0]
    log_text = f"{math.log(top):.3f}" if top > 0 else "undefined"
    trace_text = f", trace {trace:.4g}" if trace is not None else ""
    print(f"{run_dir}: top eigenvalue {top:.4g} (ln {log_text}){trace_text} -> {out}")
    return 0


def run_landscape(args: argparse.Namespace) -> int:
    from agnostic_sam.analysis import loss_surface
    from agnostic_sam.analysis.common import check_count, check_real
    from agnostic_sam.analysis.landscape import MAX_STEPS
    from agnostic_sam.analysis.plots import plot_landscape_contours, plot_landscape_surfaces
    from agnostic_sam.analysis.runs import check_run_dir, load_run, run_batches, run_loss

    _check_common(args)
    check_count("--steps", args.steps, 2, MAX_STEPS, UsageError)
    check_real("--span", args.span, 0.0, low_open=True, error=UsageError)
    if args.vmax is not None:
        check_real("--vmax", args.vmax, 0.0, low_open=True, error=UsageError)
    runs = [check_run_dir(r) for r in args.run]
    if args.out is None and len(runs) > 1:
        raise UsageError("--out DIR is required with several --run")
    labels = _labels(runs, args.label)
    out_dir = check_output_folder("--out" if args.out is not None else "--run",
                                  args.out if args.out is not None else runs[0])
    _set_threads(args.threads)
    surfaces = []
    for run_dir, label in zip(runs, labels):
        model, cfg = load_run(run_dir, args.device)
        data = run_batches(cfg, args.batches, batch_size=args.batch_size, seed=args.seed)
        surface = loss_surface(model, run_loss(cfg), data, steps=args.steps, span=args.span,
                               seed=args.seed, progress=True)
        surfaces.append({"run": str(run_dir), "label": label, **surface})
        centre = surface["loss"][args.steps // 2][args.steps // 2]
        print(f"{run_dir}: loss {min(min(r) for r in surface['loss']):.4g}.."
              f"{max(max(r) for r in surface['loss']):.4g}"
              f" on the grid, {centre:.4g} at the centre")
    _write_json(out_dir / "landscape.json",
                {"runs": surfaces,
                 "settings": {"steps": args.steps, "span": args.span, "batches": args.batches,
                                                "seed": args.seed, "filter_normalize": True,
                                                "mode": "eval", "data": "train"}})
    contour = _write_figure(plot_landscape_contours, surfaces, labels,
                            out_dir / "landscape_contour.png",
                            vmax=args.vmax)
    surface_png = _write_figure(plot_landscape_surfaces, surfaces, labels,
                                out_dir / "landscape_surface.png",
                                vmax=args.vmax)
    print(f"wrote {out_dir / 'landscape.json'}, {contour}, {surface_png}")
    return 0


def run_congruence(args: argparse.Namespace) -> int:
    from agnostic_sam.analysis.plots import plot_congruence
    from agnostic_sam.analysis.runs import check_run_dir, read_metrics
    from agnostic_sam.train.rundir import check_path_names

    check_path_names("--out", args.out)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder, not a .png file")
    check_output_folder("--out", out.parent)
    runs = [check_run_dir(r, need=("metrics.jsonl",)) for r in args.run]
    labels = _labels(runs, args.label)
    series = {}
    for run_dir, label in zip(runs, labels):
        rows = [r for r in read_metrics(run_dir) if r.get("cos_train_val") is not None]
        if not rows:
            print(f"note: {run_dir} has no cos_train_val in metrics.jsonl (only Agnostic-SAM "
                  "records it); skipped")
            continue
        values = [r["cos_train_val"] for r in rows]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise UsageError(f"{run_dir / 'metrics.jsonl'}: cos_train_val {bad[0]!r} is not a "
                             "number; the file is damaged")
        series[label] = ([r.get("epoch", i + 1) for i, r in enumerate(rows)],
                         [float(v) for v in values])
    if not series:
        raise UsageError("no run has cos_train_val in metrics.jsonl: train with --optimizer "
                         "agnostic-sam")
    _write_figure(plot_congruence, series, out)
    print(f"wrote {out} ({len(series)} run{'s' if len(series) != 1 else ''})")
    return 0
