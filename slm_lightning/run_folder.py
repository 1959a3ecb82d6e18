"""The run folder: created exclusively for each new run, continued in place by a resume, and
written to only once a session has trained.

Data path of a ``fit``: ``claim_run_dir`` (cli: before the classes are instantiated) →
``RunCSVLogger.continue_metrics_file`` (loggers.py; cli: before fit, for a run continued in
place) → ``RunConfig`` (at the first epoch end, at the end of training, or on an exception
after progress: ``config.yaml``, the hyperparameters, and ``metrics.csv`` cut back to the
frame the session resumed from).
"""

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

from slm_lightning.loggers import RunCSVLogger

# The run folder's name, exported by the process that created it: Lightning's DDP launcher
# starts the other ranks with this environment, so they open the same folder.
RUN_STAMP_VAR = "SLM_RUN_STAMP"


def claim_run_dir(parent: Path, create: bool = True) -> tuple[Path, list[Path]]:
    """A new run folder ``parent/<timestamp>`` that no other process uses, and the folders
    this call created (so a command that then fails can remove them again).

    The folder is created with ``os.mkdir``, which fails if it exists: a second run started in
    the same second gets ``<timestamp>-1``, a third ``<timestamp>-2``. A rank that Lightning's
    DDP launcher started (``LOCAL_RANK`` > 0) opens the folder its rank 0 created instead;
    multi-node launches, which start every process independently, pass
    ``--trainer.default_root_dir``.

    Args:
        parent: ``runs/<config name>``.
        create: False names the first free folder without creating it (a CLI instantiated
            without running a subcommand writes nothing).
    """
    inherited = os.environ.get(RUN_STAMP_VAR)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return parent / inherited, []
    stamp = time.strftime("%Y_%m_%d_%H%M%S")
    missing = [p for p in (parent, *parent.parents) if str(p) != "." and not p.exists()]
    suffix = 0
    while True:
        name = f"{stamp}-{suffix}" if suffix else stamp
        if not create:
            if (parent / name).exists():
                suffix += 1
                continue
            return parent / name, []
        parent.mkdir(parents=True, exist_ok=True)
        try:
            (parent / name).mkdir()
        except FileExistsError:
            suffix += 1
            continue
        except FileNotFoundError:  # another process removed the empty parent meanwhile
            continue
        os.environ[RUN_STAMP_VAR] = name  # inherited by the rank processes fit launches
        return parent / name, [parent / name, *missing]


def release_run_dirs(created: list[Path]) -> None:
    """Remove the folders :func:`claim_run_dir` created, innermost first, where still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written, or another run uses it)
            return


class RunConfig(SaveConfigCallback):
    """Writes a fit's ``config.yaml`` and hyperparameters once the session has trained.

    Lightning's ``SaveConfigCallback`` writes ``config.yaml`` at setup, so a resume that then
    fails (its env cannot be built, a setting does not fit the checkpoint) would leave the run
    with a config it cannot be resumed with. Here a fit writes its files, and cuts
    ``metrics.csv`` back to the frame it resumed from, at its first epoch end, at the end of
    training or on an exception after frames were collected: a session that collected no
    frame leaves the folder as it was. ``validate`` and ``test`` write their config at setup,
    as Lightning does. Put it first among the callbacks, so that it runs before any row of
    the session is logged at an epoch end.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_frames: int | None = None  # the frame clock this session trained from

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_frames = pl_module.frames

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.commit(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.commit(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.start_frames is not None and pl_module.frames > self.start_frames:
            self.commit(trainer, pl_module, collective=False)

    def commit(
        self, trainer: L.Trainer, pl_module: L.LightningModule, collective: bool = True
    ) -> None:
        """Write the session's files into the run folder (once).

        Args:
            trainer: the trainer.
            pl_module: the algorithm.
            collective: every rank calls this at the same point (False on an exception, when
                the other ranks may be elsewhere: rank 0 then writes from its own view).
        """
        if self.already_saved or self.start_frames is None:
            return
        if collective:
            super().setup(trainer, pl_module, "fit")  # config.yaml (broadcasts the folder)
        elif trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            if trainer.loggers and getattr(trainer.loggers[0], "log_dir", None):
                run_dir = Path(trainer.loggers[0].log_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            path = str(run_dir / self.config_filename)
            self.parser.save(
                self.config, path, skip_none=False, overwrite=True, multifile=self.multifile
            )
        self.already_saved = True
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            if isinstance(lg, RunCSVLogger):
                lg.drop_rows_after(self.start_frames)
        # Trainer(enable_autolog_hparams=False): logged here, not at setup, for the same reason.
        hparams = {k: v for k, v in pl_module.hparams_initial.items() if k != "_class_path"}
        for lg in trainer.loggers:
            lg.log_hyperparams(hparams)
            lg.save()
