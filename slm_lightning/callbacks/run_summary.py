"""What a run leaves in its folder: ``run.json`` at the start (RunSummary), and at the end
``summary.json``, ``returns.png``, ``metrics.png`` and the ``summary:`` line (written by MetricsTracker, which
holds the episodes, through :func:`write_summary`)."""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from loguru import logger
from typing_extensions import override

from slm_lightning.lab.plots import plot_metrics
from slm_lightning.lab.runs import EVAL_RETURN, read_run


def git_sha() -> str:
    """The commit of the working directory, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plot_returns(
    path: Path,
    frames: list[int],
    returns: list[float],
    window: int,
    title: str,
    evaluations: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Episode returns (dots) and their moving average (line) against frames, and the mean
    return of the evaluations during fit (``evaluations``: their frames and returns) where
    there were any.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if returns:
        ret = np.asarray(returns, dtype=float)
        cumsum = np.cumsum(np.insert(ret, 0, 0.0))
        counts = np.minimum(np.arange(1, len(ret) + 1), window)
        ma = (cumsum[1:] - cumsum[np.arange(1, len(ret) + 1) - counts]) / counts
        ax.scatter(frames, ret, s=4, alpha=0.3, label="episode return")
        ax.plot(frames, ma, color="C1", label=f"mean of last {window}")
    if evaluations is not None and len(evaluations[0]):
        ax.plot(*evaluations, color="C2", marker="o", markersize=3, label="eval")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.set_xlabel("frames")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder. Under DDP ``trainer.log_dir`` broadcasts rank 0's folder, a collective:
    every rank must ask at the same point, not rank 0 alone."""
    return Path(trainer.log_dir or trainer.default_root_dir)


# SLM_LAB_METRICS_PNG=0 leaves metrics.png out of the run folder.
METRICS_PNG_VAR = "SLM_LAB_METRICS_PNG"

# The keys of the summary: line, in order.
SUMMARY_LINE_KEYS = (
    "frames",
    "seconds",
    "fps",
    "return_ma",
    "best_return_ma",
    "frames_to_target",
    "seconds_to_target",
)


def write_summary(
    folder: Path, summary: dict[str, Any], history: dict[str, list], window: int
) -> None:
    """Write ``summary.json`` (``summary`` and the git SHA), ``returns.png`` and, where
    ``metrics.csv`` has rows, ``metrics.png`` (every logged metric against frames; not with
    ``SLM_LAB_METRICS_PNG=0``), and log
    ``summary: frames=… seconds=… fps=… return_ma=… best_return_ma=… frames_to_target=…
    seconds_to_target=…``.

    Args:
        folder: the run folder.
        summary: the run's figures (``algorithm``, ``env``, ``frames``, ``return_ma`` …).
        history: each finished episode's end frame and return (``frames``, ``returns``).
        window: episodes in the plotted moving average.
    """
    summary = {**summary, "git_sha": git_sha()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{summary['algorithm']} {summary['env']}"
    record = read_run(folder)
    evaluated = record.columns.get(EVAL_RETURN)
    evaluations = None
    if evaluated is not None:
        defined = np.isfinite(evaluated)  # the evaluation rows, between the training rows
        evaluations = record.frames[defined], evaluated[defined]
    plot_returns(
        folder / "returns.png", history["frames"], history["returns"], window, title, evaluations
    )
    # One small panel per metric costs ~0.3 s of matplotlib (mostly tick layout) per run:
    # nothing to a training run, but a suite or a search of many tiny runs may skip it.
    if os.environ.get(METRICS_PNG_VAR, "1") != "0" and record.frames.size:
        plot_metrics(folder / "metrics.png", record, title)
    logger.info("summary: " + " ".join(f"{k}={summary[k]}" for k in SUMMARY_LINE_KEYS))


class RunSummary(Callback):
    """Writes ``run.json`` (git SHA, algorithm, env) in the run folder when training starts.

    The end of a run (``summary.json``, ``returns.png``, the ``summary:`` line) is written by
    :class:`~slm_lightning.callbacks.MetricsTracker`, which holds the episodes.
    """

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = run_dir(trainer)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            info = {
                "git_sha": git_sha(),
                "algorithm": type(pl_module).__name__,
                "env": pl_module.env_spec.env_id,
            }
            (folder / "run.json").write_text(json.dumps(info, indent=2) + "\n")
