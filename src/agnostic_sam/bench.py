r"""Step-time benchmark: SGD, SAM and Agnostic-SAM (full and simpler) side by side.

Samples through forward + backward per optimizer step, with ``n_t = round(r B)`` and
``n_v = B - n_t`` (the split of :func:`agnostic_sam.split_batch`):

.. math::

    \text{SGD}: B,\quad \text{SAM}: 2B,\quad
    \text{Agnostic-SAM}: \underbrace{n_t + n_v}_{\theta} + \underbrace{n_v}_{\tilde\theta^v}
        + \underbrace{n_t}_{\tilde\theta^t} = 2B,\quad
    \text{simpler}: n_t + n_v + n_t = B + n_t.

so the compute floor of the ratio to SAM is 1.00 (full) and ``(1 + r) / 2 = 0.85`` (simpler).

Method. One model and one fixed synthetic batch, both resident on the device; one optimizer per
method over the same parameters (so ``torch.compile`` compiles each shape once, and no method
pays for a cold copy of the weights). Every sub-batch shape (B, n_t, n_v) is warmed up, then
every method runs ``warmup`` untimed steps. Timing runs R interleaved rounds: each round visits
every method (the order rotates by one each round, so no method always follows the same
neighbour) and times S single steps. On CPU the thread count is fixed and steps are timed with
``perf_counter``; on CUDA with events and one synchronize per round. We report the median and
the quartiles of the R*S step times, the ratio of medians to SAM and, because rounds are paired
in time, the median (and range) over rounds of the per-round ratio to SAM, which cancels slow
drifts caused by other processes on a shared machine.

Memory, per method. ``state_bytes``: bytes of the tensors kept in the optimizer state between
steps (the wrapper's and its base optimizer's, e.g. SGD momentum), counted after the timed
steps. ``buffer_bytes``: what the optimizer reports through ``opt.buffer_bytes()`` for its
transient per-step buffers (``None`` when it has no such method). On CUDA additionally
``peak_bytes`` (allocator peak during the method's rounds, everything resident included) and
``peak_delta_bytes`` (that peak minus the bytes allocated when the round started, i.e. beyond the
parameters, every optimizer's state and the batch: the step's activations, gradients and
optimizer buffers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agnostic_sam.errors import UsageError

__all__ = [
    "METHODS",
    "BenchConfig",
    "Method",
    "current_command",
    "format_markdown",
    "hardware_info",
    "register_method",
    "run_bench",
    "write_report",
]

StepFn = Callable[[Tensor, Tensor], None]
# build(model, net, cfg) -> (optimizer, step): `model` is the nn.Module whose parameters are
# optimised, `net` the callable used for forward passes (the compiled module or `model`), and
# step(x, y) runs one full optimizer step on the batch x: (B, C, H, W), y: (B,).
BuildFn = Callable[[nn.Module, Callable[[Tensor], Tensor], "BenchConfig"], tuple[Any, StepFn]]


@dataclass(frozen=True)
class Method:
    """A benchmarked optimizer: how to build it, and images through fwd+bwd per step."""

    name: str
    build: BuildFn
    samples: Callable[[int, int], int]  # (B, n_t) -> images through forward+backward per step


METHODS: dict[str, Method] = {}


def register_method(name: str, samples: Callable[[int, int], int]) -> Callable[[BuildFn], BuildFn]:
    """Decorator adding ``build`` to :data:`METHODS` under ``name``."""

    def deco(build: BuildFn) -> BuildFn:
        METHODS[name] = Method(name, build, samples)
        return build

    return deco


@dataclass
class BenchConfig:
    """Settings of one benchmark run (the CLI flags of ``agnostic-sam bench``)."""

    model: str = "resnet18"
    batch_size: int = 64
    channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int | None = 1  # torch.set_num_threads on CPU; None leaves torch's default
    amp: str = "none"  # none | bf16 | fp16 (autocast around the forward pass)
    channels_last: bool = False
    compile: bool = False
    rounds: int = 5
    steps: int = 10  # timed steps per method per round
    warmup: int = 3  # untimed steps per method before the first round
    methods: tuple[str, ...] = ("sgd", "sam", "agnostic-sam", "agnostic-sam-simpler")
    split_ratio: float = 0.7
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05
    rho1: float = 0.1
    rho2: float = 0.05
    seed: int = 0
    # Seconds from the start of warm-up: no round starts that would end past it (>= 1 round runs).
    time_budget_s: float | None = None
    cudnn_benchmark: bool = True  # CUDA only: autotune convolutions (warm-up covers every shape)

    def validate(self) -> None:
        for name in ("batch_size", "channels", "image_size", "num_classes", "rounds", "steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UsageError(f"--batch-size must be >= 2 to split a batch, got {self.batch_size}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise UsageError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if not 0.0 < self.split_ratio < 1.0:
            raise UsageError(f"--split-ratio must be in (0, 1), got {self.split_ratio}")
        self.split_sizes()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UsageError(f"unknown method(s) {unknown or '[]'}; choose from {sorted(METHODS)}")

    def split_sizes(self) -> tuple[int, int]:
        """(|B^t|, |B^v|), exactly as `split_batch` cuts the batch."""
        from agnostic_sam import split_sizes

        try:
            return split_sizes(self.batch_size, self.split_ratio)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc


# --- the methods -----------------------------------------------------------------------------

def _autocast(cfg: BenchConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _loss_fn(net: Callable[[Tensor], Tensor], cfg: BenchConfig, device: torch.device):
    def loss(x: Tensor, y: Tensor) -> Tensor:
        with _autocast(cfg, device):
            return F.cross_entropy(net(x), y)

    return loss


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _scaler(cfg: BenchConfig, device: torch.device):
    if cfg.amp != "fp16":
        return None
    from agnostic_sam.amp import LossScaler

    return LossScaler(device=device.type)


@register_method("sgd", samples=lambda b, n_t: b)
def _build_sgd(model, net, cfg):
    device = _device_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loss_fn = _loss_fn(net, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return opt, step


@register_method("sam", samples=lambda b, n_t: 2 * b)
def _build_sam(model, net, cfg):
    from agnostic_sam import SAM

    device = _device_of(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, model=model,
              loss_scaler=_scaler(cfg, device), lr=cfg.lr, momentum=cfg.momentum,
              weight_decay=cfg.weight_decay)
    loss_fn = _loss_fn(net, cfg, device)

    def step(x: Tensor, y: Tensor) -> None:
        def closure() -> Tensor:
            loss = loss_fn(x, y)
            opt.backward(loss)
            return loss

        opt.step(closure)

    return opt, step


def _build_agnostic(variant: str) -> BuildFn:
    def build(model, net, cfg):
        from agnostic_sam import AgnosticSAM, split_batch

        device = _device_of(model)
        opt = AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=cfg.rho1, rho2=cfg.rho2,
                          variant=variant, model=model, loss_scaler=_scaler(cfg, device),
                          lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        loss_fn = _loss_fn(net, cfg, device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)

        def closure_for(x: Tensor, y: Tensor) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                loss = loss_fn(x, y)
                opt.backward(loss)
                return loss

            return closure

        def step(x: Tensor, y: Tensor) -> None:
            # The random split is part of every real training step, so it is timed too.
            x_t, y_t, x_v, y_v = split_batch(x, y, cfg.split_ratio, generator=gen)
            opt.step(closure_for(x_t, y_t), closure_for(x_v, y_v))

        return opt, step

    return build


register_method("agnostic-sam", samples=lambda b, n_t: 2 * b)(_build_agnostic("full"))
register_method("agnostic-sam-simpler", samples=lambda b, n_t: b + n_t)(_build_agnostic("simpler"))


# --- measurement helpers ---------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: StepFn, x: Tensor, y: Tensor, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` consecutive steps."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        _sync(device)
        events[0].record()
        for i in range(steps):
            step(x, y)
            events[i + 1].record()
        _sync(device)
        return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        t0 = t1
    return times


def _iter_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v)


def _state_bytes(opt: Any) -> int:
    """Bytes of distinct tensors held in the optimizer's (and its base optimizer's) state."""
    seen: set[int] = set()
    total = 0
    for o in (opt, getattr(opt, "base_optimizer", None)):
        if o is None:
            continue
        for t in _iter_tensors(dict(o.state)):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2],
            "min": min(values), "max": max(values), "n": len(values)}


def hardware_info(device: torch.device) -> dict[str, Any]:
    """CPU model, GPU name, threads, torch version and load, saved with every result."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device), "gpu": None,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1m"] = os.getloadavg()[0]  # other processes sharing the CPU
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def current_command() -> str:
    """The command line that started this process, as a user would type it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv = ["python", "-m", "agnostic_sam", *argv[1:]]
    elif argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    elif argv:
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N, auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are timed")
    return device


# --- the benchmark ---------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, command: str | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every method in ``cfg.methods``; return the result dict (see :func:`write_report`)."""
    cfg.validate()
    device = _resolve_device(cfg.device)
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    try:
        return _run(cfg, device, command or current_command(), log or (lambda s: None))
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: BenchConfig, device: torch.device, command: str, log) -> dict[str, Any]:
    from agnostic_sam.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=cfg.num_classes, in_channels=cfg.channels,
                         image_size=cfg.image_size)  # UsageError naming the choices if unknown
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()
    net = torch.compile(model, dynamic=False) if cfg.compile else model

    # One fixed synthetic batch, resident on the device: data loading is not timed.
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen)
    x = x.to(device).contiguous(memory_format=fmt)
    y = y.to(device)
    n_t, n_v = cfg.split_sizes()

    t_start = time.perf_counter()
    loss_fn = _loss_fn(net, cfg, device)
    for n in sorted({cfg.batch_size, n_t, n_v}):  # every sub-batch shape, once, before timing
        loss_fn(x[:n], y[:n]).backward()
    model.zero_grad(set_to_none=True)

    built = {m: METHODS[m].build(model, net, cfg) for m in cfg.methods}
    for _, step in built.values():
        for _ in range(cfg.warmup):
            step(x, y)
    _sync(device)
    warmup_s = time.perf_counter() - t_start
    log(f"warm-up done in {warmup_s:.1f} s")

    names = list(cfg.methods)
    step_ms: dict[str, list[float]] = {m: [] for m in names}
    round_median: dict[str, list[float]] = {m: [] for m in names}
    peak: dict[str, int] = dict.fromkeys(names, 0)
    peak_delta: dict[str, int] = dict.fromkeys(names, 0)
    t_rounds = time.perf_counter()
    rounds_done = 0
    last_round_s = 0.0
    for r in range(cfg.rounds):
        # Start a round only if one more like the last still fits the budget (>= 1 round runs).
        t_round = time.perf_counter()
        if (r and cfg.time_budget_s is not None
                and t_round - t_start + last_round_s > cfg.time_budget_s):
            log(f"time budget reached after {r} round(s)")
            break
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _, step = built[name]
            # Every step starts by dropping the gradients anyway; doing it here makes the memory
            # baseline the same for all methods: parameters, optimizer states and the batch.
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times = _time_steps(step, x, y, cfg.steps, device)
            if device.type == "cuda":
                top = torch.cuda.max_memory_allocated(device)
                peak[name] = max(peak[name], top)
                peak_delta[name] = max(peak_delta[name], top - base)
            step_ms[name].extend(times)
            round_median[name].append(statistics.median(times))
        rounds_done += 1
        last_round_s = time.perf_counter() - t_round
        log(f"round {r + 1}/{cfg.rounds}: " + ", ".join(
            f"{m} {round_median[m][-1]:.1f} ms" for m in names))
    rounds_s = time.perf_counter() - t_rounds

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    methods: dict[str, Any] = {}
    for name in names:
        opt, _ = built[name]
        summ = _summary(step_ms[name])
        buffer_bytes = opt.buffer_bytes() if callable(getattr(opt, "buffer_bytes", None)) else None
        stats = getattr(opt, "stats", {})
        methods[name] = {
            "ms_per_step": summ,
            "round_median_ms": round_median[name],
            "images_per_second": cfg.batch_size / (summ["median"] / 1e3),
            "samples_per_step": METHODS[name].samples(cfg.batch_size, n_t),
            "state_bytes": _state_bytes(opt),
            "buffer_bytes": None if buffer_bytes is None else int(buffer_bytes),
            "peak_bytes": peak[name] if device.type == "cuda" else None,
            "peak_delta_bytes": peak_delta[name] if device.type == "cuda" else None,
            "skipped_last_step": float(stats["skipped"]) if "skipped" in stats else None,
        }
    _add_ratios(methods)
    return {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "hardware": hardware_info(device),
        "model": {"name": cfg.model, "parameters": sum(p.numel() for p in model.parameters()),
                  "param_bytes": param_bytes},
        "split": {"batch": cfg.batch_size, "train": n_t, "val": n_v},
        "rounds_completed": rounds_done,
        "warmup_seconds": warmup_s,
        "timed_seconds": rounds_s,
        "methods": methods,
    }


def _add_ratios(methods: dict[str, Any]) -> None:
    """Ratio of medians to SAM, paired per-round ratio, ratio of minima, sample-count ratio."""
    sam = methods.get("sam")
    for m in methods.values():
        if sam is None:
            m["ratio_to_sam"] = m["ratio_to_sam_paired"] = m["sample_ratio_to_sam"] = None
            m["ratio_to_sam_min"] = None
            continue
        m["ratio_to_sam"] = m["ms_per_step"]["median"] / sam["ms_per_step"]["median"]
        # Other processes only ever add time, so the ratio of fastest steps is the least noisy.
        m["ratio_to_sam_min"] = m["ms_per_step"]["min"] / sam["ms_per_step"]["min"]
        per_round = [a / b for a, b in zip(m["round_median_ms"], sam["round_median_ms"])]
        m["ratio_to_sam_paired"] = {"median": statistics.median(per_round),
                                    "min": min(per_round), "max": max(per_round)}
        m["sample_ratio_to_sam"] = m["samples_per_step"] / sam["samples_per_step"]


def _size(n: int | None) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 44.7 MiB."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_markdown(result: dict[str, Any], title: str = "Step-time benchmark") -> str:
    """The result as a Markdown page: setup, then one table row per method."""
    cfg, hw = result["config"], result["hardware"]
    sp = result["split"]
    lines = [
        f"# {title}", "",
        f"- command: `{result['command']}`",
        f"- model: {cfg['model']} ({result['model']['parameters']:,} parameters), batch "
        f"{sp['batch']} = {sp['train']} (B^t) + {sp['val']} (B^v), input "
        f"{cfg['channels']}x{cfg['image_size']}x{cfg['image_size']}, {cfg['num_classes']} classes",
        f"- device: {hw['device']} ({hw['gpu'] or hw['cpu']}), torch {hw['torch']}, "
        f"threads {hw['torch_threads']}, load average {hw.get('loadavg_1m', 'n/a')}",
        f"- precision {cfg['amp']}, channels_last {cfg['channels_last']}, compile {cfg['compile']}",
        f"- {result['rounds_completed']} interleaved rounds x {cfg['steps']} steps per method "
        f"after {cfg['warmup']} warm-up steps; step time median [q25, q75] over all timed steps",
        "",
        "| method | ms/step median [q25, q75] | min-max | ratio to SAM | paired range "
        "| ratio of minima | sample ratio | images/s | optimizer state | buffers | peak (delta) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        t = m["ms_per_step"]
        if m["ratio_to_sam"] is None:
            ratio = "- | - | - | -"
        else:
            p = m["ratio_to_sam_paired"]
            ratio = (f"{m['ratio_to_sam']:.3f} | {p['min']:.3f}-{p['max']:.3f} | "
                     f"{m['ratio_to_sam_min']:.3f} | {m['sample_ratio_to_sam']:.3f}")
        peak = "-" if m["peak_bytes"] is None else \
            f"{_size(m['peak_bytes'])} ({_size(m['peak_delta_bytes'])})"
        lines.append(
            f"| {name} | {t['median']:.2f} [{t['q25']:.2f}, {t['q75']:.2f}] | "
            f"{t['min']:.2f}-{t['max']:.2f} | {ratio} | {m['images_per_second']:.1f} | "
            f"{_size(m['state_bytes'])} | {_size(m['buffer_bytes'])} | {peak} |")
    lines += ["", "Optimizer state: tensors kept between steps (base-optimizer momentum included); "
              "buffers: transient per-step bytes the optimizer reports (`buffer_bytes()`); peak: "
              "CUDA allocator peak during the method's steps; delta: beyond the parameters, "
              "all optimizer states and the batch (activations, gradients, buffers).", ""]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: str | os.PathLike, stem: str = "bench",
                 title: str = "Step-time benchmark") -> tuple[Path, Path]:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md``; return both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(format_markdown(result, title))
    return json_path, md_path
