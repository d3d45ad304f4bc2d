"""Device benchmark: WRN-28-10, batch 128, bf16 autocast, channels-last, beside the paper's Table 6.

Times SGD, SAM, Agnostic-SAM and Agnostic-SAM (simpler) on a synthetic CIFAR-100-shaped batch
resident on the GPU (``agnostic-sam bench``), first eagerly and then, if the time budget leaves
room, with ``torch.compile``. Every configuration runs in its own child process under a
timeout, so a crash, a hang or a slow compile costs that configuration only; results that exist
are always written. Prints the ratio to SAM and the seconds an epoch of 50,000 images takes
(50000 / 128 steps of the median step time) beside the paper's minutes per epoch on CIFAR-100.

    python benchmarks/gpu_wrn.py --out $OUT                      # H200, ~5 minutes
    python benchmarks/gpu_wrn.py --model wrn28_10_mini --device cpu --steps 2 --out /tmp/w
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
EPOCH_IMAGES = 50_000  # CIFAR-100 training set
# Paper, Table 6: WRN-28-10 on CIFAR-100, minutes per epoch (mean over 3 runs).
PAPER_MIN_PER_EPOCH = {"sam": 2.90, "agnostic-sam": 4.78, "agnostic-sam-simpler": 3.56,
                       "agnostic-sam (non-overlap)": 2.86}
METHODS = ("sgd", "sam", "agnostic-sam", "agnostic-sam-simpler")


def run_config(name: str, flags: list[str], args: argparse.Namespace, timeout_s: float) -> dict:
    """Run one configuration in a child process; return its result or what went wrong."""
    out = Path(args.out) / name
    cmd = [sys.executable, "-m", "agnostic_sam", "bench", "--model", args.model,
           "--batch-size", str(args.batch_size), "--image-size", "32", "--channels", "3",
           "--num-classes", "100", "--device", args.device, "--amp", args.amp, "--channels-last",
           "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", "1" if args.device == "cpu" else "0",
           "--time-budget", f"{max(timeout_s - 30, 5):.0f}", "--out", str(out),
           *flags]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    print(f"[{name}] {' '.join(cmd[1:])} (timeout {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "timeout", "seconds": time.perf_counter() - t0,
                "log_tail": tail[-1500:]}
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "bench.json").exists():
        return {"status": f"failed (exit {proc.returncode})", "seconds": seconds,
                "log_tail": (proc.stderr or proc.stdout)[-1500:]}
    return {"status": "ok", "seconds": seconds,
            "result": json.loads((out / "bench.json").read_text())}


def summarize(configs: dict[str, dict], batch_size: int, model: str) -> tuple[dict, str]:
    """Per configuration and method: ms/step, ratio to SAM, seconds and minutes per epoch."""
    steps_per_epoch = EPOCH_IMAGES / batch_size
    summary: dict = {"steps_per_epoch": steps_per_epoch, "paper_min_per_epoch": PAPER_MIN_PER_EPOCH,
                     "configs": {}}
    lines = [f"# {model} step time vs the paper's WRN-28-10 (Table 6, CIFAR-100)", "",
             f"Epoch = {EPOCH_IMAGES} images = {steps_per_epoch:.2f} steps of batch {batch_size}; "
             "ratio = median step time / SAM's (paired per-round range in brackets).", ""]
    paper_sam = PAPER_MIN_PER_EPOCH["sam"]
    for name, c in configs.items():
        lines.append(f"## {name}: {c['status']} ({c['seconds']:.0f} s)")
        lines.append("")
        if c["status"] != "ok":
            lines += ["```", c.get("log_tail", "").strip()[-800:], "```", ""]
            summary["configs"][name] = {k: v for k, v in c.items() if k != "result"}
            continue
        res = c["result"]
        hw = res["hardware"]
        lines += [f"`{res['command']}`  ", f"{hw['gpu'] or hw['cpu']}, torch {hw['torch']}, "
                  f"{res['rounds_completed']} rounds", "",
                  "| method | ms/step | ratio to SAM | s/epoch | min/epoch | paper min/epoch "
                  "| paper ratio | peak MiB |", "|---|---|---|---|---|---|---|---|"]
        rows = {}
        for m, r in res["methods"].items():
            ms = r["ms_per_step"]["median"]
            sec = ms / 1e3 * steps_per_epoch
            paper = PAPER_MIN_PER_EPOCH.get(m)
            rows[m] = {"ms_per_step": ms, "ratio_to_sam": r["ratio_to_sam"],
                       "ratio_to_sam_paired": r["ratio_to_sam_paired"], "seconds_per_epoch": sec,
                       "paper_min_per_epoch": paper,
                       "paper_ratio_to_sam": None if paper is None else paper / paper_sam,
                       "peak_bytes": r["peak_bytes"], "images_per_second": r["images_per_second"]}
            ratio = "-" if r["ratio_to_sam"] is None else (
                f"{r['ratio_to_sam']:.3f} ({r['ratio_to_sam_paired']['min']:.3f}-"
                f"{r['ratio_to_sam_paired']['max']:.3f})")
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
            lines.append(f"| {m} | {ms:.2f} | {ratio} | {sec:.1f} | {sec / 60:.3f} | "
                         f"{'-' if paper is None else f'{paper:.2f}'} | "
                         f"{'-' if paper is None else f'{paper / paper_sam:.3f}'} | {peak} |")
        lines.append("")
        summary["configs"][name] = {"status": "ok", "seconds": c["seconds"], "methods": rows,
                                    "command": res["command"], "hardware": hw}
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_wrn.json/.md (e.g. $OUT)")
    ap.add_argument("--model", default="wrn28_10")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="whole-script wall-clock budget; "
                         "configurations that no longer fit are skipped")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile configuration")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plan = [("eager", [], 30.0)]  # (name, extra flags, minimum seconds worth starting with)
    if not args.no_compile:
        plan.append(("compile", ["--compile"], 90.0))
    configs: dict[str, dict] = {}
    for i, (name, flags, minimum) in enumerate(plan):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < minimum:
            configs[name] = {"status": f"skipped ({left:.0f} s of budget left)", "seconds": 0.0}
            continue
        # Eager gets at most 60 % of what is left so a compile run still has time after it.
        share = left * 0.6 if i + 1 < len(plan) else left
        try:
            configs[name] = run_config(name, flags, args, timeout_s=share - 5)
        except Exception as exc:  # keep going: the other configuration may still work
            configs[name] = {"status": f"error: {type(exc).__name__}: {exc}", "seconds": 0.0}
        summary, md = summarize(configs, args.batch_size, args.model)
        Path(args.out, "gpu_wrn.json").write_text(json.dumps(summary, indent=2) + "\n")
        Path(args.out, "gpu_wrn.md").write_text(md)
    summary, md = summarize(configs, args.batch_size, args.model)
    Path(args.out, "gpu_wrn.json").write_text(json.dumps(summary, indent=2) + "\n")
    Path(args.out, "gpu_wrn.md").write_text(md)
    print(md)
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out}/gpu_wrn.json and gpu_wrn.md")
    return 0 if any(c["status"] == "ok" for c in configs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
