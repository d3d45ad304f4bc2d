"""What a benchmark result is saved with and shown as: hardware, command line, Markdown, files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["current_command", "format_markdown", "hardware_info", "write_report"]


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
