"""MetricsTracker: frames, fps, episode returns and their moving average, training diagnostics,
and the run's ``summary.json`` / ``returns.png`` at its end."""

import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from loguru import logger
from typing_extensions import override

from slm_lightning.callbacks.checkpoint import SIGINTException
from slm_lightning.callbacks.run_summary import run_dir, write_summary
from slm_lightning.config_types import PositiveCount
from slm_lightning.errors import ConfigError

# Metric keys, shared by every algorithm (algorithms add their own under train/):
#   rollout/frames, rollout/fps, rollout/episodes, rollout/updates, rollout/seconds (training
#   wall time, summed over resumed sessions),
#   episode/return, episode/length, episode/return_ma, episode/best_return_ma,
#   train/loss, train/entropy, train/lr, ... (from the algorithm's train_metrics: means over
#   the updates since the previous row, and the settings in force)
# Published to the other callbacks in trainer.callback_metrics only (not logged), every epoch:
#   rollout/episodes, rollout/window_episodes (episodes in the moving average), rollout/window
#   (its size), episode/return_ma, episode/best_return_ma, episode/target_return.

# Exceptions that stop a session on request (SIGTERM, Ctrl-C) rather than by a fault.
STOP_EXCEPTIONS = (SIGTERMException, SIGINTException, KeyboardInterrupt)

# The state key of checkpoints written before state keys named the window.
LEGACY_STATE_KEY = "MetricsTracker"


def gather_episodes(frames: list[int], returns: list[float]) -> tuple[list[int], list[float]]:
    """All ranks' finished episodes, ordered by frame (then rank): a collective.

    Args:
        frames: the frame clock at which each of this rank's episodes finished.
        returns: their returns.
    """
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (frames, returns))
    episodes = sorted(
        (frame, rank, i, ret)
        for rank, (rank_frames, rank_returns) in enumerate(gathered)
        for i, (frame, ret) in enumerate(zip(rank_frames, rank_returns, strict=True))
    )
    return [e[0] for e in episodes], [e[3] for e in episodes]


class MetricsTracker(Callback):
    """Tracks episodes and training diagnostics on the frame clock and sends them to the loggers.

    After every rollout it collects the episodes that finished and publishes the episode
    statistics in ``trainer.callback_metrics`` (in ``on_train_epoch_end``, which Lightning runs
    before the monitoring callbacks: :class:`FrameCheckpoint`, :class:`EarlyStopOnReturn`);
    every ``log_frequency`` frames it sends one row of metrics, with the frame count as the
    step, to every Lightning logger (and prints it through loguru when ``LOG_METRICS=true``).
    When fit ends, or dies after collecting frames, it writes the run's ``summary.json``,
    ``returns.png`` and ``summary:`` line (see :func:`write_summary`). The return moving
    average, best average and the first frame and second at which the average reached the
    target survive ``--ckpt_path`` resumes, under a state key naming ``window``; checkpoints
    whose state is under the key ``MetricsTracker`` (written before) still resume.

    Args:
        log_frequency: frames between two logged rows.
        window: episodes in the return moving average.
        target_return: the average return that counts as solved; None uses the env's
            registered reward threshold (no target if it has none).
        print_metrics: print each row to the console; None follows ``LOG_METRICS=true``.
    """

    def __init__(
        self,
        log_frequency: PositiveCount = 10_000,
        window: int = 100,
        target_return: float | None = None,
        print_metrics: bool | None = None,
    ) -> None:
        if log_frequency < 1:
            raise ConfigError(f"metrics.log_frequency must be >= 1, got {log_frequency}")
        if window < 1:
            raise ConfigError(f"metrics.window must be >= 1, got {window}")
        self.log_frequency = log_frequency
        self.window = window
        self.target_return = target_return
        if print_metrics is None:
            print_metrics = os.environ.get("LOG_METRICS", "false").lower() in ("1", "true", "yes")
        self.print_metrics = print_metrics
        self.recent: deque[float] = deque(maxlen=window)
        self.episodes = 0
        self.history: dict[str, list] = {"frames": [], "returns": [], "seconds": []}
        self.best_return_ma = -math.inf
        self.frames_to_target: int | None = None
        self.seconds_to_target: float | None = None
        self.seconds_before = 0.0  # training seconds of earlier (resumed-from) sessions
        self.start_frames = 0
        self.next_log = 0
        self._t0 = time.perf_counter()
        self._last_log_time = self._t0
        self._last_log_frames = 0
        self._run_dir: Path | None = None  # the run folder, resolved when training starts
        self._summary: dict[str, Any] | None = None  # figured at train end, written at fit end

    @property
    @override
    def state_key(self) -> str:
        # Not log_frequency nor target_return: a resume may change them and keep the episodes.
        return self._generate_state_key(window=self.window)

    @property
    def return_ma(self) -> float:
        return float(np.mean(self.recent)) if self.recent else float("nan")

    def seconds(self) -> float:
        """Training wall time, summed over resumed sessions."""
        return self.seconds_before + time.perf_counter() - self._t0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in setup: Lightning 2.6 empties callback_metrics after restoring the
        # checkpoint, and every callback's on_fit_start runs before any on_train_start.
        if self.target_return is None:
            self.target_return = pl_module.env_spec.reward_threshold()
        self.publish(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_dir = run_dir(trainer)  # a collective under DDP: asked where every rank is
        self.start_frames = pl_module.frames
        self._t0 = self._last_log_time = time.perf_counter()
        self._last_log_frames = pl_module.frames
        # The next multiple of log_frequency after the clock; a resumed run keeps the row that
        # was due when its checkpoint was written (logged at the first epoch end if overdue).
        due = (pl_module.frames // self.log_frequency + 1) * self.log_frequency
        self.next_log = min(self.next_log, due) if self.next_log > 0 else due

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.update(pl_module)
        if pl_module.frames >= self.next_log or trainer.should_stop:
            self.log_row(trainer, pl_module)
            self.next_log = (pl_module.frames // self.log_frequency + 1) * self.log_frequency

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.update(pl_module)
        if pl_module.frames > self._last_log_frames:
            self.log_row(trainer, pl_module)
        self._summary = self.summarize(pl_module, "finished")  # the clock stops here

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Written after every callback's on_train_end: the summary line follows the progress
        # bar's last state.
        if self._summary is not None and self._run_dir is not None and trainer.is_global_zero:
            write_summary(self._run_dir, self._summary, self.history, self.window)
        self._summary = None

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Other ranks may not be failing with this one: no collectives here (gather, broadcast).
        self.update(pl_module, gather=False)
        # Only a session that trained something has a summary worth writing; a crash at
        # start-up must not overwrite the summary of the run it was pointed at.
        if pl_module.frames <= self.start_frames or not trainer.is_global_zero:
            return
        folder = self._run_dir
        if folder is None:  # rank 0's own view of the folder, without asking the other ranks
            folder = Path(trainer.default_root_dir)
            if trainer.loggers and hasattr(trainer.loggers[0], "log_dir"):
                folder = Path(trainer.loggers[0].log_dir or folder)
        status = "stopped" if isinstance(exception, STOP_EXCEPTIONS) else "crashed"
        write_summary(folder, self.summarize(pl_module, status), self.history, self.window)

    def update(self, pl_module: L.LightningModule, gather: bool = True) -> None:
        """Take the episodes finished since the last call from the rollout.

        Under DDP each rank drains its own envs' episodes and all ranks exchange them, so
        every rank's tracker (moving average, best average, history) holds the same numbers
        and rank 0 logs the episodes of all ranks.

        Args:
            pl_module: the algorithm.
            gather: exchange episodes with the other ranks; every rank must then call this at
                the same point (epoch and train end). False keeps this rank's own (exceptions).
        """
        if pl_module.rollout is None:
            return
        end_frames, returns, _ = pl_module.rollout.episodes.drain()
        trainer = pl_module.trainer
        if gather and trainer.world_size > 1:
            end_frames, returns = gather_episodes(end_frames, returns)
        now = self.seconds()
        for frame, ret in zip(end_frames, returns, strict=True):
            self.recent.append(ret)
            self.episodes += 1
            self.history["frames"].append(frame)
            self.history["returns"].append(ret)
            self.history["seconds"].append(now)
            if len(self.recent) == self.window:  # a full window before the target counts
                ma = self.return_ma
                self.best_return_ma = max(self.best_return_ma, ma)
                if (
                    self.frames_to_target is None
                    and self.target_return is not None
                    and ma >= self.target_return
                ):
                    self.frames_to_target, self.seconds_to_target = frame, now
        self.publish(trainer)

    def publish(self, trainer: L.Trainer) -> None:
        """Put the episode statistics in ``trainer.callback_metrics``, where the checkpoint,
        early stop and progress bar callbacks read them (float64: the early stop compares the
        moving average with its target exactly)."""
        metrics = trainer.callback_metrics
        metrics["rollout/episodes"] = torch.tensor(self.episodes)
        metrics["rollout/window_episodes"] = torch.tensor(len(self.recent))
        metrics["rollout/window"] = torch.tensor(self.window)
        if self.recent:
            metrics["episode/return_ma"] = torch.tensor(self.return_ma, dtype=torch.float64)
        if self.best_return_ma > -math.inf:
            metrics["episode/best_return_ma"] = torch.tensor(
                self.best_return_ma, dtype=torch.float64
            )
        if self.target_return is not None:
            metrics["episode/target_return"] = torch.tensor(
                float(self.target_return), dtype=torch.float64
            )

    def log_row(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Send one row of metrics to the loggers (and to the console when LOG_METRICS=true)."""
        now = time.perf_counter()
        frames = pl_module.frames
        fps = (frames - self._last_log_frames) / max(now - self._last_log_time, 1e-9)
        self._last_log_time, self._last_log_frames = now, frames
        metrics: dict[str, float] = {
            "rollout/frames": frames,
            "rollout/fps": fps,
            "rollout/episodes": self.episodes,
            "rollout/updates": trainer.global_step,
            "rollout/seconds": self.seconds(),
        }
        if self.recent:
            metrics["episode/return"] = self.recent[-1]
            metrics["episode/return_ma"] = self.return_ma
        if self.best_return_ma > -math.inf:
            metrics["episode/best_return_ma"] = self.best_return_ma
        metrics.update(pl_module.train_metrics.pop_row())
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=frames)
                lg.save()  # rows reach metrics.csv while a long run is still going
        if self.print_metrics and trainer.is_global_zero:
            shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
            logger.info(f"[{type(pl_module).__name__}] {shown}")

    def summarize(self, pl_module: L.LightningModule, status: str) -> dict[str, Any]:
        """The figures of ``summary.json`` as they stand now (all but the git SHA).

        Args:
            pl_module: the algorithm.
            status: how the session ended: ``finished`` (its frame budget or early stop),
                ``stopped`` (SIGTERM or Ctrl-C, at a checkpoint) or ``crashed``.
        """
        seconds = self.seconds()
        frames = pl_module.frames

        def finite(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 3)

        return {
            "algorithm": type(pl_module).__name__,
            "env": pl_module.env_spec.env_id,
            "frames": frames,
            "start_frames": self.start_frames,
            "episodes": self.episodes,
            "seconds": round(seconds, 2),
            "fps": round(frames / seconds) if seconds > 0 else None,
            "return_ma": finite(self.return_ma),
            "best_return_ma": finite(self.best_return_ma),
            "target_return": self.target_return,
            "frames_to_target": self.frames_to_target,
            "seconds_to_target": finite(self.seconds_to_target),
            "status": status,
        }

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint of an earlier version keeps this state under the constant key: move it
        # to ours, which Lightning then loads. Lightning 2.6 has warned of the old key already
        # ("Please add the following callbacks"), before any on_load_checkpoint runs.
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and LEGACY_STATE_KEY in states:
            states[self.state_key] = states.pop(LEGACY_STATE_KEY)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": list(self.recent),
            "episodes": self.episodes,
            "history": self.history,
            "best_return_ma": self.best_return_ma,
            "frames_to_target": self.frames_to_target,
            "seconds_to_target": self.seconds_to_target,
            "seconds": self.seconds(),
            "next_log": self.next_log,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent = deque(state_dict["recent"], maxlen=self.window)
        self.episodes = state_dict["episodes"]
        self.history = state_dict["history"]
        self.best_return_ma = state_dict["best_return_ma"]
        self.frames_to_target = state_dict["frames_to_target"]
        self.seconds_to_target = state_dict["seconds_to_target"]
        self.seconds_before = state_dict["seconds"]
        self.next_log = state_dict["next_log"]
