"""Shared report helpers: numbers with confidence intervals, verdicts against zero, figure files.

Every stage's report module formats its tables with these, so a number and its interval read
the same in every summary, and every figure is written the same way (PNG for the HTML report,
PDF for papers, both without timestamps so reruns are byte-identical).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kvpipe.io import atomic_path

Interval = tuple[float, float, float]  # value, ci_low, ci_high


def fmt_ci(value: float, low: float = math.nan, high: float = math.nan, *, signed: bool = False,
           percent: bool = False) -> str:
    """'0.123 [0.100, 0.150]' (signed: '+0.123 ...'; percent: '12.3 % ...'); no interval when it is NaN."""
    def one(x: float) -> str:
        if percent:
            return f"{100 * x:+.1f} %" if signed else f"{100 * x:.1f} %"
        return f"{x:+.3f}" if signed else f"{x:.3f}"

    ci = "" if math.isnan(low) or math.isnan(high) else f" [{one(low)}, {one(high)}]"
    return one(value) + ci


def verdict_vs_zero(v: Interval) -> str:
    """Whether an interval excludes 0, in words."""
    return "≈ 0 (CI includes 0)" if v[1] <= 0 <= v[2] else ("< 0" if v[2] < 0 else "> 0")


def figure_files(name: str) -> tuple[str, str]:
    """The files one figure is saved as, relative to the figures directory."""
    return f"{name}.png", f"{name}.pdf"


def save_figure(fig: Any, out_dir: Path, name: str) -> None:
    """Save a matplotlib figure as PNG and PDF under out_dir, atomically and without timestamps; then close it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in figure_files(name):
        with atomic_path(out_dir / file) as tmp:
            fmt = file.rsplit(".", 1)[1]
            metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
            fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight", metadata=metadata)
    pyplot().close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend (imported only when a report draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
