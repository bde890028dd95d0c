"""Learning curves of a run directory: training and evaluation returns against
environment steps and against wall-clock time, in one PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path

from fastdqn.metrics import read_config, read_csv


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the learning-curve PNG of ``run_dir`` (default ``RUN_DIR/learning_curve.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    record = read_config(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise ValueError(f"{run_dir} has no metrics.csv yet")
    train = read_csv(metrics_path)
    evals = read_csv(run_dir / "eval.csv") if (run_dir / "eval.csv").is_file() else []
    if not evals and not any(_finite(r.get("episode_return")) for r in train):
        raise ValueError(f"{run_dir} has no returns to plot yet: no episode ended in its {len(train)} metrics rows "
                         "and it has no evaluation")
    out = Path(out) if out is not None else run_dir / "learning_curve.png"

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, x_key, x_label, scale in ((axes[0], "step", "environment steps", 1.0),
                                      (axes[1], "wall_time", "wall-clock time (minutes)", 1 / 60)):
        _line(ax, train, x_key, "episode_return", scale, label="training episodes (per log interval)",
              alpha=0.3, color="tab:blue")
        _line(ax, train, x_key, "episode_return_100", scale, label="training (mean of last 100 episodes)",
              color="tab:blue")
        points = [(r[x_key] * scale, r["mean_return"], r["std_return"]) for r in evals]
        if points:
            xs, means, stds = zip(*points)
            ax.errorbar(xs, means, yerr=stds, fmt="o-", color="tab:orange", capsize=3,
                        label="evaluation (mean +- std)")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("episode return")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{record.get('env_id', '?')}: {record.get('run_name', run_dir.name)}", fontsize=10)
    if evals:  # the protocol in full, under the plots: too long for a legend
        fig.text(0.01, 0.01, f"evaluation: {evals[-1]['protocol']}", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if evals else 0, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _line(ax, rows, x_key, y_key, scale, **style) -> None:
    points = [(r[x_key] * scale, r[y_key]) for r in rows if _finite(r.get(y_key))]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) == 1 else None, **style)  # one row: a point, not an empty line


def _finite(value) -> bool:
    return isinstance(value, float) and not math.isnan(value)
