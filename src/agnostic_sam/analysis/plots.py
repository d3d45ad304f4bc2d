"""Figures of the analyses: loss-landscape contours and surfaces, gradient congruence over epochs,
accuracy curves, and a reproduction protocol's accuracy against its setting (noise, data size).

Figures are built with matplotlib's object API on the Agg canvas (files only, never a window,
and no change to the pyplot backend of a process that imports us).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "plot_accuracy_curves",
    "plot_congruence",
    "plot_landscape_contours",
    "plot_landscape_surfaces",
    "plot_frontier",
    "plot_protocol",
]

# Contour levels shared by every panel.
_LEVELS = 30


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _grids(
    surfaces: Sequence[Mapping[str, Any]],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for s in surfaces:
        loss = np.asarray(s["loss"], dtype=float)  # (len(alphas), len(betas))
        # meshgrid "ij": A[i, j] = alphas[i], B[i, j] = betas[j], matching loss[i][j].
        a, b = np.meshgrid(np.asarray(s["alphas"], float), np.asarray(s["betas"], float),
                           indexing="ij")
        out.append((a, b, loss))
    return out


def _shared_norm(
    grids: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    vmax: float | None,
) -> Normalize:
    """One colour scale for all panels: [min loss, max loss] over every run (or up to vmax)."""
    finite = np.concatenate([g[2][np.isfinite(g[2])] for g in grids])
    if finite.size == 0:
        raise ValueError("every loss value is non-finite: nothing to plot")
    low = float(finite.min())
    high = float(finite.max()) if vmax is None else float(vmax)
    if not high > low:
        high = low + 1e-12
    return Normalize(vmin=low, vmax=high)


def _check(surfaces: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> None:
    if not surfaces:
        raise ValueError("no loss surface to plot")
    if len(labels) != len(surfaces):
        raise ValueError(f"{len(labels)} labels for {len(surfaces)} surfaces")


def plot_landscape_contours(surfaces: Sequence[Mapping[str, Any]], labels: Sequence[str],
                            path: str | Path, *, vmax: float | None = None) -> Path:
    """Contour plots of the surfaces side by side, on one shared colour scale (one colour bar).

    `surfaces` are `loss_surface` results; losses above `vmax` (if given) are clipped to it.
    """
    _check(surfaces, labels)
    grids = _grids(surfaces)
    norm = _shared_norm(grids, vmax)
    levels = np.linspace(cast(float, norm.vmin), cast(float, norm.vmax), _LEVELS)
    n = len(grids)
    fig = Figure(figsize=(4.0 * n + 1.2, 4.0), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    mappable: Any = None  # the last contour set (there is at least one surface)
    for ax, (a, b, loss), label in zip(axes, grids, labels):
        mappable = ax.contourf(a, b, np.clip(loss, norm.vmin, norm.vmax), levels=levels,
                               norm=norm, cmap="viridis")
        ax.contour(a, b, np.clip(loss, norm.vmin, norm.vmax), levels=levels[::3], colors="white",
                   linewidths=0.4)
        ax.plot([0.0], [0.0], marker="*", color="red", markersize=8)
        ax.set_title(label)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_aspect("equal")
    axes[0].set_ylabel("beta (direction 2)")
    fig.colorbar(mappable, ax=list(axes), label="training loss", format="%.3g")
    return _save(fig, path)


def plot_landscape_surfaces(surfaces: Sequence[Mapping[str, Any]], labels: Sequence[str],
                            path: str | Path, *, vmax: float | None = None) -> Path:
    """3-D surface plots side by side (like the paper's Figures 2-3): shared z range and colours."""
    _check(surfaces, labels)
    grids = _grids(surfaces)
    norm = _shared_norm(grids, vmax)
    n = len(grids)
    fig = Figure(figsize=(4.5 * n, 4.2))
    for index, ((a, b, loss), label) in enumerate(zip(grids, labels), start=1):
        ax = fig.add_subplot(1, n, index, projection="3d")
        ax.plot_surface(a, b, np.clip(loss, norm.vmin, norm.vmax), cmap="viridis", norm=norm,
                        linewidth=0, antialiased=True)
        ax.set_zlim(norm.vmin, norm.vmax)
        ax.set_title(label)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_zlabel("loss")
    return _save(fig, path)


def plot_congruence(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                    path: str | Path) -> Path:
    """cos(grad L_{B^t}, grad L_{B^v}) per epoch, one line per run: {label: (epochs, cosines)}."""
    if not series:
        raise ValueError("no run with cos_train_val values to plot")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, (epochs, cosines) in series.items():
        ax.plot(list(epochs), list(cosines), marker="o", markersize=3, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cosine(train grad, val grad)")
    ax.set_title("Gradient congruence between $B^t$ and $B^v$")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_accuracy_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Test accuracy per epoch",
    ylabel: str = "test accuracy (%)",
) -> Path:
    """Write a PNG with one line per method (mean over seeds) and a shaded ±1 std band.

    ``curves[method]`` holds one accuracy list per seed (percent, index = epoch - 1). Seeds
    that stopped early (``max_steps``) are shorter; each epoch averages the seeds that reached
    it, and the band is drawn only where at least two seeds contribute.
    """
    if not curves:
        raise ValueError("plot_accuracy_curves needs at least one method, got none")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, per_seed in curves.items():
        per_seed = [list(c) for c in per_seed if len(c) > 0]
        if not per_seed:
            continue
        length = max(len(c) for c in per_seed)
        # (seeds, epochs) with NaN where a seed has no value for that epoch.
        table = np.full((len(per_seed), length), np.nan)
        for i, c in enumerate(per_seed):
            table[i, : len(c)] = c
        epochs = np.arange(1, length + 1)
        count = np.sum(~np.isnan(table), axis=0)
        mean = np.nanmean(table, axis=0)
        (line,) = ax.plot(epochs, mean, marker="o" if length < 20 else None, ms=3, label=name)
        if table.shape[0] > 1:
            # Sample std (ddof=1) where two or more seeds reached the epoch.
            std = np.full(length, np.nan)
            ok = count >= 2
            std[ok] = np.nanstd(table[:, ok], axis=0, ddof=1)
            # Clipped to the possible range of an accuracy in percent.
            low, high = np.clip(mean - std, 0.0, 100.0), np.clip(mean + std, 0.0, 100.0)
            ax.fill_between(
                epochs, low, high, where=ok, color=line.get_color(), alpha=0.2, linewidth=0
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_protocol(
    series: Mapping[str, Mapping[str, Mapping[str, Sequence[Sequence[float]]]]],
    path: str | Path,
    *,
    xlabel: str,
    title: str,
    ylabel: str = "test accuracy (%)",
) -> Path:
    """A grid of panels: one row per group (model), one column per panel (fixed / tuned radii).

    ``series[group][panel][method]`` lists ``(x, mean, std, n)`` points; each method is a line
    with ±1 std error bars over its ``n`` seeds. The same method name keeps its colour in every
    panel, with a "-tuned" suffix sharing the colour of its fixed-radius method.
    """
    groups = list(series)
    if not groups:
        raise ValueError("plot_protocol needs at least one group, got none")
    panels = list(dict.fromkeys(p for g in groups for p in series[g]))
    fig = Figure(figsize=(5.2 * len(panels), 3.8 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False, sharey="row")
    colours: dict[str, Any] = {}
    bases = {m.removesuffix("-tuned") for g in groups for p in series[g].values() for m in p}
    palette = iter(_palette(len(bases)))
    xs_all = sorted({float(pt[0]) for g in groups for p in series[g].values()
                     for s in p.values() for pt in s})
    for i, group in enumerate(groups):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            methods = series[group].get(panel, {})
            for k, (method, points) in enumerate(methods.items()):
                base = method.removesuffix("-tuned")
                colour = colours.setdefault(base, next(palette, None))
                pts = sorted((float(x), float(m), float(s), int(n)) for x, m, s, n in points)
                if not pts:
                    continue
                x, mean, std, n = map(np.asarray, zip(*pts))
                # a small horizontal offset per method keeps overlapping error bars readable
                spread = (max(xs_all) - min(xs_all)) if len(xs_all) > 1 else 1.0
                offset = (k - (len(methods) - 1) / 2) * 0.008 * spread
                ax.errorbar(x + offset, mean, yerr=std, marker="o", ms=4, capsize=3, lw=1.3,
                            color=colour, label=f"{method} (n={int(n.min())})")
            ax.set_title(f"{group}: {panel}")
            ax.set_xlabel(xlabel)
            ax.set_xticks(xs_all)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            ax.legend(fontsize="small", loc="lower left")
    fig.suptitle(_wrapped(title, fig))
    return _save(fig, path)


def _palette(n: int) -> list[Any]:
    """``n`` distinct colours: matplotlib's ten default ones, or tab20's twenty beyond ten."""
    if n <= 10:
        return [f"C{i}" for i in range(10)]
    from matplotlib import colormaps

    return [colormaps["tab20"](i % 20) for i in range(n)]


def _wrapped(title: str, fig: Any) -> str:
    """``title`` broken into lines that fit the figure's width (about 11 characters an inch)."""
    import textwrap

    return textwrap.fill(title, width=max(30, int(fig.get_figwidth() * 11)))


def plot_frontier(
    series: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "forward + backward work per run (batches)",
    ylabel: str = "test accuracy (%)",
) -> Path:
    """Accuracy against cost: one panel per row (e.g. ``passes/noise0.4``), one point per method.

    ``series[row][method] = (work, mean, low, high)``: the point at (work, mean) with its 95%
    interval [low, high] as a vertical bar, labelled with the method's name, so the frontier
    (most accuracy for the least work) shows at a glance.
    """
    rows = list(series)
    if not rows:
        raise ValueError("plot_frontier needs at least one row, got none")
    cols = min(2, len(rows))
    nrows = -(-len(rows) // cols)
    fig = Figure(figsize=(6.0 * cols, 4.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    names = list(dict.fromkeys(m for row in rows for m in series[row]))
    colours = dict(zip(names, _palette(len(names))))  # a method keeps its colour in every panel
    for k, row in enumerate(rows):
        ax = axes[k // cols][k % cols]
        for j, (method, (work, mean, low, high)) in enumerate(series[row].items()):
            colour = colours[method]
            ax.errorbar([work], [mean], yerr=[[mean - low], [high - mean]], marker="o", ms=5,
                        capsize=3, color=colour, lw=1.2)
            # staggered labels: methods of one cost share an x
            ax.annotate(method, (work, mean), textcoords="offset points",
                        xytext=(5, 9 * (j % 5) - 18), fontsize="x-small", color=colour)
        ax.set_title(row)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for k in range(len(rows), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle(_wrapped(title, fig))
    return _save(fig, path)
