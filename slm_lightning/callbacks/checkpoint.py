"""FrameCheckpoint: ``last.ckpt`` every N frames and at the end, ``best.ckpt`` by return MA."""

import math
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class FrameCheckpoint(Callback):
    """Checkpoints on the frame clock, away from the per-step path.

    Every ``every_n_frames`` frames it overwrites ``checkpoints/last.ckpt`` and, when the
    return moving average (``episode/return_ma``, set by MetricsTracker) beats the best
    saved so far, ``checkpoints/best.ckpt``. It also saves ``last.ckpt`` when training ends
    or dies from an exception, so ``--ckpt_path`` can always resume. Files are written to a
    temporary name and renamed, so a crash mid-write never leaves a truncated checkpoint.

    Args:
        every_n_frames: frames between two checkpoints.
        dirpath: where to write; None means ``<run folder>/checkpoints``.
        save_best: also keep ``best.ckpt``.
    """

    def __init__(
        self, every_n_frames: int = 50_000, dirpath: str | None = None, save_best: bool = True
    ) -> None:
        if every_n_frames < 1:
            raise ValueError(f"checkpoint.every_n_frames must be >= 1, got {every_n_frames}")
        self.every_n_frames = every_n_frames
        self.dirpath = dirpath
        self.save_best = save_best
        self.best_return_ma = -math.inf
        self.next_save = every_n_frames

    @property
    def state_key(self) -> str:
        return "FrameCheckpoint"

    def directory(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.frames >= self.next_save:
            self.next_save = (pl_module.frames // self.every_n_frames + 1) * self.every_n_frames
            self.save(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if pl_module.frames > 0:
            self.save(trainer, best=False)

    def save(self, trainer: L.Trainer, best: bool = True) -> None:
        self._write(trainer, "last.ckpt")
        ma = trainer.callback_metrics.get("episode/return_ma")
        if best and self.save_best and ma is not None and float(ma) > self.best_return_ma:
            self.best_return_ma = float(ma)
            self._write(trainer, "best.ckpt")

    def _write(self, trainer: L.Trainer, name: str) -> None:
        path = self.directory(trainer) / name
        tmp = path.with_suffix(".ckpt.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, path)

    @override
    def state_dict(self) -> dict:
        return {"best_return_ma": self.best_return_ma, "next_save": self.next_save}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.best_return_ma = state_dict["best_return_ma"]
        self.next_save = state_dict["next_save"]
