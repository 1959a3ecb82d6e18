"""The ``slm-lab`` command: LightningCLI with RL defaults, the run folder, and one-line errors."""

import csv
import difflib
import importlib
import inspect
import os
import re
import signal
import sys
import time
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
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from loguru import logger
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.callbacks import FrameCheckpoint, MetricsTracker, RunSummary
from slm_lightning.callbacks.checkpoint import SIGINT_EXIT_CODE
from slm_lightning.compile import CompileNetworks, compile_backend
from slm_lightning.envs.factory import ConfigError
from slm_lightning.warm_start import (
    WarmStartNormalizers,
    check_checkpoint_file,
    check_weights,
    describe,
    read_checkpoint,
    saved_algorithm,
    warm_start,
)

# RL training is driven by the frame clock, not by epochs over a dataset: one epoch is one
# rollout-and-update cycle, there is no validation loop during fit, checkpoints come from
# FrameCheckpoint, and the per-step progress bar would cost more than a small update.
TRAINER_DEFAULTS = {
    "max_epochs": -1,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "callbacks": [RunSummary()],
}


class SLMLabCLI(LightningCLI):
    """``slm-lab fit --config configs/ppo_cartpole.yaml [--model.init_args.gamma=0.98 …]``.

    Adds ``metrics`` (MetricsTracker) and ``checkpoint`` (FrameCheckpoint) sections to every
    config, and gives each fit its own folder ``runs/<config name>/<timestamp>/`` (unless
    ``--trainer.default_root_dir`` is set) holding the resolved config, ``metrics.csv``,
    checkpoints, ``summary.json`` and ``returns.png``.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MetricsTracker, "metrics")
        parser.add_lightning_class_args(FrameCheckpoint, "checkpoint")
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
        resolve_checkpoint_alias(config, self.subcommand)
        if trainer.default_root_dir is None:
            configs = config.get("config") or []
            name = Path(str(configs[0])).stem if configs else type(self).__name__.lower()
            stamp = run_stamp()
            trainer.default_root_dir = str(Path("runs") / name / stamp)
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
            # Rank 0 alone rewrites metrics.csv (under DDP every rank runs this hook).
            if self.subcommand == "fit" and rank_zero_only.rank == 0:
                keep_logged_rows(self.trainer, checkpoint_frames(checkpoint))
            # Lightning reads the file again in fit; hand it the copy just checked instead.
            strategy = self.trainer.strategy
            strategy.checkpoint_io = PreloadedCheckpointIO(
                strategy.checkpoint_io, config.ckpt_path, checkpoint
            )
        if config.get("warm_start"):
            normalizers = warm_start(self.model, config.warm_start)
            if normalizers:
                self.trainer.callbacks.append(WarmStartNormalizers(normalizers))


def run_stamp() -> str:
    """The run folder's timestamp, shared with the processes this one launches.

    Lightning's DDP launcher re-runs the command once per extra rank, seconds later; through
    the environment the ranks agree on one folder (for multi-node launches, which start
    every process independently, pass ``--trainer.default_root_dir``).
    """
    inherited = os.environ.get("SLM_RUN_STAMP")
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":  # a rank the launcher started
        return inherited
    stamp = time.strftime("%Y_%m_%d_%H%M%S")
    os.environ["SLM_RUN_STAMP"] = stamp  # inherited by the rank processes fit launches
    return stamp


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
    restart of a preemptible job. An explicit path resumes into a new run folder instead,
    leaving the source run as it was.

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
    if subcommand == "fit" and trainer.default_root_dir is None and dirpath is None:
        trainer.default_root_dir = str(ckpt.parent.parent)  # continue in the run's own folder
    logger.info(f"ckpt_path={alias}: resuming from {ckpt}")


def checkpoint_frames(checkpoint: dict[str, Any]) -> int:
    """The frame clock saved in a checkpoint (0 if it holds no rollout state)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    states = fit_loop.get("combined_loader") or [None]
    return int(states[0]["frames"]) if isinstance(states[0], dict) else 0


def check_resume(model: RLAlgorithm, checkpoint: dict[str, Any], path: str) -> None:
    """Raise a one-line ConfigError unless ``checkpoint`` can resume (or evaluate) ``model``:
    the same algorithm, the same network shapes (observation and action spaces), and a
    replay memory of the same layout.

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
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    rollout = (fit_loop.get("combined_loader") or [None])[0]
    memory = rollout.get("memory") if isinstance(rollout, dict) else None
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


def keep_logged_rows(trainer: Any, frames: int) -> None:
    """Keep the rows of the run folder's ``metrics.csv`` up to the checkpoint's frame.

    Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts; a run that
    continues in its own folder re-writes the rows it logged up to the checkpoint (later
    ones, logged after the last checkpoint before a crash, are logged again by the resume).

    Args:
        trainer: the instantiated trainer, before fit.
        frames: the checkpoint's frame clock.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _step(row) <= frames]
        with warnings.catch_warnings():  # "Previous log files … will be deleted": handled here
            warnings.simplefilter("ignore")
            experiment = lg.experiment  # creating it removes the file
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        experiment.metrics_keys = header  # so the next save appends under the same header


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


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


def _unknown_key_message(class_path: str, key: str) -> str:
    """``model.init_args.<key>: unknown key for <Class>; did you mean …`` for a nested key."""
    module, _, name = class_path.rpartition(".")
    owner: Any = getattr(importlib.import_module(module), name)
    *parents, leaf = key.split(".")
    for parent in parents:  # walk into dataclass-typed arguments such as env.*
        hints = typing.get_type_hints(owner.__init__)
        owner = next(
            (
                t
                for t in typing.get_args(hints.get(parent)) or (hints.get(parent),)
                if inspect.isclass(t)
            ),
            None,
        )
        if owner is None:
            break
    params = (
        [p for p in inspect.signature(owner).parameters if p != "self"] if owner is not None else []
    )
    close = difflib.get_close_matches(leaf, params, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"accepted: {', '.join(params)}"
    return f"model.init_args.{key}: unknown key for {getattr(owner, '__name__', name)}; {hint}"


def explain(err: BaseException) -> str:
    """Condense a configuration error into one line naming the key and what is allowed.

    jsonargparse reports a typo'd key or a failed class instantiation as a multi-line tree;
    users need the offending key, and for an unknown key the closest accepted names.
    """
    config_error = _config_error_in_chain(err)
    text = str(config_error) if config_error is not None else str(err)
    if config_error is None and isinstance(err, ArgumentError):
        for line in text.splitlines():
            if (match := re.search(r"ConfigError: (.*)", line)) or (
                match := re.search(r"ValueError: (.*)", line)
            ):
                return match.group(1)
        unknown = re.search(
            r"(?:Option|Key) ['\"]([\w.]+)['\"] is not (?:accepted|expected)", text
        ) or re.search(r"unrecognized arguments: --([\w.]+)", text)
        class_path = re.search(r"class_path '([\w.]+)'", text)
        if unknown and class_path:
            return _unknown_key_message(class_path.group(1), unknown.group(1))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def main(args: list[str] | None = None) -> None:
    """Entry point of ``slm-lab``; bad configuration exits with one line and status 2."""
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
    except (ConfigError, ArgumentError) as err:
        logger.error(explain(err))
        sys.exit(2)
    except ValueError as err:  # a class failed to instantiate: is it our validation?
        if (config_error := _config_error_in_chain(err)) is None:
            raise
        logger.error(str(config_error))
        sys.exit(2)
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
