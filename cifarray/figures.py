"""Figure helpers the families' reports share: matplotlib off-screen, and metrics.csv curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarray.rundir import measured


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if measured(r, key)]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


def curves(run, rows: list[dict], panels: list[tuple[str, list[str]]], title: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100)
    for ax, (label, keys) in zip(np.atleast_1d(axes), panels):
        for key in keys:
            x, y = _column(rows, key)
            if len(x):
                ax.plot(x, y, marker="o" if len(x) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = run.path / "curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path
