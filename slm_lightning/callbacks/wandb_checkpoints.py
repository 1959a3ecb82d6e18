"""WandbCheckpoints: FrameCheckpoint's files as W&B model artifacts when ``log_model`` is set."""

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from loguru import logger
from typing_extensions import override

from slm_lightning.loggers import WANDB_RUN_ID_FILE


class WandbCheckpoints(Callback):
    """Uploads ``last.ckpt`` and ``best.ckpt`` to every ``WandbLogger`` whose ``log_model`` is set,
    and keeps the W&B run id in the run folder so that an in-place resume continues that run.

    ``WandbLogger(log_model=…)`` only hears of checkpoints from Lightning's ``ModelCheckpoint``;
    our checkpoints come from :class:`~slm_lightning.callbacks.FrameCheckpoint` on the frame
    clock, which sets ModelCheckpoint's ``last_model_path`` / ``best_model_path`` as it writes. At the end of fit
    (after FrameCheckpoint's final save) each file becomes a version of the artifact
    ``model-<run id>`` (or the logger's ``checkpoint_name``), aliased ``last`` / ``best``, with
    the frame count as metadata. In offline mode the artifacts upload with ``wandb sync``.
    """

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Keep the W&B run id in the run folder: `--ckpt_path last` resumes the folder in
        # place, and the CLI then continues the same W&B run instead of opening a new one.
        run_dir = trainer.log_dir  # collective under DDP: every rank asks
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if trainer.is_global_zero and loggers and run_dir is not None:
            Path(run_dir, WANDB_RUN_ID_FILE).write_text(loggers[0].experiment.id)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        saver = trainer.checkpoint_callback
        # WandbLogger keeps its constructor arguments in private attributes only.
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg._log_model]
        if saver is None or not loggers:
            return
        import wandb

        # ModelCheckpoint's attribute name, which FrameCheckpoint sets as well; best.ckpt sits
        # beside last.ckpt (possibly from an earlier session of a resumed run).
        last = getattr(saver, "last_model_path", "")
        if not last:
            return
        folder = Path(last).parent
        for lg in loggers:
            name = lg._checkpoint_name or f"model-{lg.experiment.id}"
            for alias in ("last", "best"):
                path = folder / f"{alias}.ckpt"
                if not path.is_file():
                    continue
                artifact = wandb.Artifact(
                    name=name, type="model", metadata={"frames": pl_module.frames}
                )
                artifact.add_file(str(path), name=path.name)
                lg.experiment.log_artifact(artifact, aliases=[alias])
                logger.info(f"wandb: {path} logged as artifact {name}:{alias}")
