"""Pretrained weights from local files only (the transfer-learning runs of paper Table 3).

``weights`` is either a path to a checkpoint (a plain state dict, or a dict holding one under
``"model"`` or ``"state_dict"``), or a torchvision weights name such as
``EfficientNet_B4_Weights.IMAGENET1K_V1``, which is looked up where ``torch.hub`` caches
downloads: ``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``. Nothing is
downloaded. Tensors whose shapes differ from the model's are skipped and reported only in the
model's first and last layers (its stem and its classifier: a classifier for 1000 ImageNet
classes, a stem for other input channels or a CIFAR kernel); a mismatch anywhere else, or a file
of which no parameter fits, is another model's checkpoint and raises `UsageError` naming the
tensors. What was skipped or left at its initialisation is logged as a warning (stderr).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from agnostic_sam.errors import UsageError

__all__ = ["LoadReport", "load_pretrained", "resolve_weights"]

log = logging.getLogger(__name__)

# Prefixes that wrappers add to parameter names: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did. ``skipped``: name -> (checkpoint shape, model shape)."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model

    def summary(self) -> str:
        """One line for logs."""
        line = f"loaded {len(self.loaded)} tensors from {self.path}"
        if self.skipped:
            line += f"; skipped (shape mismatch): {', '.join(sorted(self.skipped))}"
        if self.missing:
            line += f"; {len(self.missing)} model tensors kept their initialisation"
        if self.unexpected:
            line += f"; {len(self.unexpected)} checkpoint tensors unused"
        return line


def resolve_weights(weights: str) -> Path:
    """Local file of ``weights`` (a path, or a torchvision weights name in the hub cache)."""
    path = Path(weights).expanduser()
    try:
        if path.is_file():
            return path
    except OSError as exc:  # a name too long, a loop of symbolic links
        raise UsageError(f"weights file {weights[:80]}: {exc.strerror or exc}") from None
    looks_like_path = os.sep in weights or path.suffix in {".pt", ".pth", ".bin", ".ckpt"}
    if looks_like_path:
        raise UsageError(f"weights file {path} does not exist")
    from torchvision.models import get_weight

    try:
        entry = get_weight(weights)
    except (ValueError, KeyError, AttributeError) as exc:
        raise UsageError(
            f"weights {weights!r} is neither a file nor a torchvision weights name "
            "like EfficientNet_B4_Weights.IMAGENET1K_V1"
        ) from exc
    file_name = os.path.basename(urlparse(entry.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not cached.is_file():
        raise UsageError(f"weights {weights} are not in the local cache: download {entry.url} "
                         f"and put it at {cached} (nothing is downloaded automatically)")
    return cached


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} holds no state dict (expected a dict of tensors, or one under "
                         "'model' or 'state_dict')")
    out = {}
    for name, tensor in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


def _edge_modules(model: nn.Module) -> tuple[str, str]:
    """Names of the first and the last module that own parameters (stem and classifier)."""
    owners = [name for name, m in model.named_modules()
              if next(m.parameters(recurse=False), None) is not None]
    return (owners[0], owners[-1]) if owners else ("", "")


def _shapes(report: LoadReport, names: list[str]) -> str:
    """``name (file (a, b), model (c, d))`` for the first names, and how many more."""
    text = ", ".join(f"{n} (file {report.skipped[n][0]}, model {report.skipped[n][1]})"
                     for n in names[:3])
    return text + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_fit(model: nn.Module, report: LoadReport) -> None:
    """UsageError unless the file is this model's checkpoint up to its stem and classifier: some
    parameter loads, and every shape mismatch lies in the first or last layer."""
    params = {name for name, _ in model.named_parameters()}
    if not any(name in params for name in report.loaded):
        skipped = list(report.skipped)  # in the model's order
        detail = f": {_shapes(report, skipped)}" if skipped else " (no name in common)"
        raise UsageError(f"no tensor of {report.path} fits a parameter of the model{detail}; "
                         "is it a checkpoint of another model?")
    edges = tuple(f"{name}." for name in _edge_modules(model) if name)
    inner = [n for n in report.skipped if not n.startswith(edges)]
    if inner:
        raise UsageError(f"{report.path} does not fit the model: {_shapes(report, inner)}; only "
                         "the first layer and the classifier may differ (another model's file?)")


def load_pretrained(model: nn.Module, weights: str | os.PathLike[str]) -> LoadReport:
    """Copy matching tensors of ``weights`` into ``model`` (in place); return what happened.

    A tensor is loaded when its name and shape match the model's. Shape mismatches in the first
    and the last layer (stem, classifier) are skipped and listed in the report; anywhere else,
    or when no parameter loads, ``UsageError`` names the tensors and the model is unchanged.
    """
    path = resolve_weights(str(weights))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors: the message names the file
        raise UsageError(f"cannot read weights file {path}: {exc}") from exc
    source = _state_dict_of(raw, path)
    target = model.state_dict()
    report = LoadReport(path)
    usable = {}
    for name, tensor in target.items():
        if name not in source:
            report.missing.append(name)
        elif source[name].shape != tensor.shape:
            report.skipped[name] = (tuple(source[name].shape), tuple(tensor.shape))
        else:
            usable[name] = source[name]
            report.loaded.append(name)
    report.unexpected = [name for name in source if name not in target]
    _check_fit(model, report)
    model.load_state_dict(usable, strict=False)
    # Anything not loaded changes what the run starts from: say it where the user sees it.
    changed = report.skipped or report.missing or report.unexpected
    log.log(logging.WARNING if changed else logging.INFO, report.summary())
    return report
