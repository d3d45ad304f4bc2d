"""`agnostic-sam bench`: time SGD, SAM and Agnostic-SAM steps side by side (see agnostic_sam.bench).

Every flag's default is the `BenchConfig` field's; the config checks every value (one line,
exit 2) before the model is built, and the output folder is checked before the first step.
"""

from __future__ import annotations

import argparse
import sys

from agnostic_sam.bench.timing import BenchConfig
from agnostic_sam.cli.analysis import check_output_folder
from agnostic_sam.errors import UsageError

__all__ = ["register", "run"]

DEFAULT_OUT = "runs/bench"


def register(subparsers: argparse._SubParsersAction) -> None:
    d = BenchConfig()
    p = subparsers.add_parser(
        "bench",
        help="time one optimizer step of SGD, SAM and Agnostic-SAM (full, simpler)",
        description="Interleaved step-time benchmark on a fixed synthetic batch resident on the "
        "device. Writes bench.json and bench.md to --out.",
    )
    p.add_argument("--model", default=d.model,
                   help=f"a name from the model registry (default {d.model})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"|B| (default {d.batch_size})")
    p.add_argument("--image-size", type=int, default=d.image_size, help=f"default {d.image_size}")
    p.add_argument("--channels", type=int, default=d.channels, help=f"default {d.channels}")
    p.add_argument("--num-classes", type=int, default=d.num_classes,
                   help=f"default {d.num_classes}")
    p.add_argument("--device", default=d.device,
                   help=f"cpu, cuda, cuda:N or auto (default {d.device})")
    p.add_argument("--threads", type=int, default=d.threads or 0,
                   help=f"torch CPU threads (fixed so timings compare; default {d.threads}); "
                        "0 keeps torch's default")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=d.amp)
    p.add_argument("--channels-last", action="store_true", default=d.channels_last)
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="torch.compile the model")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help=f"interleaved rounds over the methods (default {d.rounds})")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"timed steps per method per round (default {d.steps})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed steps per method (default {d.warmup})")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated subset of {','.join(d.methods)} (default: all)")
    p.add_argument("--split-ratio", type=float, default=d.split_ratio,
                   help=f"|B^t| / |B| (default {d.split_ratio})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-budget", type=float, default=d.time_budget_s, metavar="SECONDS",
                   help="start no new round after this many seconds (warm-up included)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for bench.json and bench.md (default {DEFAULT_OUT})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agnostic_sam.bench import format_markdown, run_bench, write_report

    cfg = BenchConfig(
        model=args.model, batch_size=args.batch_size, channels=args.channels,
        image_size=args.image_size, num_classes=args.num_classes, device=args.device,
        threads=args.threads or None, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        split_ratio=args.split_ratio, seed=args.seed, time_budget_s=args.time_budget,
    )
    cfg.validate()
    check_output_folder("--out", args.out)
    result = run_bench(cfg, log=lambda line: print(line, file=sys.stderr))
    try:
        json_path, md_path = write_report(result, args.out)
    except OSError as exc:
        raise UsageError(f"cannot write the report to --out {args.out}: "
                         f"{exc.strerror or exc}") from None
    print(format_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0
