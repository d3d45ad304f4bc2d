"""`agnostic-sam bench`: time SGD, SAM and Agnostic-SAM steps side by side (see agnostic_sam.bench)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time one optimizer step of SGD, SAM and Agnostic-SAM (full, simpler)",
        description="Interleaved step-time benchmark on a fixed synthetic batch resident on the "
        "device. Writes bench.json and bench.md to --out.",
    )
    p.add_argument("--model", default="resnet18", help="a name from the model registry")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (fixed so timings compare); 0 keeps torch's default")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the methods")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    p.add_argument("--methods", default="sgd,sam,agnostic-sam,agnostic-sam-simpler",
                   help="comma-separated subset of sgd,sam,agnostic-sam,agnostic-sam-simpler")
    p.add_argument("--split-ratio", type=float, default=0.7, help="|B^t| / |B|")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new round after this many seconds (warm-up included)")
    p.add_argument("--out", default="runs/bench", help="directory for bench.json and bench.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agnostic_sam.bench import BenchConfig, format_markdown, run_bench, write_report

    cfg = BenchConfig(
        model=args.model, batch_size=args.batch_size, channels=args.channels,
        image_size=args.image_size, num_classes=args.num_classes, device=args.device,
        threads=args.threads or None, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        split_ratio=args.split_ratio, seed=args.seed, time_budget_s=args.time_budget,
    )
    result = run_bench(cfg, log=lambda line: print(line, file=sys.stderr))
    json_path, md_path = write_report(result, args.out)
    print(format_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0
