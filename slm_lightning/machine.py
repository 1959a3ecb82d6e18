"""Checks that this machine can serve a run's trainer settings, before its run folder exists."""

import os
from pathlib import Path

from jsonargparse import Namespace

from slm_lightning.errors import ConfigError
from slm_lightning.loggers import wandb_logs_online


def check_machine(trainer: Namespace) -> None:
    """Raise a one-line :class:`ConfigError` if this machine cannot serve the run's trainer
    settings, before the run folder exists: the accelerator asked for, a writable run folder,
    and a W&B login when a W&B logger will log online.

    Args:
        trainer: the parsed ``trainer`` section (before instantiation).
    """
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    accelerator = trainer.get("accelerator")
    needs = {
        "gpu": (CUDAAccelerator, MPSAccelerator),
        "cuda": (CUDAAccelerator,),
        "mps": (MPSAccelerator,),
    }
    kinds = needs.get(accelerator, ()) if isinstance(accelerator, str) else ()
    if kinds and not any(kind.is_available() for kind in kinds):
        raise ConfigError(
            f"trainer.accelerator={accelerator}: torch sees no such device on this machine; "
            "use --trainer.accelerator cpu (or auto, which takes a GPU where there is one)"
        )
    run_dir = trainer.get("default_root_dir")
    target = Path(run_dir if run_dir is not None else "runs").absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable" if existing.is_dir() else "is not a folder"
        raise ConfigError(
            f"trainer.default_root_dir: cannot write the run folder {target}: {existing} {why}; "
            "pass a writable folder with --trainer.default_root_dir"
        )
    if wandb_logs_online(trainer.get("logger")):
        import wandb

        # verify=False: no network; prompt=False: report instead of waiting for input.
        if not wandb.login(verify=False, prompt=False):
            wandb.teardown()  # forget the settings the check loaded (tests run W&B in-process)
            raise ConfigError(
                "trainer.logger: W&B logs online but this machine is not logged in: run "
                "`uv run wandb login` once, or set WANDB_MODE=offline to log locally "
                "(`wandb sync` uploads later)"
            )
