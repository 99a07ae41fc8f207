"""Human-facing output of an evaluation: the per-class table, JSON and PR-curve plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np


def format_table(ap: Mapping[str, float], mean: float, title: str,
                 extra: Optional[Mapping[str, Mapping[str, object]]] = None) -> str:
    """A fixed-width table: one row per class (AP in percent), then the mean.

    ``extra`` maps class → {column: value} for additional columns (e.g. #gt, #det).
    """
    columns = list(next(iter(extra.values())).keys()) if extra else []
    width = max([len(c) for c in ap] + [len("mean"), 5])
    header = f"{'class':<{width}}  {'AP':>6}" + "".join(f"  {c:>7}" for c in columns)
    lines = [title, header, "-" * len(header)]
    for name, value in ap.items():
        row = f"{name:<{width}}  {100 * value:6.2f}"
        if extra:
            row += "".join(f"  {extra[name][c]!s:>7}" for c in columns)
        lines.append(row)
    lines.append("-" * len(header))
    lines.append(f"{'mean':<{width}}  {100 * mean:6.2f}")
    return "\n".join(lines)


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Plot one precision-recall curve per class to a PNG.

    Args:
        curves: class → ``(recall (D,), precision (D,), ap)``; classes without
            a curve (``D == 0`` or ``ap`` NaN) are listed in the legend as such.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    cmap = plt.get_cmap("tab20")
    for i, (name, (recall, precision, ap)) in enumerate(curves.items()):
        if len(recall) == 0 or not np.isfinite(ap):
            ax.plot([], [], color=cmap(i % 20), label=f"{name} (no curve)")
            continue
        # Step plot of the raw curve plus the start at recall 0.
        r = np.concatenate(([0.0], recall))
        p = np.concatenate(([precision[0]], precision))
        ax.step(r, p, where="post", color=cmap(i % 20), lw=1.4, label=f"{name} {100 * ap:.1f}")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="class  AP%")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
