"""EarlyStopOnReturn: end training once the episode return moving average reaches a target."""

import lightning as L
from lightning.pytorch.callbacks import Callback
from loguru import logger
from typing_extensions import override

from slm_lightning.callbacks.metrics import MetricsTracker
from slm_lightning.errors import ConfigError


class EarlyStopOnReturn(Callback):
    """Stops training when ``episode/return_ma`` reaches ``target_return``.

    Lightning's ``EarlyStopping`` fits RL poorly: its ``patience`` stops a run whose return
    plateaus for a few rollouts, and it fails (or warns every epoch) before the first
    episode ends. This callback checks after every rollout, once the moving average holds
    ``min_episodes`` episodes, and sets ``trainer.should_stop``; the run then ends as at its
    frame budget, so MetricsTracker logs a last row, FrameCheckpoint writes ``last.ckpt``
    and RunSummary writes ``summary.json``. Under DDP, one rank reaching the target stops
    all ranks.

    Args:
        target_return: the return moving average that ends training; None uses
            ``metrics.target_return`` (by default the env's registered reward threshold).
        min_episodes: episodes the moving average must hold before it counts; None means a
            full ``metrics.window``.
    """

    def __init__(self, target_return: float | None = None, min_episodes: int | None = None) -> None:
        if min_episodes is not None and min_episodes < 1:
            raise ValueError(f"early_stop.min_episodes must be >= 1 or null, got {min_episodes}")
        self.target_return = target_return
        self.min_episodes = min_episodes
        self.stopped_frame: int | None = None

    @staticmethod
    def tracker(trainer: L.Trainer) -> MetricsTracker:
        for callback in trainer.callbacks:
            if isinstance(callback, MetricsTracker):
                return callback
        raise RuntimeError("EarlyStopOnReturn needs the MetricsTracker callback")

    def target(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The target in force: ours, else the tracker's, else the env's reward threshold."""
        tracker = self.tracker(trainer)
        for target in (self.target_return, tracker.target_return):
            if target is not None:
                return float(target)
        threshold = pl_module.env_spec.reward_threshold()
        if threshold is None:
            raise ConfigError(
                f"early stopping: {pl_module.env_spec.env_id} has no reward threshold; "
                "set target_return on EarlyStopOnReturn (or metrics.target_return)"
            )
        return float(threshold)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.target(trainer, pl_module)  # a missing target fails now, not after a long run

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tracker = self.tracker(trainer)
        tracker.update(pl_module)  # take this rollout's episodes, whatever the callback order
        needed = tracker.window if self.min_episodes is None else self.min_episodes
        target = self.target(trainer, pl_module)
        reached = len(tracker.recent) >= min(needed, tracker.window) and (
            tracker.return_ma >= target
        )
        reached = trainer.strategy.reduce_boolean_decision(reached, all=False)
        if reached and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_frame = pl_module.frames
            if trainer.is_global_zero:
                logger.info(
                    f"early stop: episode/return_ma={tracker.return_ma:.4g} >= {target:.4g} "
                    f"at frame {pl_module.frames} of {pl_module.max_frames}"
                )
