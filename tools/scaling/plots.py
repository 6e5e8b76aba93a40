"""Figures of the scaling toolkit (matplotlib, no display needed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from tools.scaling.law import Law  # noqa: E402


def _save(figure, path: str) -> None:
    """A PNG written beside `path` under a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        Path(tmp).unlink(missing_ok=True)


def _compute_range(params, tokens, computes) -> np.ndarray:
    flops = np.concatenate([6 * np.asarray(params) * np.asarray(tokens), computes])
    return np.geomspace(flops.min() / 3, flops.max() * 3, 100)


def law_contours(path: str, law: Law, params, tokens, loss, computes=()) -> None:
    """The fitted iso-loss contours over (N, D), the runs coloured by loss, and the
    compute-optimal frontier."""
    params, tokens = np.asarray(params, float), np.asarray(tokens, float)
    n = np.geomspace(params.min() / 3, params.max() * 3, 200)
    d = np.geomspace(tokens.min() / 3, tokens.max() * 3, 200)
    grid_n, grid_d = np.meshgrid(n, d)
    figure, axes = plt.subplots(figsize=(6.5, 5))
    contours = axes.contour(grid_n, grid_d, law.loss(grid_n, grid_d), levels=15, cmap="viridis")
    axes.clabel(contours, fontsize=7, fmt="%.2f")
    points = axes.scatter(params, tokens, c=loss, cmap="viridis", edgecolors="k", zorder=3)
    figure.colorbar(points, label="loss (runs)")
    frontier = [law.optimal(c) for c in _compute_range(params, tokens, computes)]
    axes.plot(
        [f["params"] for f in frontier], [f["tokens"] for f in frontier], "r--", label="optimal"
    )
    axes.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="tokens D")
    axes.set(xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), title="iso-loss contours of the fit")
    axes.legend()
    _save(figure, path)


def loss_vs_compute(path: str, law: Law, params, tokens, loss, computes=()) -> None:
    """The runs' loss against C = 6ND, with the fitted compute-optimal frontier."""
    flops = 6 * np.asarray(params, float) * np.asarray(tokens, float)
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    points = axes.scatter(flops, loss, c=np.log10(params), cmap="plasma", edgecolors="k")
    figure.colorbar(points, label="log10 parameters")
    budgets = _compute_range(params, tokens, computes)
    axes.plot(budgets, [law.optimal(c)["loss"] for c in budgets], "r--", label="frontier")
    for c in computes:
        axes.axvline(c, color="grey", linewidth=0.8)
    axes.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss", title="loss vs compute")
    axes.legend()
    _save(figure, path)


def lr_curve(path: str, lrs, losses, optimum: dict | None) -> None:
    """Valid loss against learning rate (log axis), with the parabola over the points it was
    fitted to and its optimum (lr_sweep.parabola_optimum's result)."""
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(lrs, losses, "o", label="runs")
    if optimum is not None:
        span = np.geomspace(*optimum["fitted_range"], 100)
        curve = np.polyval(optimum["coefficients"], np.log(span))
        axes.plot(span, curve, "-", label="parabola in log lr")
        axes.axvline(optimum["lr"], color="r", linestyle="--", label=f"optimum {optimum['lr']:.3g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="valid loss", title="learning-rate sweep")
    axes.legend()
    _save(figure, path)
