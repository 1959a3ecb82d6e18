"""EarlyStopOnReturn: end training once the episode return moving average reaches a target."""

import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from loguru import logger
from typing_extensions import override

from slm_lightning.errors import ConfigError

MONITOR = "episode/return_ma"


class EarlyStopOnReturn(EarlyStopping):
    """Stops training when ``episode/return_ma`` reaches ``target_return``.

    Lightning's ``EarlyStopping`` monitoring ``episode/return_ma`` (published by
    MetricsTracker) with ``stopping_threshold`` set to the target, tuned for RL: the
    threshold counts when reached (``>=``, Lightning's is ``>``); a plateau never stops a run
    (no patience); nothing is checked, warned of or failed before the moving average holds
    ``min_episodes`` episodes (``rollout/window_episodes``), so a run whose first episodes
    end late is fine. As a monitoring callback it runs after MetricsTracker and the
    algorithm's epoch-end hooks, whatever the callback order. The run then ends as at its
    frame budget: MetricsTracker logs a last row and writes ``summary.json``, FrameCheckpoint
    writes ``last.ckpt``. Under DDP, one rank reaching the target stops all ranks. The frame
    and reason of the stop are in ``state_dict`` (``stopped_frame``,
    ``stopping_reason_message``).

    Args:
        target_return: the return moving average that ends training; None uses
            ``metrics.target_return`` (by default the env's registered reward threshold).
        min_episodes: episodes the moving average must hold before it counts; None means a
            full ``metrics.window``.
    """

    # "max" stops when the moving average is at or above the target (CartPole-v1's 500 is
    # both its maximum and a reachable target).
    mode_dict = {"min": torch.lt, "max": torch.ge}
    order_dict = {"min": "<", "max": ">="}

    def __init__(self, target_return: float | None = None, min_episodes: int | None = None) -> None:
        if min_episodes is not None and min_episodes < 1:
            raise ConfigError(f"early_stop.min_episodes must be >= 1 or null, got {min_episodes}")
        super().__init__(
            monitor=MONITOR,
            mode="max",
            patience=sys.maxsize,  # a plateau is no reason to stop an RL run
            check_finite=False,  # the algorithm stops on a non-finite return itself
            stopping_threshold=target_return,
            check_on_train_epoch_end=True,
        )
        self.target_return = target_return
        self.min_episodes = min_episodes
        self.stopped_frame: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor, target_return=self.target_return, min_episodes=self.min_episodes
        )

    def target(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The target in force: ours, else MetricsTracker's (``episode/target_return``), else
        the env's reward threshold."""
        published = trainer.callback_metrics.get("episode/target_return")
        for target in (self.target_return, published):
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
        metrics = trainer.callback_metrics
        # Every rank holds the same episodes (MetricsTracker gathers them) and the same frame
        # clock, so every rank returns here alike and reaches the collective below alike.
        if trainer.should_stop or "rollout/window_episodes" not in metrics:
            return  # the run ends anyway (frame budget), or no episode has ended yet
        window = int(metrics["rollout/window"])
        needed = window if self.min_episodes is None else min(self.min_episodes, window)
        if int(metrics["rollout/window_episodes"]) < needed:
            return
        self.stopping_threshold = self.target(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.should_stop:
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD  # on every rank
            self.stopped_frame = pl_module.frames
            self.stopping_reason_message = (
                f"{MONITOR}={float(metrics[MONITOR]):.4g} >= {self.stopping_threshold:.4g} "
                f"at frame {pl_module.frames} of {pl_module.max_frames}"
            )
            if trainer.is_global_zero:
                logger.info(f"early stop: {self.stopping_reason_message}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stopped_frame": self.stopped_frame}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stopped_frame = state_dict.get("stopped_frame")
