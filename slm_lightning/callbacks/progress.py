"""FrameProgressBar: progress on the frame clock (frames, fps, episodes, return, ETA) while fitting."""

import datetime
import math
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from loguru import logger
from tqdm import tqdm
from typing_extensions import override

from slm_lightning.errors import ConfigError

# A terminal bar redrawn more often than this costs time and shows nothing new.
REDRAW_SECONDS = 0.25


class FrameProgressBar(ProgressBar):
    """Lightning's progress bar for RL runs: frames / ``max_frames``, fps, episodes, the return
    moving average and its best, and the time left.

    Lightning's own bars count batches and epochs, which mean nothing when a run ends on a
    frame budget; as a :class:`~lightning.pytorch.callbacks.ProgressBar` this one replaces
    them (``--trainer.enable_progress_bar=false`` turns it off). When stderr is a terminal it
    draws a tqdm bar, redrawn at most 4 times a second; otherwise (CI, a cloud job's log) it
    logs one ``progress:`` line every ``interval`` seconds. It reads the counters once per
    rollout cycle (``on_train_epoch_end``), never per training step: frames from the
    algorithm, episodes and returns from ``trainer.callback_metrics`` (set by MetricsTracker).

    Args:
        interval: seconds between two status lines when stderr is not a terminal.
        terminal: draw the bar (true) or log status lines (false); null picks the bar when
            stderr is a terminal.
    """

    def __init__(self, interval: float = 30.0, terminal: bool | None = None) -> None:
        super().__init__()
        if not interval > 0:
            raise ConfigError(f"progress.interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self.terminal = terminal
        self.enabled = True
        self.bar: tqdm | None = None
        self._t0 = self._last = 0.0
        self._start_frames = 0

    @override
    def disable(self) -> None:
        self.enabled = False

    @override
    def enable(self) -> None:
        self.enabled = True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._start_frames = pl_module.frames
        terminal = sys.stderr.isatty() if self.terminal is None else self.terminal
        if self.enabled and terminal:
            self.bar = tqdm(
                desc=type(pl_module).__name__,
                total=pl_module.max_frames,
                initial=pl_module.frames,
                unit=" frames",
                unit_scale=True,
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=REDRAW_SECONDS,
            )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < (REDRAW_SECONDS if self.bar is not None else self.interval):
            return
        self._last = now
        if self.bar is not None:
            self._draw(self.bar, trainer, pl_module.frames)
        else:
            logger.info(self.status_line(trainer, pl_module.frames, pl_module.max_frames, now))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self._draw(self.bar, trainer, pl_module.frames)
        self._close()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _draw(self, bar: tqdm, trainer: L.Trainer, frames: int) -> None:
        stats = self.episode_stats(trainer)
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
        bar.total = max(bar.total, frames)  # the last rollout may overshoot the budget
        bar.update(frames - bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @staticmethod
    def episode_stats(trainer: L.Trainer) -> dict[str, float]:
        """Episodes, return moving average and best average, where MetricsTracker has them."""
        names = {
            "rollout/episodes": "episodes",
            "episode/return_ma": "return_ma",
            "episode/best_return_ma": "best_return_ma",
        }
        return {
            short: float(trainer.callback_metrics[key])
            for key, short in names.items()
            if key in trainer.callback_metrics
        }

    def status_line(self, trainer: L.Trainer, frames: int, max_frames: int, now: float) -> str:
        """``progress: frames=20480/150000 (13.7%) fps=12034 episodes=321 return_ma=45.2 …``.

        Args:
            trainer: the trainer (its ``callback_metrics`` hold the episode statistics).
            frames: the frame clock.
            max_frames: the frame budget.
            now: ``time.monotonic()`` now; fps and ETA count from the start of this session.
        """
        fps = (frames - self._start_frames) / max(now - self._t0, 1e-9)
        left = max(max_frames - frames, 0)
        eta = str(datetime.timedelta(seconds=round(left / fps))) if fps > 0 else "?"
        stats = " ".join(
            f"{k}={v:.0f}" if k == "episodes" else f"{k}={v:.4g}"
            for k, v in self.episode_stats(trainer).items()
            if math.isfinite(v)
        )
        share = 100.0 * frames / max_frames
        return (
            f"progress: frames={frames}/{max_frames} ({share:.1f}%) fps={fps:.0f} "
            f"{stats}{' ' if stats else ''}eta={eta}"
        )
