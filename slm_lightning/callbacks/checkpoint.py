"""FrameCheckpoint: ``last.ckpt`` every N frames and at the end, ``best.ckpt`` by return MA, and a
``last.ckpt`` when training dies from an exception or is stopped by SIGTERM or SIGINT."""

import errno
import math
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from loguru import logger
from typing_extensions import override

from slm_lightning.checkpoints import checkpoint_frames
from slm_lightning.config_types import PositiveCount
from slm_lightning.errors import ConfigError

# Exit status of a run stopped by SIGTERM, as a shell reports a process killed by it: the job
# scheduler (dstack, SLURM, Kubernetes) sees a failure and may restart it with --ckpt_path last.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
SIGINT_EXIT_CODE = 128 + signal.SIGINT

# The state key of checkpoints written before state keys named the directory.
LEGACY_STATE_KEY = "FrameCheckpoint"


class SIGINTException(SystemExit):
    """Ends fit after SIGINT (Ctrl-C) with exit status 130, as SIGTERMException does after SIGTERM.

    A ``SystemExit``: Lightning 2.6 passes it through ``on_exception`` and the loggers'
    ``finalize`` and re-raises it, whereas it turns a ``KeyboardInterrupt`` into
    ``sys.exit(1)`` (``trainer/call.py``, ``_call_and_handle_interrupt``).
    """

    def __init__(self) -> None:
        super().__init__(SIGINT_EXIT_CODE)


class FrameCheckpoint(Checkpoint):
    """Checkpoints on the frame clock, away from the per-step path.

    Every ``every_n_frames`` frames it overwrites ``checkpoints/last.ckpt`` and, when the
    return moving average (``episode/return_ma``, set by MetricsTracker) beats the best
    saved so far, ``checkpoints/best.ckpt``. It also saves ``last.ckpt`` when training ends
    or dies from an exception, so ``--ckpt_path`` can always resume. Files are written to a
    temporary name and renamed, so a crash mid-write never leaves a truncated checkpoint.

    A checkpoint never replaces a good one with something worse: weights that are not finite
    are not written, a non-finite reward, observation or loss (``FloatingPointError``) keeps
    the last checkpoint instead of saving the state it was met in, a full disk leaves the
    previous file (and no temporary one), and a session that collected no frame (a resume
    that failed at start) writes nothing. Each case says in one line which frame the kept
    checkpoint holds.

    SIGTERM (a preempted cloud or cluster job) and a first SIGINT (Ctrl-C) do not stop
    training mid-update, as Lightning's own handlers do after the current batch: the current
    rollout cycle (one Lightning epoch, well under a second to a few seconds) finishes, so the
    checkpoint holds a consistent state (every rollout fully trained on, its episodes
    counted), then ``last.ckpt`` is written, the loggers are closed and the process exits with
    status 143 (SIGTERM) or 130 (SIGINT). A second SIGINT stops at once, still writing
    ``last.ckpt`` (mid-rollout, as after an exception), with status 130. Under DDP the ranks
    agree at each epoch end, so all stop at the same epoch. A SIGINT ignored when the process
    started (``nohup``, a shell's background job) stays ignored.

    As a Lightning ``Checkpoint`` it is the trainer's ``checkpoint_callback`` (so Lightning
    adds no ``ModelCheckpoint`` of its own) and runs last: after MetricsTracker published
    this rollout's ``episode/return_ma`` and after the algorithm's epoch-end hooks, whatever
    the order the callbacks were given in. Its state (best average, next save) is saved under
    a key naming ``dirpath``: two instances writing into one folder would overwrite each
    other's files, and Lightning refuses them; checkpoints whose state is under the key
    ``FrameCheckpoint`` (written before) still resume.

    Args:
        every_n_frames: frames between two checkpoints.
        dirpath: where to write; None means ``<run folder>/checkpoints``.
        save_best: also keep ``best.ckpt``.
    """

    def __init__(
        self,
        every_n_frames: PositiveCount = 50_000,
        dirpath: str | None = None,
        save_best: bool = True,
    ) -> None:
        if every_n_frames < 1:
            raise ConfigError(f"checkpoint.every_n_frames must be >= 1, got {every_n_frames}")
        self.every_n_frames = every_n_frames
        self.dirpath = dirpath
        self.save_best = save_best
        self.best_return_ma = -math.inf
        self.next_save = every_n_frames
        self.stop_signal: signal.Signals | None = None  # the first stop signal received
        self.stopping = False  # fit is ending: later signals are ignored
        self._handler_pid: int | None = None  # the process whose signals the handler handles
        self._directory: Path | None = None  # resolved when training starts
        self.start_frames: int | None = None  # the frame clock this session trained from
        self.saved_frames: dict[str, int] = {}  # file name -> frame it holds, when known
        # ModelCheckpoint's public names for the files written, which other callbacks and
        # loggers read (e.g. WandbCheckpoints); "" until written in this session.
        self.last_model_path = ""
        self.best_model_path = ""

    @property
    @override
    def state_key(self) -> str:
        # Not every_n_frames: a resume may change it and keep the best average of the files.
        return self._generate_state_key(dirpath=self.dirpath)

    def directory(self, trainer: L.Trainer) -> Path:
        """Where the checkpoints go; the run folder is resolved once, when training starts."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        if self._directory is not None:
            return self._directory
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts rank 0's folder under DDP, a collective: ask here, where
        # every rank is, so that on_exception (maybe on one rank alone) never has to.
        if self.dirpath is None:
            self._directory = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        # Lightning registered its SIGTERM handler when fit began and restores the previous
        # handlers when fit ends; replacing it here keeps its mid-epoch stop from firing.
        self.stop_signal = None
        self.stopping = False
        if threading.current_thread() is threading.main_thread():
            self._handler_pid = os.getpid()
            signal.signal(signal.SIGTERM, self._on_signal)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, self._on_signal)
        self.start_frames = pl_module.frames
        resumed = trainer.ckpt_path and Path(trainer.ckpt_path).resolve()
        self.saved_frames = {
            name: pl_module.frames
            for name in ("last.ckpt", "best.ckpt")
            if resumed == (self.directory(trainer) / name).resolve()
        }

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._handler_pid:
            # A forked child (an env worker) inherited this handler, and the trainer's signals
            # are not its own: SIGTERM (close's or the interpreter exit's terminate()) ends it,
            # SIGINT (Ctrl-C to the process group) is left to the trainer, which closes it.
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.stopping:
            return  # fit is ending (checkpoint, summary, loggers, workers): let it finish
        if self.stop_signal is not None and signum == signal.SIGINT:
            self.stopping = True  # a second Ctrl-C: stop now
            logger.warning("SIGINT received again: stopping now")
            raise SIGINTException()
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum)
            again = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
            logger.warning(
                f"{self.stop_signal.name} received: stopping after this rollout cycle{again}"
            )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Any rank that was signalled stops every rank (one small collective per epoch in DDP),
        # with the exit status of SIGTERM when any rank received it.
        received = self.stop_signal is not None
        if trainer.strategy.reduce_boolean_decision(received, all=False):
            sigterm = self.stop_signal == signal.SIGTERM
            self.stopping = True
            if trainer.strategy.reduce_boolean_decision(sigterm, all=False):
                raise SIGTERMException(SIGTERM_EXIT_CODE)  # on_exception writes last.ckpt
            raise SIGINTException()
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
        self.stopping = True
        # Nothing to add to what the run folder holds if this session collected no frame.
        if self.start_frames is None or pl_module.frames <= self.start_frames:
            return
        if isinstance(exception, FloatingPointError):
            # Met a NaN or inf: the state holds it already, or will (normaliser statistics,
            # returns in memory, optimizer moments), and a resume from it fails for ever.
            if trainer.is_global_zero:
                logger.warning(
                    f"not saving the state at frame {pl_module.frames} after a non-finite "
                    f"value; {self._kept(trainer, 'last.ckpt')}"
                )
            return
        # No collectives here: this rank may be failing alone, and the others would not answer.
        if self.save(trainer, best=False, collective=False) and trainer.is_global_zero:
            if isinstance(exception, SIGTERMException):
                reason = "SIGTERM"
            elif isinstance(exception, SIGINTException | KeyboardInterrupt):
                reason = "SIGINT"
            else:
                reason = "the error"
            logger.info(
                f"saved {self.directory(trainer) / 'last.ckpt'} at frame {pl_module.frames} "
                f"after {reason}; resume with --ckpt_path last"
            )

    def save(self, trainer: L.Trainer, best: bool = True, collective: bool = True) -> bool:
        """Write ``last.ckpt`` and, with ``best``, ``best.ckpt`` if the return MA improved.

        Args:
            trainer: the trainer.
            best: also consider ``best.ckpt``.
            collective: every rank calls this at the same point; False after an exception,
                when rank 0 writes without waiting for the others.

        Returns:
            whether ``last.ckpt`` was written.
        """
        written = self._write(trainer, "last.ckpt", collective)
        ma = trainer.callback_metrics.get("episode/return_ma")
        better = ma is not None and float(ma) > self.best_return_ma
        if best and self.save_best and better and self._write(trainer, "best.ckpt", collective):
            self.best_return_ma = float(ma)
        return written

    def _write(self, trainer: L.Trainer, name: str, collective: bool = True) -> bool:
        path = self.directory(trainer) / name
        frames = trainer.lightning_module.frames
        # DDP keeps the weights equal on every rank, so every rank decides alike.
        bad = next(
            (
                key
                for key, tensor in trainer.lightning_module.state_dict().items()
                if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())
            ),
            None,
        )
        if bad is not None:
            if trainer.is_global_zero:
                logger.error(
                    f"not saving {name} at frame {frames}: the weights are not finite "
                    f"({bad}); {self._kept(trainer, name)}"
                )
            return False
        tmp = path.with_suffix(".ckpt.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if collective:
                trainer.save_checkpoint(tmp, weights_only=False)
            elif trainer.is_global_zero:
                # Trainer.save_checkpoint ends in a barrier (Lightning 2.6) that the other ranks
                # may never reach; build and write rank 0's checkpoint as it does, without it.
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.save_checkpoint(checkpoint, tmp)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if collective:
                # Only rank 0 writes: it failed before Trainer.save_checkpoint's closing
                # barrier, in which the other ranks wait.
                trainer.strategy.barrier("Trainer.save_checkpoint")
            logger.error(
                f"disk full: could not save {name} at frame {frames} ({err.strerror}); "
                f"{self._kept(trainer, name)}"
            )
            return False
        if trainer.is_global_zero:
            os.replace(tmp, path)
        self.saved_frames[name] = frames
        if name == "last.ckpt":
            self.last_model_path = str(path)
        else:
            self.best_model_path = str(path)
        return True

    def _kept(self, trainer: L.Trainer, name: str) -> str:
        """``kept …/last.ckpt (frame 4096)``: what the run folder holds instead (rank 0)."""
        path = self.directory(trainer) / name
        if not path.is_file():
            return f"no {name} was saved before"
        if name not in self.saved_frames:  # written by an earlier session: read its clock
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            self.saved_frames[name] = checkpoint_frames(checkpoint)
        return f"kept {path} (frame {self.saved_frames[name]})"

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
    def state_dict(self) -> dict:
        return {"best_return_ma": self.best_return_ma, "next_save": self.next_save}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.best_return_ma = state_dict["best_return_ma"]
        self.next_save = state_dict["next_save"]
