"""The benchmark run: its config, the timing of interleaved rounds, memory and the ratios to SAM.

The method (warm-up, rotated interleaved rounds, CUDA events vs ``perf_counter``, what the
memory figures count) is described in :mod:`agnostic_sam.bench`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.bench.methods import StepFn, build_step, make_loss
from agnostic_sam.bench.report import current_command, hardware_info
from agnostic_sam.errors import UsageError
from agnostic_sam.methods import METHODS, list_methods

__all__ = ["BenchConfig", "run_bench"]

# Bounds no benchmark here can use (a typo, not a setting): refused before anything is allocated.
MAX_BATCH = 2**20
MAX_IMAGE_SIZE = 4096
MAX_BATCH_VALUES = 2**30  # the resident synthetic batch: 4 GiB in float32


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{_flag(name)} must be an integer in [{low}, {high}], got {value!r}")


def _check_real(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise UsageError(f"{_flag(name)} must be a finite number in {lo}{low:g}, {high:g}{hi}, got "
                         f"{value!r}")


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
    methods: tuple[str, ...] = tuple(list_methods())  # every registered method
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
        """UsageError (one line naming the flag and the value) for settings no benchmark can use:
        counts out of range, non-finite or out-of-range numbers, a batch too large to allocate."""
        for name, low, high in (("batch_size", 2, MAX_BATCH), ("channels", 1, 64),
                                ("image_size", 1, MAX_IMAGE_SIZE), ("num_classes", 1, 10**6),
                                ("rounds", 1, 10**6), ("steps", 1, 10**6), ("warmup", 0, 10**6),
                                ("seed", 0, 2**32 - 1)):
            _check_int(name, getattr(self, name), low, high)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, 4096)
        values = self.batch_size * self.channels * self.image_size**2
        if values > MAX_BATCH_VALUES:
            raise UsageError(f"--batch-size {self.batch_size} x --channels {self.channels} x "
                             f"--image-size {self.image_size}^2 = {values} input values, more than "
                             f"{MAX_BATCH_VALUES}; use a smaller batch or image")
        if self.amp not in ("none", "bf16", "fp16"):
            raise UsageError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        _check_real("split_ratio", self.split_ratio, 0.0, 1.0, low_open=True, high_open=True)
        _check_real("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_real("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_real("weight_decay", self.weight_decay, 0.0, math.inf)
        for name in ("rho", "rho1", "rho2"):
            _check_real(name, getattr(self, name), 0.0, math.inf)
        if self.time_budget_s is not None:
            _check_real("time_budget", self.time_budget_s, 0.0, math.inf)  # 0: one round
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


# --- measurement helpers ---------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: StepFn, x: Tensor, y: Tensor, steps: int, device: torch.device) -> list[float]:
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


def state_bytes(opt: Any) -> int:
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
    q = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
         else [values[0]] * 3)
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2],
            "min": min(values), "max": max(values), "n": len(values)}


def _resolve_device(name: str) -> torch.device:
    # here, not on import: train.build loads the data sets' torchvision (`bench --help` stays light)
    from agnostic_sam.train.build import resolve_device

    device = resolve_device(name)
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
    model, net, x, y = _setup(cfg, device)
    n_t, n_v = cfg.split_sizes()
    t_start = time.perf_counter()
    built = _warm_up(cfg, model, net, x, y, device)
    warmup_s = time.perf_counter() - t_start
    log(f"warm-up done in {warmup_s:.1f} s")
    t_rounds = time.perf_counter()
    timed = _time_rounds(cfg, model, built, x, y, device, t_start, log)
    rounds_s = time.perf_counter() - t_rounds
    methods = {name: _method_row(cfg, name, built[name][0], timed, n_t, device)
               for name in cfg.methods}
    add_ratios(methods)
    return {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "hardware": hardware_info(device),
        "model": {"name": cfg.model, "parameters": sum(p.numel() for p in model.parameters()),
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
        "split": {"batch": cfg.batch_size, "train": n_t, "val": n_v},
        "rounds_completed": timed["rounds"],
        "warmup_seconds": warmup_s,
        "timed_seconds": rounds_s,
        "methods": methods,
    }


def _setup(cfg: BenchConfig, device: torch.device) -> tuple[torch.nn.Module, Any, Tensor, Tensor]:
    """The model (and its compiled form) and one fixed synthetic batch, resident on the device:
    data loading is not timed."""
    from agnostic_sam.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=cfg.num_classes, in_channels=cfg.channels,
                         image_size=cfg.image_size)  # UsageError naming the choices if unknown
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()  # type: ignore[call-overload]
    net = torch.compile(model, dynamic=False) if cfg.compile else model
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen)
    return model, net, x.to(device).contiguous(memory_format=fmt), y.to(device)


def _warm_up(cfg: BenchConfig, model: torch.nn.Module, net: Any, x: Tensor, y: Tensor,
             device: torch.device) -> dict[str, tuple[Any, StepFn]]:
    """Every sub-batch shape once, then every method's optimizer and `warmup` untimed steps."""
    n_t, n_v = cfg.split_sizes()
    loss_fn = make_loss(net, cfg, device)
    for n in sorted({cfg.batch_size, n_t, n_v}):  # every sub-batch shape, once, before timing
        loss_fn(x[:n], y[:n]).backward()
    model.zero_grad(set_to_none=True)
    built = {m: build_step(m, model, net, cfg) for m in cfg.methods}
    for _, step in built.values():
        for _ in range(cfg.warmup):
            step(x, y)
    _sync(device)
    return built


def _time_rounds(cfg: BenchConfig, model: torch.nn.Module, built: dict[str, tuple[Any, StepFn]],
                 x: Tensor, y: Tensor, device: torch.device, t_start: float,
                 log) -> dict[str, Any]:
    """R interleaved rounds (the order rotates by one each round) of S timed steps per method;
    step times, per-round medians and, on CUDA, memory peaks."""
    names = list(cfg.methods)
    step_ms: dict[str, list[float]] = {m: [] for m in names}
    round_median: dict[str, list[float]] = {m: [] for m in names}
    peak: dict[str, int] = dict.fromkeys(names, 0)
    peak_delta: dict[str, int] = dict.fromkeys(names, 0)
    rounds_done, last_round_s = 0, 0.0
    for r in range(cfg.rounds):
        # Start a round only if one more like the last still fits the budget (>= 1 round runs).
        t_round = time.perf_counter()
        if (r and cfg.time_budget_s is not None
                and t_round - t_start + last_round_s > cfg.time_budget_s):
            log(f"time budget reached after {r} round(s)")
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            _, step = built[name]
            # Every step starts by dropping the gradients anyway; doing it here makes the memory
            # baseline the same for all methods: parameters, optimizer states and the batch.
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times = time_steps(step, x, y, cfg.steps, device)
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
    return {"step_ms": step_ms, "round_median": round_median, "peak": peak,
            "peak_delta": peak_delta, "rounds": rounds_done}


def _method_row(cfg: BenchConfig, name: str, opt: Any, timed: dict[str, Any], n_t: int,
                device: torch.device) -> dict[str, Any]:
    """One method's line of the result: step times, throughput, samples, memory."""
    summ = _summary(timed["step_ms"][name])
    buffer_bytes = opt.buffer_bytes() if callable(getattr(opt, "buffer_bytes", None)) else None
    stats = getattr(opt, "stats", {})
    cuda = device.type == "cuda"
    return {
        "ms_per_step": summ,
        "round_median_ms": timed["round_median"][name],
        "images_per_second": cfg.batch_size / (summ["median"] / 1e3),
        "samples_per_step": METHODS[name].samples(cfg.batch_size, n_t),
        "state_bytes": state_bytes(opt),
        "buffer_bytes": None if buffer_bytes is None else int(buffer_bytes),
        "peak_bytes": timed["peak"][name] if cuda else None,
        "peak_delta_bytes": timed["peak_delta"][name] if cuda else None,
        "skipped_last_step": float(stats["skipped"]) if "skipped" in stats else None,
    }


def add_ratios(methods: dict[str, Any]) -> None:
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

