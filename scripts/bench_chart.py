"""The picture of docs/benchmarks.md: detect and floor against the read, size by size.

One bar pair per size: the whole detect's time and the floor's (`bench_floor`), each divided
by the time to read both inputs, on a log scale, with the ratio targets marked at the sizes
that have one. What the table says in numbers, at a glance: how far each bar is from its
target, and whether the floor alone is already past it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.files import atomic_path

__all__ = ["ratio_chart"]


def ratio_chart(sizes: Sequence[int], detect: Sequence[float], floor: Sequence[float],
                targets: Mapping[int, float], path: str | Path, *, title: str = "") -> Path:
    """Write the chart as a PNG at ``path`` (atomically) and return it.

    ``detect`` and ``floor`` are ratios to the read time, one per size; NaN leaves a bar
    out (a size that was not measured, or failed).
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    try:
        x = range(len(sizes))
        width = 0.38
        bars = [(detect, -width / 2, "#b2182b", "whole detect / read"),
                (floor, width / 2, "#999999", "floor / read (no detector)")]
        for values, offset, colour, label in bars:
            xs = [i + offset for i, v in zip(x, values, strict=True) if v == v]
            vs = [v for v in values if v == v]
            drawn = ax.bar(xs, vs, width, color=colour, label=label)
            ax.bar_label(drawn, labels=[f"{v:.1f}x" for v in vs], fontsize=8, padding=2)
        for i, size in enumerate(sizes):
            if size in targets:
                ax.hlines(targets[size], i - 0.45, i + 0.45, colors="#2166ac", linewidth=2.5,
                          label="target" if i == min(j for j, s in enumerate(sizes)
                                                     if s in targets) else None)
        ax.set_yscale("log")
        top = max([v for v in (*detect, *floor, *targets.values()) if v == v] or [10.0])
        ax.set_ylim(1, top * 1.5)
        ticks = [t for t in (1, 2, 3, 4, 5, 10, 20, 30, 50, 100, 200, 500) if t <= top * 1.5]
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(list(x), [f"{s} px" for s in sizes])
        ax.set_ylabel("time / time to read both inputs")
        ax.set_title(title or "make bench: detect and floor against the read", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
