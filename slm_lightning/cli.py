"""The ``slm-lab`` command: LightningCLI with RL defaults, the run folder, and one-line errors."""

import difflib
import importlib
import inspect
import os
import re
import sys
import time
import typing
import warnings
import zipfile
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from loguru import logger
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.callbacks import FrameCheckpoint, MetricsTracker, RunSummary
from slm_lightning.envs.factory import ConfigError

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
        if trainer.default_root_dir is None:
            configs = config.get("config") or []
            name = Path(str(configs[0])).stem if configs else type(self).__name__.lower()
            stamp = time.strftime("%Y_%m_%d_%H%M%S")
            trainer.default_root_dir = str(Path("runs") / name / stamp)
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=trainer.default_root_dir, name="", version=""),
            )
        if self.subcommand == "validate" and not trainer.limit_val_batches:
            trainer.limit_val_batches = 1.0  # fit runs no validation loop; validate must
        if config.get("ckpt_path"):
            ckpt = Path(config.ckpt_path)
            if not ckpt.is_file():
                raise ConfigError(f"ckpt_path: no checkpoint file at {ckpt}")
            if not zipfile.is_zipfile(ckpt):  # torch.save writes a zip archive; catches truncation
                raise ConfigError(
                    f"ckpt_path: {ckpt} is not a readable checkpoint (corrupt or truncated)"
                )
            if (
                config.get("weights_only") is None
            ):  # torch's default (True) rejects our numpy RNG states
                config.weights_only = False


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


if __name__ == "__main__":
    main()
