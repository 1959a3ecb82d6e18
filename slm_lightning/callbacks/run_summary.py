"""RunSummary: the run folder's git SHA, ``summary:`` line, ``summary.json`` and ``returns.png``."""

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from loguru import logger
from typing_extensions import override

from slm_lightning.callbacks.metrics import MetricsTracker


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
    path: Path, frames: list[int], returns: list[float], window: int, title: str
) -> None:
    """Episode returns (dots) and their moving average (line) against frames."""
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
        ax.legend(loc="lower right")
    ax.set_xlabel("frames")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class RunSummary(Callback):
    """Writes what a finished (or crashed) run leaves in its folder.

    At the start: ``run.json`` (git SHA, algorithm, env). At the end: the learning curve
    ``returns.png``, ``summary.json``, and one console line
    ``summary: frames=… seconds=… fps=… return_ma=… best_return_ma=… frames_to_target=… seconds_to_target=…``.
    """

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    @staticmethod
    def run_dir(trainer: L.Trainer) -> Path:
        """The run folder. Under DDP ``trainer.log_dir`` broadcasts rank 0's folder, a
        collective: every rank must ask at the same point, not rank 0 alone."""
        return Path(trainer.log_dir or trainer.default_root_dir)

    @staticmethod
    def tracker(trainer: L.Trainer) -> MetricsTracker:
        for callback in trainer.callbacks:
            if isinstance(callback, MetricsTracker):
                return callback
        raise RuntimeError("RunSummary needs the MetricsTracker callback")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = self.run_dir(trainer)
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            info = {
                "git_sha": git_sha(),
                "algorithm": type(pl_module).__name__,
                "env": pl_module.env_spec.env_id,
            }
            (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Only a session that trained something has a summary worth writing; a crash at
        # start-up must not overwrite the summary of the run it was pointed at.
        # Other ranks may not be failing with this one: no collectives here (gather, broadcast).
        if pl_module.frames > self.tracker(trainer).start_frames:
            self.write(trainer, pl_module, collective=False)

    def write(
        self, trainer: L.Trainer, pl_module: L.LightningModule, collective: bool = True
    ) -> None:
        """Write ``summary.json`` and ``returns.png`` and log the ``summary:`` line (rank 0).

        Args:
            trainer: the trainer.
            pl_module: the algorithm.
            collective: every rank calls this at the same point, so episodes can be gathered
                and the run folder broadcast; False after an exception.
        """
        tracker = self.tracker(trainer)
        tracker.update(pl_module, gather=collective)
        seconds = tracker.seconds()
        frames = pl_module.frames

        def finite(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 3)

        self.summary = {
            "algorithm": type(pl_module).__name__,
            "env": pl_module.env_spec.env_id,
            "frames": frames,
            "start_frames": tracker.start_frames,
            "episodes": tracker.episodes,
            "seconds": round(seconds, 2),
            "fps": round(frames / seconds) if seconds > 0 else None,
            "return_ma": finite(tracker.return_ma),
            "best_return_ma": finite(tracker.best_return_ma),
            "target_return": tracker.target_return,
            "frames_to_target": tracker.frames_to_target,
            "seconds_to_target": finite(tracker.seconds_to_target),
            "git_sha": git_sha(),
        }
        if collective:
            run_dir = self.run_dir(trainer)
        else:  # rank 0's own view of the folder, without asking the other ranks
            run_dir = Path(trainer.default_root_dir)
            if trainer.loggers and hasattr(trainer.loggers[0], "log_dir"):
                run_dir = Path(trainer.loggers[0].log_dir or run_dir)
        if not trainer.is_global_zero:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        title = f"{self.summary['algorithm']} {self.summary['env']}"
        plot_returns(
            run_dir / "returns.png",
            tracker.history["frames"],
            tracker.history["returns"],
            tracker.window,
            title,
        )
        keys = (
            "frames",
            "seconds",
            "fps",
            "return_ma",
            "best_return_ma",
            "frames_to_target",
            "seconds_to_target",
        )
        logger.info("summary: " + " ".join(f"{k}={self.summary[k]}" for k in keys))
