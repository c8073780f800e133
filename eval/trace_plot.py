"""Plot a cache trace: each probe's distance per step against its threshold, hits and misses marked.

The same picture as the H2-Cache paper's figures, with the official code's plotting defect fixed (it marked misses
as hits and swapped the legend labels).
"""

from __future__ import annotations

from pathlib import Path

from h2cache.io import atomic_path

STAGES = (("stage1", "d1", "tau1", "structure (double block 0)"), ("stage2", "d2", "tau2", "detail (single block 0)"))


def plot_probe_distances(trace: list[dict], path: str | Path, config=None, branch: str = "cond") -> Path:
    """Write a PNG of ``trace``'s probe distances for one CFG branch; thresholds come from ``config`` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in trace if r["branch"] == branch]
    figure, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for axis, (decision_key, distance_key, threshold_name, title) in zip(axes, STAGES, strict=True):
        measured = [r for r in records if r[distance_key] is not None]
        steps = [r["step"] for r in measured]
        axis.plot(steps, [r[distance_key] for r in measured], color="0.6", linewidth=1)
        for decision, marker, color in (("hit", "o", "tab:green"), ("miss", "x", "tab:red")):
            chosen = [r for r in measured if r[decision_key] == decision]
            axis.scatter(
                [r["step"] for r in chosen],
                [r[distance_key] for r in chosen],
                marker=marker,
                color=color,
                label=f"{decision} ({sum(r[decision_key] == decision for r in records)} steps)",
                zorder=3,
            )
        forced = [r["step"] for r in records if r[decision_key] == "forced"]
        if forced:
            axis.scatter(forced, [0] * len(forced), marker="|", color="tab:blue", label=f"forced ({len(forced)})")
        threshold = getattr(config, threshold_name, None)
        if threshold is not None:
            axis.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"{threshold_name} = {threshold}")
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("relative L1")
        axis.legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("denoising step")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path
