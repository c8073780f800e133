"""Figures for the README: the speed-quality trade-off and a side-by-side image grid, written atomically as PNG.

Figures are built with ``matplotlib.figure.Figure`` directly (rendered by Agg, no pyplot): no display needed and
no global backend state changed. matplotlib is imported inside each function so importing ``eval`` stays light.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from eval.metrics.images import ImageLike, load_rgb_uint8
from eval.tables import ConfigRow
from h2cache.io import atomic_path

FIDELITY_AXES = (("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS ↓"))
X_AXES = {"blocks": "blocks computed (% of total)", "time": "time per image (s)"}


def plot_speed_quality(rows: Sequence[ConfigRow], path: str | os.PathLike, x_axis: str = "blocks") -> Path:
    """One subplot per fidelity metric that has values; one labelled point per cached config.

    ``x_axis`` is "blocks" (blocks computed, % of total; robust on a noisy machine) or "time" (mean seconds per
    image). The baseline is the reference of every fidelity metric, so it has no point of its own.
    """
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {list(X_AXES)}, got {x_axis!r}")
    compared = [row for row in rows if not row.is_baseline]
    axes_to_draw = [
        (metric, title) for metric, title in FIDELITY_AXES if any(_finite(row.metrics[metric].mean) for row in compared)
    ]
    if not axes_to_draw:
        raise ValueError("no config has a finite PSNR, SSIM or LPIPS mean; score the images before plotting")
    figure = _figure(width=4.2 * len(axes_to_draw), height=3.6)
    axes = figure.subplots(1, len(axes_to_draw), squeeze=False)
    for axis, (metric, title) in zip(axes[0], axes_to_draw, strict=True):
        for row in compared:
            y = row.metrics[metric].mean
            if not _finite(y):
                continue
            x = row.blocks_computed_pct if x_axis == "blocks" else row.time_mean_s
            axis.scatter([x], [y])
            axis.annotate(row.config, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(X_AXES[x_axis])
        axis.set_title(title)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_image_grid(
    images: Sequence[tuple[str, ImageLike]],
    path: str | os.PathLike,
    title: str | None = None,
    panel_inches: float = 3.0,
) -> Path:
    """The same prompt under each config side by side; ``images`` is a sequence of (label, image) pairs."""
    if not images:
        raise ValueError("no images given; pass (label, image path) pairs, one per config")
    figure = _figure(width=panel_inches * len(images), height=panel_inches + 0.5)
    axes = figure.subplots(1, len(images), squeeze=False)
    for axis, (label, image) in zip(axes[0], images, strict=True):
        axis.imshow(load_rgb_uint8(image))
        axis.set_title(label, fontsize=9)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path
