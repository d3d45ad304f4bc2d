"""Step-time benchmark: CIFAR ResNet-18, batch 64, 32x32, one CPU thread.

Times SGD, SAM and Agnostic-SAM (full, simpler) interleaved (agnostic_sam.bench), prints the
table and checks the targets on the ratio of median step times to SAM:

    Agnostic-SAM / SAM <= 1.03   (sample-count floor 1.00: 2B images through fwd+bwd per step)
    simpler / SAM      <= 0.88   (floor (1 + r) / 2 = 0.85 with r = 0.7)

With --breakdown it also times one forward+backward pass at each sub-batch size (B, n_t, n_v)
and predicts every method's step from its passes; the rest (measured - predicted) is the
optimizer's own per-step cost (norms, perturbation, copies, zero_grad, the split), or the
per-sample slowdown of small batches if the pass times show it.

    python benchmarks/step_time.py [--rounds 5 --steps 3 --breakdown --out runs/step_time]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from agnostic_sam.bench import BenchConfig, format_markdown, run_bench, write_report
from agnostic_sam.methods import get_method

TARGETS = {"agnostic-sam": 1.03, "agnostic-sam-simpler": 0.88}


def pass_times(cfg: BenchConfig, repeats: int) -> dict[int, float]:
    """Fastest ms of one forward+backward pass (no optimizer) for each sub-batch size.

    The minimum, not the median: other processes on a shared CPU only ever add time.
    """
    from agnostic_sam.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=cfg.num_classes, in_channels=cfg.channels,
                         image_size=cfg.image_size).train()
    x = torch.randn(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,))
    n_t, n_v = cfg.split_sizes()
    sizes = [cfg.batch_size, n_t, n_v]
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(repeats + 1):  # the first repeat warms up every shape
        for n in sizes:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(model(x[:n]), y[:n]).backward()
            if rep:
                samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: min(v) for n, v in samples.items()}


def optimizer_only_times(cfg: BenchConfig, repeats: int) -> dict[str, float]:
    """Fastest ms of one optimizer step whose closures only hand over fixed gradients.

    What is left is the optimizer's own arithmetic (clone of theta, norms, perturbations,
    restores, the base SGD step) and its bookkeeping, without any forward or backward pass.
    """
    from agnostic_sam.methods import create_optimizer, get_method
    from agnostic_sam.methods.step import step_closures
    from agnostic_sam.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=cfg.num_classes, in_channels=cfg.channels,
                         image_size=cfg.image_size).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Gradients of norm ~1 that stay put: the optimizers scale p.grad in place, and rho * g /
    # ||g|| has norm rho, so values neither blow up nor decay to denormals over the repeats.
    grads = [torch.randn_like(p) / len(params) ** 0.5 for p in params]
    loss = torch.zeros(())
    per_sample_losses = torch.zeros(cfg.batch_size)

    def closure_of(per_sample: bool):
        # the record's closure protocol: a mean loss, or per-sample losses (ESAM)
        def closure(index: torch.Tensor | None = None, backward: bool = True) -> torch.Tensor:
            if backward:
                for p, g in zip(params, grads):
                    p.grad = g
            if not per_sample:
                return loss
            return per_sample_losses if index is None else per_sample_losses[index]

        return closure

    def step_of(name: str):
        info = get_method(name)
        opt = create_optimizer(
            name, params, torch.optim.SGD,
            dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
            radii={"rho": cfg.rho, "rho1": cfg.rho1, "rho2": cfg.rho2}, model=model)
        closures = step_closures(info, lambda part: closure_of(info.closure == "per-sample"),
                                 None, parts=(None, None))
        return lambda: opt.step(*closures)

    steps = {name: step_of(name) for name in cfg.methods}
    best = dict.fromkeys(steps, float("inf"))
    for rep in range(repeats + 1):  # interleaved; the first repeat is warm-up
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if rep:
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="also time single fwd+bwd passes")
    ap.add_argument("--out", default="runs/step_time")
    args = ap.parse_args(argv)

    cfg = BenchConfig(model=args.model, batch_size=args.batch_size, channels=3, image_size=32,
                      num_classes=10, device="cpu", threads=args.threads, rounds=args.rounds,
                      steps=args.steps, warmup=args.warmup)
    result = run_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    misses = []
    for name, limit in TARGETS.items():
        m = result["methods"][name]
        ok = m["ratio_to_sam"] <= limit
        m["target_ratio_to_sam"] = limit
        m["target_met"] = ok
        if not ok:
            misses.append(name)

    extra = ""
    if args.breakdown:
        torch.set_num_threads(args.threads)
        passes = pass_times(cfg, repeats=max(args.rounds, 3))
        b, (n_t, n_v) = cfg.batch_size, cfg.split_sizes()
        size = {"B": b, "B^t": n_t, "B^v": n_v}
        predicted = {name: sum(passes[size[part]] for part in get_method(name).passes)
                     for name in cfg.methods}
        rows = ["", "## Breakdown: forward+backward passes vs whole steps", "",
                "| batch | fwd+bwd ms | ms per image |", "|---|---|---|"]
        rows += [f"| {n} | {t:.1f} | {t / n:.3f} |" for n, t in passes.items()]
        opt_only = optimizer_only_times(cfg, repeats=max(3 * args.rounds, 10))
        rows += ["", "| method | fastest step ms | passes only ms | rest ms | optimizer only ms |",
                 "|---|---|---|---|---|"]
        for name, pred in predicted.items():
            meas = result["methods"][name]["ms_per_step"]["min"]
            rows.append(f"| {name} | {meas:.1f} | {pred:.1f} | {meas - pred:.1f} | "
                        f"{opt_only[name]:.1f} |")
            result["methods"][name]["passes_only_ms"] = pred
            result["methods"][name]["optimizer_only_ms"] = opt_only[name]
        result["pass_ms"] = {str(n): t for n, t in passes.items()}
        extra = "\n".join(rows) + "\n"

    json_path, md_path = write_report(result, args.out, stem="step_time",
                                      title="Step time, CIFAR ResNet-18")
    targets = "\n".join(
        f"- {n}: ratio of median step times to SAM {m['ratio_to_sam']:.3f} (target <= {lim}): "
        f"{'met' if m['target_met'] else 'MISSED'}; paired per-round range "
        f"{m['ratio_to_sam_paired']['min']:.3f}-{m['ratio_to_sam_paired']['max']:.3f}, "
        f"ratio of fastest steps {m['ratio_to_sam_min']:.3f}, sample-count floor "
        f"{m['sample_ratio_to_sam']:.3f}"
        for n, lim in TARGETS.items() for m in [result["methods"][n]])
    md_path.write_text(md_path.read_text() + "\n## Targets\n\n" + targets + "\n" + extra)
    print(format_markdown(result, "Step time, CIFAR ResNet-18"))
    print(targets)
    print(extra)
    print(f"wrote {json_path} and {md_path}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
