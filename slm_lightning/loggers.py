"""The run's loggers: a CSV logger that continues its file on a resume, W&B run resume, and
the resolved config W&B receives.

Data path: :func:`run_loggers` (cli: before the classes are instantiated) completes the
``trainer.logger`` entries → :func:`continue_metrics_files` (cli: before a resumed fit) →
:meth:`RunCSVLogger.drop_rows_after` (``RunConfig``: once the resumed session trains).
"""

import csv
import importlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, WandbLogger

# The W&B run id of a run folder, written when fit starts, read when the run resumes in place.
WANDB_RUN_ID_FILE = "wandb_run_id"


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` writing the run folder's ``metrics.csv``, which a run resumed
    in its own folder continues instead of starting afresh.

    Lightning 2.6 (checked on 2.6.6: ``lightning.fabric.loggers.csv_logs._ExperimentWriter``)
    deletes an existing ``metrics.csv`` when the logger creates its writer at setup.
    :meth:`continue_metrics_file` creates the writer before that with the file moved aside,
    then appends under the file's header; :meth:`drop_rows_after` removes the rows a crashed
    session logged after its last checkpoint. Takes ``CSVLogger``'s arguments.
    """

    @property
    def experiment(self) -> Any:
        """Lightning's writer. Lightning warns that a non-empty log folder's "previous log
        files … will be deleted", but it only ever replaces ``metrics.csv``: a run folder
        that holds other files first (a trial session's ``session.log``, an imported spec)
        and no ``metrics.csv`` loses nothing, so the warning is left out there."""
        if self._experiment is None and not self.metrics_file.is_file():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                return super().experiment
        return super().experiment

    @property
    def metrics_file(self) -> Path:
        """``<log_dir>/metrics.csv``."""
        return Path(self.log_dir) / "metrics.csv"

    def continue_metrics_file(self) -> None:
        """Keep an existing ``metrics.csv`` as it is and append the session's rows to it under
        its header. Call it on rank 0 before fit sets the logger up.

        The rows logged after the checkpoint stay until :meth:`drop_rows_after` runs once the
        resumed session trains, so a resume that fails before that leaves the file unchanged.
        """
        path = self.metrics_file
        if not path.is_file():
            return
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        aside = path.with_name("metrics.csv.keep")
        os.replace(path, aside)
        try:
            with warnings.catch_warnings():  # "Previous log files … will be deleted": not this one
                warnings.simplefilter("ignore")
                experiment = self.experiment
        finally:
            os.replace(aside, path)
        experiment.metrics_keys = header  # so the next save appends under the same header

    def drop_rows_after(self, frames: int) -> None:
        """Drop the rows of ``metrics.csv`` logged after ``frames`` (by a session that crashed
        after its last checkpoint); the resumed session logs them again.

        Args:
            frames: the frame clock the session resumed from (the rows' ``step``).
        """
        path = self.metrics_file
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [row for row in rows if _step(row) <= frames]
        if len(kept) == len(rows):
            return
        tmp = path.with_name("metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)


def continue_metrics_files(trainer: L.Trainer) -> None:
    """:meth:`RunCSVLogger.continue_metrics_file` for each of the trainer's CSV loggers: a
    fit resumed in its own folder keeps its rows (rank 0, before fit).

    Args:
        trainer: the instantiated trainer.
    """
    for lg in trainer.loggers:
        if isinstance(lg, RunCSVLogger):
            lg.continue_metrics_file()


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model/init_args/gamma": 0.99, …}``: the resolved config with ``/``-joined keys.

    Flat, because jsonargparse would instantiate any nested ``class_path`` mapping left in a
    logger's arguments (and W&B groups ``/`` keys in its config view anyway).
    """
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
        items = ((str(i), item) for i, item in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flat_config(item, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def wandb_logs_online(loggers: Any) -> bool:
    """Whether a ``trainer.logger`` entry is a W&B logger that will log online: neither its
    ``offline``/``mode`` arguments nor ``WANDB_MODE``/``WANDB_DISABLED`` make it local.

    Args:
        loggers: the parsed ``trainer.logger`` value (None, a bool, an entry or a list).
    """
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return False
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        cls = _logger_class(entry)
        if cls is None or not issubclass(cls, WandbLogger) or entry.init_args.get("offline"):
            continue
        mode = entry.init_args.get("mode") or os.environ.get("WANDB_MODE") or "online"
        if mode.lower() not in ("offline", "dryrun", "disabled"):
            return True
    return False


def _logger_class(entry: Any) -> type | None:
    """The class a ``class_path`` logger entry names (None for an instance or a bad path)."""
    if not isinstance(entry, Namespace) or not isinstance(entry.get("class_path"), str):
        return None
    module, _, name = entry.class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# The W&B run id of a run folder, written when fit starts, read when the run resumes in place.
WANDB_RUN_ID_FILE = "wandb_run_id"


def run_loggers(
    loggers: Any, run_dir: str, run_name: str, resolved_config: Callable[[], dict]
) -> Any:
    """The ``trainer.logger`` entries of a run, completed so every logger writes into the run.

    The CSV logger (a :class:`RunCSVLogger`) always comes first: ``metrics.csv`` feeds the run summary and plots, and
    Lightning takes ``trainer.log_dir`` (the run folder) from the first logger. Loggers that
    a preset adds (``trainer.logger+:``) with ``save_dir: .`` write into the run folder
    (W&B into ``$WANDB_DIR`` when it is set); a W&B run without a name is named after the
    config and receives the resolved config, and a run folder that already holds a W&B run
    id (an in-place resume) continues that W&B run. ``trainer.logger=false`` disables logging.

    Args:
        loggers: the parsed ``trainer.logger`` value (None, a bool, an entry or a list).
        run_dir: the run folder.
        run_name: the config's name, the default W&B run name.
        resolved_config: returns the whole resolved config as plain data, for W&B.
    """
    csv = Namespace(
        class_path=f"{__name__}.{RunCSVLogger.__name__}",
        init_args=Namespace(save_dir=run_dir, name="", version=""),
    )
    if loggers is None or loggers is True:
        return csv
    if loggers is False:
        return loggers
    entries = list(loggers) if isinstance(loggers, list) else [loggers]
    classes = [_logger_class(entry) for entry in entries]
    for entry, cls in zip(entries, classes, strict=True):
        if cls is CSVLogger:  # Lightning's own: ours keeps metrics.csv on a resume
            entry.class_path = csv.class_path
            continue
        if cls is None or issubclass(cls, CSVLogger):
            continue
        args = entry.init_args
        if issubclass(cls, WandbLogger):
            if args.get("save_dir") == "." and args.get("dir") is None:
                args.save_dir = os.environ.get("WANDB_DIR") or run_dir
            if args.get("name") is None:
                args.name = run_name
            if args.get("config") is None:
                args.config = resolved_config()
            id_file = Path(run_dir) / WANDB_RUN_ID_FILE
            if args.get("id") is None and id_file.is_file():
                # An in-place resume (--ckpt_path last): continue the same W&B run.
                args.id = id_file.read_text().strip()
                args.resume = "allow"
        elif args.get("save_dir") == ".":
            args.save_dir = run_dir
    if not any(cls is not None and issubclass(cls, CSVLogger) for cls in classes):
        entries.insert(0, csv)
    return entries
