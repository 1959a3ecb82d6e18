"""The ``slm-lab`` command: LightningCLI with RL defaults, the run folder, and one-line errors."""

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import signal
import sys
import typing
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from loguru import logger
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.callbacks import FrameCheckpoint, FrameProgressBar, MetricsTracker, RunSummary
from slm_lightning.callbacks.checkpoint import SIGINT_EXIT_CODE
from slm_lightning.checkpoints import (
    WarmStartNormalizers,
    check_checkpoint_file,
    check_finite,
    check_weights,
    describe,
    read_checkpoint,
    saved_algorithm,
    saved_memory_state,
    saved_rollout_state,
    warm_start,
)
from slm_lightning.compile import CompileNetworks, compile_backend
from slm_lightning.errors import ConfigError
from slm_lightning.run_folder import RunConfig, claim_run_dir, keep_metrics_file, release_run_dirs
from slm_lightning.schedules import check_schedules

# RL training is driven by the frame clock, not by epochs over a dataset: one epoch is one
# rollout-and-update cycle, there is no validation loop during fit, checkpoints come from
# FrameCheckpoint, and the progress bar is FrameProgressBar (see instantiate_trainer).
TRAINER_DEFAULTS = {
    "max_epochs": -1,
    "enable_progress_bar": True,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    # RunConfig logs the hyperparameters once the session trains (a resume that fails before
    # must leave the run folder as it was); Lightning would log them at setup.
    "enable_autolog_hparams": False,
    "callbacks": [RunSummary()],
}


class SLMLabCLI(LightningCLI):
    """``slm-lab fit --config configs/ppo_cartpole.yaml [--model.init_args.gamma=0.98 …]``.

    Adds ``metrics`` (MetricsTracker) and ``checkpoint`` (FrameCheckpoint) sections to every
    config, and gives each fit its own folder ``runs/<config name>/<timestamp>/`` (unless
    ``--trainer.default_root_dir`` is set) holding the resolved config, ``metrics.csv``,
    checkpoints, ``summary.json`` and ``returns.png``. A new run's folder is created
    exclusively (see :func:`~slm_lightning.run_folder.claim_run_dir`) and removed again if the
    command fails before writing into it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfig)
        self.claimed_dirs: list[Path] = []
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            release_run_dirs(self.claimed_dirs)  # a bad input leaves nothing behind
            raise

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MetricsTracker, "metrics")
        parser.add_lightning_class_args(FrameCheckpoint, "checkpoint")
        # Not a callback key: it joins the trainer only when the progress bar is enabled.
        parser.add_class_arguments(FrameProgressBar, "progress")
        parser.add_argument(
            "--torch_threads",
            type=int,
            default=1,
            help="intra-op threads of torch on the CPU: 1 suits small policy networks, whose "
            "ops are too small to split and whose cores also step the envs; raise it for "
            "conv nets or wide MLPs.",
        )
        parser.add_argument(
            "--warm_start",
            type=str | None,
            default=None,
            help="start a new run from the network weights (and, where both runs normalise, "
            "the normaliser statistics) of this checkpoint; frames, optimizers, schedules and "
            "replay memory start fresh. To continue a run instead, use --ckpt_path.",
        )
        add_compile_arguments(parser)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # FrameProgressBar replaces Lightning's batch-counting bar unless the config names a
        # progress bar of its own or disables it (Lightning rejects a ProgressBar callback
        # with enable_progress_bar=false). It goes with the default callbacks, which Lightning
        # runs after the metrics callbacks, so it shows the episodes of the cycle just ended.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.trainer
        given = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
        if trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in given):
            defaults = self.trainer_defaults.get("callbacks") or []
            defaults = defaults if isinstance(defaults, list) else [defaults]
            self.trainer_defaults = {
                **self.trainer_defaults,
                "callbacks": [config.progress, *defaults],
            }
        return super().instantiate_trainer(**kwargs)

    @override
    def _parse_ckpt_path(self) -> None:
        # Lightning 2.6 reloads --ckpt_path with weights_only=True (which rejects the numpy RNG
        # states the rollout checkpoints) and lets the saved hyperparameters override the
        # command line, so a resume could not raise max_frames. Here the config and command
        # line configure the run; the checkpoint restores only the training state.
        return

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {config.torch_threads}")
        torch.set_num_threads(config.torch_threads)
        trainer = config.trainer
        if self.subcommand in ("validate", "test") and not config.get("ckpt_path"):
            raise ConfigError(
                f"ckpt_path: {self.subcommand} evaluates a trained agent; pass "
                "--ckpt_path=path/to.ckpt (or last, or best)"
            )
        check_machine(trainer)
        model = config.get("model")
        if isinstance(model, Namespace) and (cls := _import_class(model.get("class_path", ""))):
            check_schedules(cls, model.get("init_args") or Namespace(), "model.init_args.")
        resolve_checkpoint_alias(config, self.subcommand)
        if trainer.default_root_dir is None:
            configs = config.get("config") or []
            name = Path(str(configs[0])).stem if configs else type(self).__name__.lower()
            run = self.subcommand is not None  # not when instantiated with run=False
            run_dir, self.claimed_dirs = claim_run_dir(Path("runs") / name, create=run)
            trainer.default_root_dir = str(run_dir)
        trainer.logger = run_loggers(
            trainer.logger,
            trainer.default_root_dir,
            run_name=Path(str((config.get("config") or ["slm-lab"])[0])).stem,
            resolved_config=lambda: flat_config(
                yaml.safe_load(self._parser(self.subcommand).dump(config))
            ),
        )
        if self.subcommand == "validate" and not trainer.limit_val_batches:
            trainer.limit_val_batches = 1.0  # fit runs no validation loop; validate must
        if config.get("ckpt_path"):
            check_checkpoint_file(config.ckpt_path, "ckpt_path")
            if (
                config.get("weights_only") is None
            ):  # torch's default (True) rejects our numpy RNG states
                config.weights_only = False
        if config.get("warm_start"):
            if self.subcommand != "fit":
                raise ConfigError("warm_start: only fit starts a run; use --ckpt_path here")
            if config.get("ckpt_path"):
                raise ConfigError(
                    "warm_start and ckpt_path exclude each other: --ckpt_path continues a run "
                    "with its counters, --warm_start starts a new one from its weights"
                )
            check_checkpoint_file(config.warm_start, "warm_start")

    # The checkpoints are read and checked against the instantiated model before the trainer
    # runs, so a mismatched one stops the command before it writes anything.
    def before_fit(self) -> None:
        self._check_checkpoints()
        # RunConfig cuts metrics.csv back to the resumed frame at the first epoch end, before
        # MetricsTracker logs the session's first row there: callbacks run in list order.
        callbacks = self.trainer.callbacks
        callbacks.sort(key=lambda callback: not isinstance(callback, RunConfig))

    def before_validate(self) -> None:
        self._check_checkpoints()

    def before_test(self) -> None:
        self._check_checkpoints()

    def after_validate(self) -> None:
        """One greppable line after Lightning's table: the evaluation returns."""
        metrics = {
            key: float(value)
            for key, value in self.trainer.callback_metrics.items()
            if key.startswith("eval/")
        }
        if "eval/return_mean" in metrics:
            logger.info(
                f"eval: episodes={int(metrics['eval/episodes'])} "
                f"greedy={self.model.eval_greedy} "
                f"return_mean={metrics['eval/return_mean']:.4g} "
                f"std={metrics['eval/return_std']:.4g} "
                f"min={metrics['eval/return_min']:.4g} max={metrics['eval/return_max']:.4g}"
            )

    def after_test(self) -> None:
        self.after_validate()

    def _check_checkpoints(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            checkpoint = read_checkpoint(config.ckpt_path, "ckpt_path")
            check_resume(self.model, checkpoint, config.ckpt_path)
            # Rank 0 alone keeps metrics.csv (under DDP every rank runs this hook).
            if self.subcommand == "fit" and rank_zero_only.rank == 0:
                keep_metrics_file(self.trainer)
            # Lightning reads the file again in fit; hand it the copy just checked instead.
            strategy = self.trainer.strategy
            strategy.checkpoint_io = PreloadedCheckpointIO(
                strategy.checkpoint_io, config.ckpt_path, checkpoint
            )
        if config.get("warm_start"):
            normalizers = warm_start(self.model, config.warm_start)
            if normalizers:
                self.trainer.callbacks.append(WarmStartNormalizers(normalizers))


def add_compile_arguments(parser: LightningArgumentParser) -> None:
    """``--torch-compile`` / ``--torch_compile``: thunder, torch or false (true means thunder).

    The flag feeds a :class:`CompileNetworks` callback, which compiles the network blocks
    before fitting and leaves the checkpoint keys as they are in eager runs.
    """
    parser.add_lightning_class_args(CompileNetworks, "compile")
    parser.add_argument(
        "--torch_compile",
        "--torch-compile",
        type=bool | str,
        default=False,
        help="compile the networks: true or thunder (lightning-thunder's thunder.jit), torch "
        "(torch.compile), false (eager). Aimed at GPUs; on a CPU expect it to be slower.",
    )
    parser.link_arguments("torch_compile", "compile.backend", compute_fn=compile_backend)


CHECKPOINT_ALIASES = ("last", "best")


def resolve_checkpoint_alias(config: Namespace, subcommand: str | None) -> None:
    """Turn ``--ckpt_path last`` / ``best`` into the file of the newest run of this config.

    The file is ``<dir>/last.ckpt`` (``best.ckpt``) where ``<dir>`` is ``--checkpoint.dirpath``,
    else ``<--trainer.default_root_dir>/checkpoints``, else the most recently written one of
    ``runs/<config name>/*/checkpoints/``. ``fit`` then continues that run in its own folder:
    ``metrics.csv`` keeps its rows up to the checkpoint's frame and grows from there, and the
    checkpoints, ``config.yaml``, ``summary.json`` and ``returns.png`` are rewritten for the
    whole run. ``fit --ckpt_path last`` with no checkpoint yet starts the run afresh (as
    Lightning's ``ckpt_path="last"`` does), so one command serves the first start and every
    restart of a preemptible job. ``fit --ckpt_path best`` and an explicit path resume into
    a new run folder instead, leaving the source run (and its later history) as it was;
    ``best`` is refused where the new session would write into the folder that holds it
    (``--trainer.default_root_dir`` or ``--checkpoint.dirpath`` given).

    Args:
        config: the subcommand's parsed config; ``ckpt_path`` and maybe
            ``trainer.default_root_dir`` are set in place.
        subcommand: ``fit``, ``validate`` or ``test``.
    """
    alias = config.get("ckpt_path")
    if alias not in CHECKPOINT_ALIASES:
        return
    trainer = config.trainer
    name = f"{alias}.ckpt"
    dirpath = config.get("checkpoint") and config.checkpoint.get("dirpath")
    if dirpath is not None:
        where, candidates = str(Path(dirpath) / name), [Path(dirpath) / name]
    elif trainer.default_root_dir is not None:
        where = str(Path(trainer.default_root_dir) / "checkpoints" / name)
        candidates = [Path(where)]
    else:
        configs = config.get("config") or []
        config_name = Path(str(configs[0])).stem if configs else "slmlabcli"
        where = str(Path("runs") / config_name / "*" / "checkpoints" / name)
        candidates = list(Path("runs", config_name).glob(f"*/checkpoints/{name}"))
    found = sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        if alias == "last" and subcommand == "fit":
            logger.warning(f"ckpt_path=last: no checkpoint at {where} yet; starting a new run")
            config.ckpt_path = None
            return
        raise ConfigError(f"ckpt_path={alias}: no checkpoint at {where}")
    ckpt = found[-1]
    config.ckpt_path = str(ckpt)
    if subcommand != "fit":
        logger.info(f"ckpt_path={alias}: evaluating {ckpt}")
        return
    if alias == "best":
        if trainer.default_root_dir is not None or dirpath is not None:
            raise ConfigError(
                f"ckpt_path=best: continuing from {ckpt} in its own folder would replace the "
                f"run's later history; pass --ckpt_path={ckpt} with another "
                "--trainer.default_root_dir (or checkpoint.dirpath) to continue it elsewhere"
            )
        logger.info(f"ckpt_path=best: resuming from {ckpt} into a new run folder")
        return
    if trainer.default_root_dir is None and dirpath is None:
        trainer.default_root_dir = str(ckpt.parent.parent)  # continue in the run's own folder
    logger.info(f"ckpt_path={alias}: resuming from {ckpt}")


def check_resume(model: RLAlgorithm, checkpoint: dict[str, Any], path: str) -> None:
    """Raise a one-line ConfigError unless ``checkpoint`` can resume (or evaluate) ``model``:
    the same algorithm, the same network shapes (observation and action spaces), finite
    weights, the same observation and reward normalisation, and a replay memory of the same
    layout.

    Args:
        model: the configured algorithm.
        checkpoint: the loaded checkpoint.
        path: its file, for the message.
    """
    saved = saved_algorithm(checkpoint)
    ours = type(model).__name__
    if saved not in ("?", ours):
        raise ConfigError(
            f"ckpt_path: {path} was written by {describe(checkpoint)}; this config trains "
            f"{ours}: resume with the config of that run (or --warm_start for weights alone)"
        )
    check_weights(model, checkpoint["state_dict"], "ckpt_path", path, describe(checkpoint))
    check_finite(checkpoint["state_dict"], "ckpt_path", path)
    rollout = saved_rollout_state(checkpoint)
    normalizers = rollout.get("normalizers") if rollout is not None else None
    if normalizers is None:  # written before the first rollout, or for evaluation
        normalizers = checkpoint.get("normalizers")
    if normalizers is not None:
        # The rollout restores these into the env's wrappers when it first builds its envs,
        # after the run folder is written to; a mismatch must stop the command before.
        spec = model.env_spec
        for option, key in (("normalize_obs", "obs_rms"), ("normalize_reward", "return_rms")):
            trained = key in normalizers
            if getattr(spec, option) != trained:
                raise ConfigError(
                    f"ckpt_path: {path} was trained with env.{option}={str(trained).lower()}; "
                    f"this config has model.init_args.env.{option}={str(not trained).lower()}: "
                    "they must match to resume"
                )
    memory = saved_memory_state(checkpoint)
    if not memory:
        return
    hp = model.hparams
    expected = {
        "capacity": ("memory_size", hp.get("memory_size")),
        "num_envs": ("env.num_envs", model.env_spec.num_envs),
        "n_steps": ("n_steps", hp.get("n_steps", 1)),
    }
    for field, (key, value) in expected.items():
        if value is not None and field in memory and memory[field] != value:
            raise ConfigError(
                f"ckpt_path: the replay memory in {path} has {key}={memory[field]}, this "
                f"config model.init_args.{key}={value}; they must match to resume"
            )


class PreloadedCheckpointIO(CheckpointIO):
    """Returns an already loaded checkpoint the first time its path is loaded, so a large
    checkpoint (a replay memory of gigabytes) is read once; everything else is delegated.

    Args:
        inner: the strategy's checkpoint IO.
        path: the checkpoint file.
        checkpoint: its content.
    """

    def __init__(self, inner: CheckpointIO, path: str, checkpoint: dict[str, Any]) -> None:
        self.inner = inner
        self.path = Path(path).resolve()
        self.checkpoint: dict[str, Any] | None = checkpoint

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None):
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None):
        if self.checkpoint is not None and Path(path).resolve() == self.path:
            checkpoint, self.checkpoint = self.checkpoint, None
            return checkpoint
        return self.inner.load_checkpoint(path, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


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


def wandb_logs_online(loggers: Any) -> bool:
    """Whether a ``trainer.logger`` entry is a W&B logger that will log online: neither its
    ``offline``/``mode`` arguments nor ``WANDB_MODE``/``WANDB_DISABLED`` make it local.

    Args:
        loggers: the parsed ``trainer.logger`` value (None, a bool, an entry or a list).
    """
    from lightning.pytorch.loggers import WandbLogger

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

    The CSV logger always comes first: ``metrics.csv`` feeds the run summary and plots, and
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
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    csv = Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger",
        init_args=Namespace(save_dir=run_dir, name="", version=""),
    )
    if loggers is None or loggers is True:
        return csv
    if loggers is False:
        return loggers
    entries = list(loggers) if isinstance(loggers, list) else [loggers]
    classes = [_logger_class(entry) for entry in entries]
    for entry, cls in zip(entries, classes, strict=True):
        if cls is None or cls is CSVLogger:
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


def _config_error_in_chain(err: BaseException) -> ConfigError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# jsonargparse (4.x) reports a bad value as an indented tree: a `Parser key "x":` line per
# nesting level, a `Problem with given class_path 'C':` line where a class was tried, one
# line per alternative of a Union, and the failing check at the leaves.
_TREE_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_TREE_CLASS = re.compile(r"^Problem with given class_path '([\w.]+)':\s*(.*)$")
_TREE_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value"
    r"|Expected a <class 'NoneType'>|Expected a path but|Expected a dot import path string"
    r"|Expected a <class '\w+'>$)"
)
_UNKNOWN_KEY = (
    re.compile(r"^Option '([\w.]+)' is not accepted"),
    re.compile(r"^Group '([\w.]+)' does not accept option '([\w.]+)'"),
    re.compile(r"^Key ['\"]([\w.]+)['\"] is not expected"),
    re.compile(r"^unrecognized arguments: --([\w.]+)"),
)
_BAD_VALUE = re.compile(r"^Expected a (.+?)\. Got value: (.*)$")
_BAD_NUMBER = re.compile(r"^Not of type \w+: (.*)$")
_NO_CLASS = re.compile(r"^(module '[\w.]+' has no attribute '\w+'|No module named .*)$")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}

# The classes behind the top-level sections of a config, for the accepted keys of a typo.
_SECTIONS: dict[str, type] = {
    "trainer": Trainer,
    "metrics": MetricsTracker,
    "checkpoint": FrameCheckpoint,
    "progress": FrameProgressBar,
}

Segment = tuple[str, str]  # ("key", "env.num_envs") or ("class", "slm_lightning.algorithms.PPO")


def _tree_lines(text: str) -> list[tuple[tuple[Segment, ...], str]]:
    """Each line of a jsonargparse error tree, with the keys and classes above it."""
    stack: list[tuple[int, Segment]] = []
    lines: list[tuple[tuple[Segment, ...], str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        line = line.removeprefix("- ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = tuple(segment for _, segment in stack)
        if match := _TREE_KEY.match(line) or _TREE_CLASS.match(line):
            kind = "key" if line.startswith("Parser key") else "class"
            stack.append((indent, (kind, match.group(1))))
            path = (*path, (kind, match.group(1)))
            line = match.group(2)  # a message on the same line, as in `Parser key "x": ...`
        if line:
            lines.append((path, line))
    return lines


def _describe_value(value: str) -> str:
    """A value from the tree as the message shows it: 8.5 as is, a word quoted."""
    return value if re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", value) else repr(value)


def _type_name(name: str) -> str:
    """``an integer`` for ``int``, ``null`` for ``NoneType``, ``a Schedule`` for a class."""
    if name == "NoneType":
        return "null"
    return _TYPE_NAMES.get(name, f"a {name.rpartition('.')[2]}")


def _union_message(lines: list[tuple[tuple[Segment, ...], str]]) -> str | None:
    """``<key>: expected an integer or null, got 'foo'`` for the innermost Union whose every
    alternative rejected the value's type."""
    unions = [(path, line) for path, line in lines if line.startswith("Subtypes: ")]
    if not unions:
        return None
    path, subtypes = max(unions, key=lambda item: len(item[0]))
    given = [line for p, line in lines if p == path and line.startswith("Given value: ")]
    names = [_type_name(name) for name in re.findall(r"<class '([\w.]+)'>", subtypes)]
    value = _describe_value(given[-1].removeprefix("Given value: ")) if given else "?"
    return f"{_resolve_path(path)[0]}: expected {' or '.join(names)}, got {value}"


def _leaf_rank(leaf: str) -> int:
    """How well a leaf explains the error when a Union tried several types (lower wins): an
    unknown key of the class the value was meant for; a check that failed on a value of the
    right type (a bound, our own validation); a value of the wrong type; a class that could
    not be imported."""
    if any(pattern.match(leaf) for pattern in _UNKNOWN_KEY):
        return 0
    if _NO_CLASS.match(leaf):
        return 3
    if _BAD_VALUE.match(leaf) or (
        (match := _BAD_NUMBER.match(leaf)) and match.group(1).startswith("expected")
    ):
        return 2
    return 1


def _import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if inspect.isclass(cls) else None


def _class_of_annotation(owner: type, name: str) -> type | None:
    """The class an ``__init__`` argument of ``owner`` is typed with (``EnvSpec`` for ``env``,
    ``MLPSpec`` for ``actor: MLPSpec | None``), or None."""
    try:
        hint = typing.get_type_hints(owner.__init__).get(name)
    except (NameError, TypeError):
        return None
    return next((t for t in typing.get_args(hint) or (hint,) if inspect.isclass(t)), None)


def _accepted_keys(owner: type) -> list[str]:
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = inspect.signature(owner).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind not in variadic]


def _resolve_path(path: tuple[Segment, ...], key: str = "") -> tuple[str, type | None]:
    """The key as the user types it (``model.init_args.actor.activation``) and the class that
    owns its last part.

    Args:
        path: the keys and classes above a leaf of the error tree.
        key: a dotted key below the path (an unknown key the leaf names).
    """
    parts: list[str] = []
    segments = [*path, ("key", key)] if key else list(path)
    top = segments[0][1].partition(".")[0] if segments and segments[0][0] == "key" else ""
    owner: type | None = _SECTIONS.get(top)
    if owner is not None:  # `metrics.log_frequency`: the section's class owns the rest
        rest = segments[0][1].partition(".")[2]
        segments = [*([("key", rest)] if rest else []), *segments[1:]]
        parts.append(top)
    for index, (kind, value) in enumerate(segments):
        if kind == "class":
            owner = _import_class(value)
            # A subclass is configured as class_path + init_args; a dataclass by its fields.
            if owner is None or not dataclasses.is_dataclass(owner):
                parts.append("init_args")
            continue
        names = value.split(".")
        parts.extend(names)
        last = index == len(segments) - 1
        for name in names[:-1] if last else names:  # walk into dataclass-typed arguments
            owner = _class_of_annotation(owner, name) if owner is not None else None
    if parts == ["config"]:  # the config file option
        return "--config", None
    return ".".join(parts), owner


def _unknown_key_message(key: str, owner: type | None) -> str:
    """``<key>: unknown key for <Class>; did you mean …? accepted: …``."""
    if owner is None:
        return f"{key}: unknown key"
    leaf = key.rpartition(".")[2]
    accepted = _accepted_keys(owner)
    close = difflib.get_close_matches(leaf, accepted, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else ""
    if not close or len(accepted) <= 12:  # a long list only when nothing is close
        hint = f"{hint} accepted: {', '.join(accepted)}".strip()
    return f"{key}: unknown key for {owner.__name__}; {hint}"


def _bad_value_message(key: str, expected: str, value: str) -> str:
    """``<key>: expected an integer, got 'sixteen'`` or, for a Literal, the allowed values."""
    if expected.startswith(("typing.Literal[", "Literal[")):
        choices = re.findall(r"'([^']*)'", expected)
        return f"{key}: {value!r} is not allowed; choose one of {', '.join(choices)}"
    name = re.fullmatch(r"<class '([\w.]+)'>", expected)
    wanted = _type_name(name.group(1)) if name else expected
    return f"{key}: expected {wanted}, got {_describe_value(value)}"


def _unknown_class_message(key: str, class_path: str, text: str) -> str:
    """``model: unknown class_path …; did you mean …? choose one of …`` from the Union's base."""
    base = re.search(r"Subtypes: \[<class '([\w.]+)'>", text)
    base_class = _import_class(base.group(1)) if base else None
    if base_class is None:
        return f"{key}: unknown class_path {class_path}"
    package = base_class.__module__.rpartition(".")[0] or base_class.__module__
    names = sorted(
        name
        for name, value in vars(importlib.import_module(package)).items()
        if inspect.isclass(value) and issubclass(value, base_class) and value is not base_class
    )
    choices = [f"{package}.{name}" for name in names]
    close = difflib.get_close_matches(class_path, choices, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}: unknown class_path {class_path}; {hint}choose one of {', '.join(names)} (in {package})"


def _config_files(args: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    files = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def _no_algorithm_message(args: list[str]) -> str:
    """``model: no algorithm is set; …`` naming the presets given without a config."""
    presets = [f for f in _config_files(args) if Path(f).parent.name == "callbacks"]
    if not presets:
        return (
            "model: no algorithm is set; give a config (slm-lab fit --config "
            "configs/ppo_cartpole.yaml) or a class (--model slm_lightning.algorithms.PPO)"
        )
    given = " ".join(f"--config {f}" for f in presets)
    what = "is a preset that adds" if len(presets) == 1 else "are presets that add"
    return (
        f"model: no algorithm is set; {', '.join(presets)} {what} to a config: give the "
        f"config first, e.g. slm-lab fit --config configs/ppo_cartpole.yaml {given}"
    )


def _not_a_mapping_message(args: list[str]) -> str | None:
    """``--config <file>: …`` for the config file that is empty or not a YAML mapping."""
    for name in _config_files(args):
        try:
            content = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if content is None:
            return f"--config {name}: the file is empty; a config is a YAML mapping (model:, trainer:, …)"
        if not isinstance(content, dict):
            return (
                f"--config {name}: expected a YAML mapping (model:, trainer:, …), "
                f"got a {type(content).__name__}"
            )
    return None


def _explain_tree(text: str, args: list[str]) -> str | None:
    """One line for a jsonargparse error tree, or None if it does not look like one."""
    lines = _tree_lines(text)
    leaves = [(path, line) for path, line in lines if not _TREE_NOISE.match(line)]
    if not leaves:
        return _union_message(lines)
    classes = {value for path, _ in leaves for kind, value in path if kind == "class"}
    if any(_import_class(value) is RLAlgorithm for value in classes):
        return _no_algorithm_message(args)  # the base class: no config named an algorithm
    path, leaf = min(leaves, key=lambda item: (_leaf_rank(item[1]), -len(item[0])))
    for pattern in _UNKNOWN_KEY:
        if match := pattern.match(leaf):
            key, owner = _resolve_path(path, ".".join(match.groups()))
            return _unknown_key_message(key, owner)
    key, _ = _resolve_path(path)
    if match := _BAD_VALUE.match(leaf):
        return _bad_value_message(key, match.group(1), match.group(2))
    if match := _BAD_NUMBER.match(leaf):
        return f"{key}: {match.group(1)}"
    if _NO_CLASS.match(leaf) and path and path[-1][0] == "class":
        return _unknown_class_message(_resolve_path(path[:-1])[0], path[-1][1], text)
    if match := re.match(r"^(?:\w+Error: )?(.*)$", leaf):
        return f"{key}: {match.group(1)}" if key else match.group(1)
    return None


def explain(err: BaseException, args: list[str] | None = None) -> str:
    """Condense a configuration error into one line naming the key and what is allowed.

    jsonargparse reports a bad value as a multi-line tree over the Unions it tried (the
    model's class, ``float | Schedule`` …); users need the key as they type it
    (``model.init_args.env.vectorization``) and what is allowed there: the accepted keys of
    the class that owns a typo'd key, the values of a ``Literal``, the type of a number.

    Args:
        err: the error raised while parsing or instantiating the config.
        args: the command line, to name the config file an error comes from.
    """
    args = list(sys.argv[1:] if args is None else args)
    config_error = _config_error_in_chain(err)
    if config_error is not None:
        return str(config_error).replace("\n", " ")
    text = str(err)
    if isinstance(err, MisconfigurationException):
        return f"trainer: {text}"
    if isinstance(err, ArgumentError):
        if re.search(r"arguments are required: (\w+\.)?model\b", text):
            return _no_algorithm_message(args)
        if text.startswith("Unexpected config:") and (message := _not_a_mapping_message(args)):
            return message
        if (line := _explain_tree(text, args)) is not None:
            return line
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def main(args: list[str] | None = None) -> None:
    """Entry point of ``slm-lab``; bad configuration exits with one line and status 2, a
    non-finite value met while training with one line and status 1."""
    logger.remove()
    logger.add(
        sys.stderr,
        format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
        level="INFO",
    )
    # Small policy networks run faster on one intra-op thread than split across cores
    # that are also stepping the environments (``--torch_threads`` changes it per run).
    torch.set_num_threads(1)
    # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import so that checking for GPUs does not
    # initialise CUDA before a fork. Torch then answers every torch.cuda.is_available() with a
    # fresh NVML probe (~0.1 ms), and every optimizer.step() asks: 10% of a small update. Our
    # fork-based children (async env workers) never use CUDA, so the plain check is safe.
    # For the fork-based DDP strategies (ddp_fork, ddp_notebook) set SLM_NVML_CUDA_CHECK=1.
    if os.environ.get("SLM_NVML_CUDA_CHECK") != "1":
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    # Noise that does not apply to RL runs: we log on the frame clock, not every N steps.
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    try:
        SLMLabCLI(
            RLAlgorithm,
            subclass_mode_model=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except (ConfigError, ArgumentError, MisconfigurationException) as err:
        logger.error(explain(err, args))
        sys.exit(2)
    except ValueError as err:  # a class failed to instantiate: is it our validation?
        if _config_error_in_chain(err) is None:
            raise
        logger.error(explain(err, args))
        sys.exit(2)
    except FloatingPointError as err:
        # A non-finite reward, observation or loss: a fault of the run, not bad input (exit 1).
        # The checks name the env and sub-env, or the algorithm and loss term; the last
        # finite checkpoint was kept (FrameCheckpoint said which frame it holds).
        logger.error(str(err))
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C outside fit (parsing, instantiating)
        sys.exit(SIGINT_EXIT_CODE)
    except SystemExit as err:
        # Lightning 2.6 ends a fit interrupted by KeyboardInterrupt with sys.exit(1)
        # (trainer/call.py, _call_and_handle_interrupt); a shell reports Ctrl-C as 130.
        if err.code == 1 and isinstance(err.__context__, KeyboardInterrupt):
            err = SystemExit(SIGINT_EXIT_CODE)
        if err.code == SIGINT_EXIT_CODE:
            # Fit has saved and closed what it owns. Another Ctrl-C while the interpreter exits
            # (W&B's atexit hook finishing its run) ends the process at once, as the shell's 130,
            # rather than raising KeyboardInterrupt inside an atexit hook.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise err from None


if __name__ == "__main__":
    main()
