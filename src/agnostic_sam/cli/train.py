"""`agnostic-sam train [--config FILE.yaml] [flags]`: one training run (see agnostic_sam.train).

Precedence: TrainConfig defaults < the YAML file < flags given on the command line. Flags that
are not given leave the YAML value alone (every flag defaults to argparse.SUPPRESS). With
`--resume`, the run directory's saved config.yaml is the base under the YAML file and the flags,
so `agnostic-sam train --out DIR --resume` continues a run as it was started.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.train.config import LOGGERS, TrainConfig, load_config
from agnostic_sam.yamlio import parse_yaml

__all__ = ["register", "run", "add_train_arguments", "config_from_args", "overrides_from_args"]

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Flags not given stay absent from the namespace (so YAML and saved configs are not overridden).
S = argparse.SUPPRESS
_Group = argparse._ArgumentGroup


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every TrainConfig flag (plus --config) to `parser`; none sets a default."""
    d = TrainConfig()
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of TrainConfig keys")
    _data_arguments(parser.add_argument_group("data"), d)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=S, help=f"model name (default {d.model})")
    g.add_argument("--weights", default=S, help="pretrained weights file")
    g = parser.add_argument_group("optimizer")
    _optimizer_arguments(g, d)
    _method_arguments(g, d)
    _run_arguments(parser.add_argument_group("run"), d)



def _data_arguments(g: _Group, d: TrainConfig) -> None:
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--dataset", default=S, help=f"data set name (default {d.dataset})")
    g.add_argument("--data-dir", default=S, help="folder holding the data sets")
    g.add_argument("--download", action=on_off, default=S,
                   help="fetch missing data (needs a network)")
    g.add_argument("--noise-rate", type=float, default=S, help="symmetric label noise in [0, 1)")
    g.add_argument("--val-fraction", type=float, default=S,
                   help="evaluate on this held-out fraction of the training set instead of test")
    g.add_argument("--train-fraction", type=float, default=S,
                   help="train on a class-stratified subset of this fraction (seeded by --seed)")
    g.add_argument("--val-noise", action=on_off, default=S,
                   help="the held-out part (--val-fraction) carries the training labels' noise")
    g.add_argument("--image-size", type=int, default=S, help="image side in pixels")
    g.add_argument("--num-classes", type=int, default=S, help="synthetic data only: class count")
    g.add_argument("--train-size", type=int, default=S,
                   help="synthetic data only: training examples")
    g.add_argument("--test-size", type=int, default=S, help="synthetic data only: test examples")


def _optimizer_arguments(g: _Group, d: TrainConfig) -> None:
    """The method, the base optimizer, the budget and the schedule."""
    # No list here: the registry imports torch, which `train --help` does not need.
    g.add_argument("--optimizer", default=S, metavar="METHOD",
                   help=f"the training method (default {d.optimizer}); `agnostic-sam methods` "
                   "lists every one with its settings")
    g.add_argument("--base-optimizer", default=S, choices=("sgd", "adamw"),
                   help=f"the optimizer that takes the step (default {d.base_optimizer})")
    g.add_argument("--epochs", type=int, default=S, help=f"default {d.epochs}")
    g.add_argument("--budget", default=S, choices=("epochs", "passes"),
                   help="epochs: every method trains --epochs epochs; passes: every method gets "
                   "the forward + backward work of --budget-reference in --epochs epochs (a "
                   "cheaper method takes more steps, its schedule stretched) (default epochs)")
    g.add_argument("--budget-reference", default=S, metavar="METHOD",
                   help=f"the method whose cost sets a passes budget (default "
                   f"{d.budget_reference})")
    g.add_argument("--batch-size", type=int, default=S, help=f"|B| (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=S,
                   help=f"peak lr of the cosine schedule (default {d.lr})")
    g.add_argument("--warmup-epochs", type=float, default=S,
                   help="linear warm-up to the peak lr before the cosine, fractions allowed "
                   f"(default {d.warmup_epochs:g})")
    g.add_argument("--momentum", type=float, default=S, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S,
                   help="SGD Nesterov momentum")
    g.add_argument("--betas", type=float, nargs=2, default=S, metavar=("B1", "B2"),
                   help=f"AdamW betas (default {d.betas[0]} {d.betas[1]})")
    g.add_argument("--adam-eps", type=float, default=S, help=f"AdamW eps (default {d.adam_eps:g})")
    g.add_argument("--weight-decay", type=float, default=S, help=f"default {d.weight_decay}")
    g.add_argument("--label-smoothing", type=float, default=S, help=f"default {d.label_smoothing}")
    g.add_argument("--max-grad-norm", type=float, default=S,
                   help="clip the final gradient (the one the base optimizer steps with) to this "
                   "global norm; clipping before the ascent would be a no-op (it is normalized)")


def _method_arguments(g: _Group, d: TrainConfig) -> None:
    """The method's own settings, the radius shorthands and the batch split."""
    g.add_argument("--method-args", nargs="+", default=S, metavar="KEY=VALUE",
                   type=_method_arg,
                   help="the method's own settings (e.g. alpha=0.4 k=5), values in YAML; "
                   "`agnostic-sam methods` lists each method's settings")
    g.add_argument("--rho", type=float, default=S,
                   help="radius of SAM and most of the family (default: the method's)")
    g.add_argument("--rho1", type=float, default=S,
                   help="Agnostic-SAM B^t radius (default: the method's, 0.1)")
    g.add_argument("--rho2", type=float, default=S,
                   help="Agnostic-SAM B^v radius (default: the method's, 0.05)")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=S,
                   help="ASAM scale-invariant radius")
    g.add_argument("--split-ratio", type=float, default=S,
                   help=f"r = |B^t|/|B| (default {d.split_ratio})")
    g.add_argument("--split", default=S,
                   help="batch (split each batch) or fixed (split the data once)")
    g.add_argument("--perturbation", default=S, help="local or synced (DDP ascent passes)")


def _run_arguments(g: _Group, d: TrainConfig) -> None:
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--seed", type=int, default=S, help=f"default {d.seed}")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--workers", type=int, default=S, help="DataLoader worker processes")
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads")
    g.add_argument("--out", default=S,
                   help="run directory (default runs/<dataset>-<model>-<optimizer>-seed<seed>)")
    g.add_argument("--resume", action="store_true", default=S,
                   help="continue from --out/checkpoint.pt")
    g.add_argument("--amp", default=S, help="none, bf16 or fp16")
    g.add_argument("--compile", action=on_off, default=S, help="torch.compile the model")
    g.add_argument("--channels-last", action=on_off, default=S)
    g.add_argument("--no-check-finite", dest="check_finite", action="store_false", default=S,
                   help="no non-finite check per step (a diverged epoch then stops the run)")
    g.add_argument("--sync-bn", action=on_off, default=S, help="SyncBatchNorm under DDP")
    g.add_argument("--accumulate", type=int, default=S, help="micro-batches per closure pass")
    g.add_argument("--max-steps", type=int, default=S, help="stop after this many optimizer steps")
    g.add_argument("--log", nargs="+", choices=LOGGERS, default=S,
                   help="also log per step and per epoch to TensorBoard and/or Weights & Biases")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)


def _saved_config(out: str | None) -> dict[str, Any] | None:
    """A run directory's saved config (config.yaml, else the checkpoint's copy) as a mapping."""
    from agnostic_sam.train.rundir import RunDir

    saved = RunDir(out).saved_config() if out else None
    return dataclasses.asdict(saved) if saved is not None else None


def _method_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value), the value read as YAML (``0.4``, ``5``, ``true``,
    ``null``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), parse_yaml(value, f"--method-args {key.strip()}")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keys given on the command line (flags not given are absent)."""
    out = {key: value for key, value in vars(args).items() if key in _FIELDS}
    if "method_args" in out:
        pairs = out["method_args"]
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UsageError(f"--method-args sets {', '.join(twice)} more than once")
        out["method_args"] = dict(pairs)
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from defaults < (saved config.yaml when resuming) < --config < given flags."""
    overrides = overrides_from_args(args)
    config_file = getattr(args, "config", None)
    cfg = load_config(config_file, overrides)
    if cfg.resume:
        saved = _saved_config(cfg.out)
        if saved is not None:
            cfg = load_config(config_file, overrides, base=saved)
            cfg.resume = True
    return cfg


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one model with one method (SGD, SAM, Agnostic-SAM, ...)",
        description="Train one run; writes config.yaml, metrics.jsonl, checkpoint.pt and "
        "result.json to --out. Flags override --config; --resume continues a run exactly.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agnostic_sam.train.distributed import launch_rank
    from agnostic_sam.train.loop import train

    cfg = config_from_args(args)
    result = train(cfg)
    if launch_rank() != 0:  # under torchrun, rank 0 reports for all
        return 0
    print(
        f"{cfg.out}: final {result['eval_split']} acc {result['final_test_acc']:.2f}%  "
        f"best {result['best_test_acc']:.2f}%  "
        f"({result['steps']} steps, {result['total_seconds']:.1f}s)"
    )
    return 0
