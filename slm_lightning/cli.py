"""The ``slm-lab`` command: LightningCLI with RL defaults, and the lab's own subcommands.

``fit`` / ``validate`` / ``test`` are LightningCLI's; :class:`SLMLabCLI` wires the run folder
(run_folder.py), loggers (loggers.py), checkpoint resolution and checks (checkpoints.py),
compile flags (compile.py) and machine checks (machine.py) into them. A subcommand that is
not a Trainer method is a function in :data:`EXTRA_SUBCOMMANDS`. Bad input of any kind ends
as one line from :func:`~slm_lightning.errors.explain`.
"""

import importlib
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from loguru import logger
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.callbacks import (
    FrameCheckpoint,
    FrameProgressBar,
    MetricsTracker,
    PeriodicEval,
    RunSummary,
)
from slm_lightning.checkpoints import (
    add_warm_start_argument,
    check_checkpoint_options,
    load_for_resume,
    resolve_checkpoint_alias,
    start_warm,
)
from slm_lightning.compile import add_compile_arguments
from slm_lightning.errors import (
    ConfigError,
    ParserSchema,
    config_error_in_chain,
    explain,
    import_class,
)
from slm_lightning.loggers import continue_metrics_files, flat_config, run_loggers
from slm_lightning.machine import check_machine
from slm_lightning.optim import check_resumed_optimizers
from slm_lightning.process import configure_process, interrupt_exit_status
from slm_lightning.run_folder import RunConfig, claim_run_dir, release_run_dirs
from slm_lightning.schedules import check_schedules

# RL training is driven by the frame clock, not by epochs over a dataset: one epoch is one
# rollout-and-update cycle, there is no validation loop during fit, checkpoints come from
# FrameCheckpoint, and the progress bar is FrameProgressBar (see instantiate_trainer).
TRAINER_DEFAULTS = {
    "max_epochs": -1,
    "enable_progress_bar": True,
    # FrameCheckpoint is a Lightning Checkpoint: Lightning adds no ModelCheckpoint beside it.
    "enable_checkpointing": True,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    # RunConfig logs the hyperparameters once the session trains (a resume that fails before
    # must leave the run folder as it was); Lightning would log them at setup.
    "enable_autolog_hparams": False,
}

# What the parser configures, for naming keys and classes in one-line errors.
# The top-level options of fit / validate / test (tests/test_bad_input.py checks them against
# `slm-lab fit --help`), listed when one is mistyped.
TOP_LEVEL_OPTIONS = (
    "config",
    "print_config",
    "seed_everything",
    "trainer",
    "model",
    "ckpt_path",
    "weights_only",
    "torch_threads",
    "torch_compile",
    "warm_start",
    "metrics",
    "checkpoint",
    "eval",
    "progress",
)
SCHEMA = ParserSchema(
    model_base=RLAlgorithm,
    options=TOP_LEVEL_OPTIONS,
    sections={
        "trainer": Trainer,
        "metrics": MetricsTracker,
        "checkpoint": FrameCheckpoint,
        "eval": PeriodicEval,
        "progress": FrameProgressBar,
    },
)

# The lab's subcommands that are not Trainer methods: ``slm-lab NAME ARGS…`` calls the function
# named by ``EXTRA_SUBCOMMANDS[NAME]`` (``module:function``, imported only when called: a fit
# does not import the lab, and the lab imports this module's CLI). Each raises ConfigError on
# bad input like the Trainer subcommands do.
EXTRA_SUBCOMMANDS: dict[str, str] = {
    "trial": "slm_lightning.lab.trial:trial_main",
    "compare": "slm_lightning.lab.compare:compare_main",
    "search": "slm_lightning.lab.search:search_main",
    "import": "slm_lightning.lab.specs.import_command:import_main",
}
# ``slm-lab SPEC_FILE SPEC_NAME MODE`` (and ``slm-lab run SPEC_FILE SPEC_NAME MODE``): an SLM Lab
# spec file run as SLM Lab runs it.
SPEC_COMMAND = "slm_lightning.lab.specs.command:run_main"
SPEC_SUFFIXES = (".json", ".yaml", ".yml")
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class FullKeyParser(LightningArgumentParser):
    """A LightningArgumentParser that takes option names only in full: ``--trainer.max_epoch``
    and ``--model.init_args.env.num_env`` are unknown keys, not ``max_epochs`` and ``num_envs``.

    argparse expands an unambiguous prefix to the option it starts (``allow_abbrev``), so a
    typo'd key that happens to be a prefix would silently set another key. jsonargparse 4.53
    deprecates this (v5.0.0 turns it off by default), but ``allow_abbrev=False`` given to the
    top parser does not reach the parsers it builds for a subclass's ``init_args`` and the
    dataclasses in them: those are made as ``type(parent_parser)(exit_on_error=False, …)``
    (``cached_get_class_parser`` in jsonargparse/_typehints.py). A class default reaches them.

    Args:
        allow_abbrev: accept abbreviated option names (argparse's default; off here).
    """

    def __init__(self, *args: Any, allow_abbrev: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)


class SLMLabCLI(LightningCLI):
    """``slm-lab fit --config configs/ppo_cartpole.yaml [--model.init_args.gamma=0.98 …]``.

    Adds ``metrics`` (MetricsTracker), ``checkpoint`` (FrameCheckpoint) and ``eval``
    (PeriodicEval, evaluation during fit) sections to every config, and gives each fit its
    own folder ``runs/<config name>/<timestamp>/`` (unless ``--trainer.default_root_dir`` is
    set) holding the resolved config, ``metrics.csv``, checkpoints, ``summary.json`` and
    ``returns.png``. A new run's folder is created
    exclusively (see :func:`~slm_lightning.run_folder.claim_run_dir`) and removed again if the
    command fails before writing into it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("parser_class", FullKeyParser)
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
        # After metrics: at an epoch end the evaluation row follows the metrics row.
        parser.add_lightning_class_args(PeriodicEval, "eval")
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
        add_warm_start_argument(parser)
        add_compile_arguments(parser)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # FrameProgressBar replaces Lightning's batch-counting bar unless the config names a
        # progress bar of its own or disables it (Lightning rejects a ProgressBar callback
        # with enable_progress_bar=false). It goes with the default callbacks, which Lightning
        # runs after the metrics callbacks, so it shows the episodes of the cycle just ended.
        # Each trainer gets its own RunSummary (it holds the run's summary), even when one
        # process builds several.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.trainer
        given = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
        ours: list[Any] = [RunSummary()]
        if trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in given):
            ours.insert(0, config.progress)
        defaults = self.trainer_defaults
        extra = defaults.get("callbacks") or []
        extra = extra if isinstance(extra, list) else [extra]
        self.trainer_defaults = {**defaults, "callbacks": [*ours, *extra]}
        try:
            return super().instantiate_trainer(**kwargs)
        finally:
            self.trainer_defaults = defaults

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
        if isinstance(model, Namespace) and (cls := import_class(model.get("class_path", ""))):
            check_schedules(cls, model.get("init_args") or Namespace(), "model.init_args.")
        resolve_checkpoint_alias(config, self.subcommand)
        if self.subcommand in ("validate", "test"):
            self._evaluate_beside_the_run(trainer)
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
        check_checkpoint_options(config, self.subcommand)

    def _evaluate_beside_the_run(self, trainer: Namespace) -> None:
        """``validate`` / ``test`` of a run's own ``config.yaml`` would write their config and
        metrics over the training run's (its CSV logger and root folder name the run folder):
        evaluations of a folder that holds a run go to ``<run>/evaluations/<timestamp>/``."""
        if trainer.default_root_dir is None:
            return
        run = Path(trainer.default_root_dir)
        if not any(
            (run / name).exists() for name in ("metrics.csv", "summary.json", "checkpoints")
        ):
            return
        folder, claimed = claim_run_dir(run / "evaluations", create=self.subcommand is not None)
        self.claimed_dirs = claimed
        entries = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for entry in entries:
            args = getattr(entry, "init_args", None)
            if args is not None and Path(str(args.get("save_dir", ""))) == run:
                args.save_dir = str(folder)
        trainer.default_root_dir = str(folder)

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
            checkpoint = load_for_resume(self.trainer, self.model, config.ckpt_path)
            if self.subcommand == "fit":  # validate and test restore no optimizer
                check_resumed_optimizers(self.model, checkpoint, config.ckpt_path)
            # Rank 0 alone keeps metrics.csv (under DDP every rank runs this hook).
            if self.subcommand == "fit" and rank_zero_only.rank == 0:
                continue_metrics_files(self.trainer)
        if config.get("warm_start"):
            start_warm(self.trainer, self.model, config.warm_start)


def run_cli(args: list[str] | None) -> None:
    """``slm-lab fit|validate|test … `` through :class:`SLMLabCLI` (errors propagate to
    :func:`main`).

    Args:
        args: the command line after ``slm-lab``, subcommand first (None: ``sys.argv[1:]``).
    """
    SLMLabCLI(
        RLAlgorithm,
        subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, "epilog": LAB_HELP},
        args=args,
    )


# Shown under ``slm-lab --help``: the lab's commands are not Lightning subcommands, so its own
# list of subcommands leaves them out.
LAB_HELP = (
    "The lab's commands (each with --help): trial (several seeds of a config), compare "
    "(trials side by side), search (hyperparameters with Optuna), import (an SLM Lab spec to a "
    "config), and SLM Lab's own form: slm-lab SPEC_FILE SPEC_NAME "
    "train|dev|search|enjoy@RUN|eval@RUN|train@RUN (also slm-lab run ...)."
)


def lab_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """Which lab function runs ``slm-lab ARGV…`` (``module:function``, None for SLMLabCLI)
    and the arguments it gets.

    Args:
        argv: the command line after ``slm-lab``.
    """
    first = argv[0] if argv else ""
    if first in EXTRA_SUBCOMMANDS:
        return EXTRA_SUBCOMMANDS[first], argv[1:]
    if first == "run":
        return SPEC_COMMAND, argv[1:]
    if first.endswith(SPEC_SUFFIXES) and Path(first).is_file():
        return SPEC_COMMAND, argv
    if first and not first.startswith("-") and first not in TRAINER_SUBCOMMANDS:
        what = "no such spec file" if first.endswith(SPEC_SUFFIXES) else "unknown command"
        commands = ", ".join([*TRAINER_SUBCOMMANDS, *EXTRA_SUBCOMMANDS, "run"])
        raise ConfigError(
            f"{first}: {what}; use slm-lab COMMAND … (COMMAND one of {commands}) or "
            "slm-lab SPEC_FILE SPEC_NAME MODE (an SLM Lab spec file, .json/.yaml)"
        )
    return None, argv


def main(args: list[str] | None = None) -> None:
    """Entry point of ``slm-lab``: ``slm-lab SUBCOMMAND ARGS…`` or ``slm-lab SPEC_FILE
    SPEC_NAME MODE``.

    A subcommand named in :data:`EXTRA_SUBCOMMANDS` is called with the arguments after it; an
    existing ``.json``/``.yaml`` file first (or ``run``) runs an SLM Lab spec
    (:data:`SPEC_COMMAND`); any other (``fit``, ``validate``, ``test``, ``--help`` …) goes to
    :class:`SLMLabCLI`. Bad configuration exits with one line and status 2, a non-finite
    value met while training with one line and status 1, Ctrl-C with 130.

    Args:
        args: the command line after ``slm-lab`` (default ``sys.argv[1:]``).
    """
    configure_process()
    argv = list(sys.argv[1:] if args is None else args)
    with interrupt_exit_status():
        try:
            command, rest = lab_command(argv)
            if command is not None:
                module, function = command.split(":")
                getattr(importlib.import_module(module), function)(rest)
            else:
                run_cli(args)
        except (ConfigError, ArgumentError, MisconfigurationException, ValueError) as err:
            # A ValueError from a class being instantiated is bad input if our validation raised
            # it.
            if isinstance(err, ValueError) and config_error_in_chain(err) is None:
                raise
            logger.error(explain(err, args, SCHEMA))
            sys.exit(2)
        except FloatingPointError as err:
            # A non-finite reward, observation or loss: a fault of the run, not bad input
            # (exit 1). The checks name the env and sub-env, or the algorithm and loss term;
            # the last finite checkpoint was kept (FrameCheckpoint said which frame it holds).
            logger.error(str(err))
            sys.exit(1)


if __name__ == "__main__":
    main()
