"""The CLI in-process, as the tests drive it: parsed and instantiated without running
(``instantiate``), or run through ``slm_lightning.cli.main`` with the CLI object it built
handed back (``run_main``, ``recording_cli``), or a whole fit with what it wrote
(``fit_in``; the ``run_fit`` fixture in conftest.py runs it under ``tmp_path``)."""

import contextlib
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer

from slm_lightning import cli as cli_module
from slm_lightning.algorithms import RLAlgorithm
from slm_lightning.cli import TRAINER_DEFAULTS, SLMLabCLI


def instantiate(args: list[str]) -> SLMLabCLI:
    """Parse and instantiate like ``main`` does, without running a subcommand.

    Args:
        args: command-line arguments after the subcommand (``--config …``, ``--model…``).
    """
    return SLMLabCLI(
        RLAlgorithm,
        subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=False,
    )


@contextlib.contextmanager
def recording_cli() -> Iterator[list[SLMLabCLI]]:
    """Within the block, every CLI object ``main`` builds is appended to the yielded list, even
    when ``main`` then raises; ``sys.argv`` is ``["slm-lab"]`` (not pytest's argv).

    ``main`` looks ``SLMLabCLI`` up as a module global, so the global is patched with a
    recording subclass of whatever it is now: nested blocks each record.
    """
    made: list[SLMLabCLI] = []

    class Recording(cli_module.SLMLabCLI):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_module, "SLMLabCLI", Recording)
        mp.setattr("sys.argv", ["slm-lab"])
        yield made


def run_main(args: list[str]) -> SLMLabCLI:
    """``slm-lab ARGS`` in-process through ``main``; returns the CLI object it built.

    Args:
        args: the whole command line after ``slm-lab``, subcommand first (``["fit", …]``).
    """
    with recording_cli() as made:
        cli_module.main(args)
    return made[0]


@dataclass(frozen=True)
class FitRun:
    """What one in-process ``slm-lab fit`` left behind, read once when it returned.

    Args:
        cli: the CLI object ``main`` built (``cli.model`` is the trained module).
        run_dir: the run folder (``trainer.default_root_dir``).
        summary: ``summary.json``.
        rows: ``metrics.csv`` as one dict per row (see :func:`read_metrics`).
    """

    cli: SLMLabCLI
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, float]]

    @property
    def model(self) -> RLAlgorithm:
        return self.cli.model

    @property
    def trainer(self) -> Trainer:
        return self.cli.trainer


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """``run_dir/metrics.csv`` as one dict per row, numbers as floats, empty cells left out.

    Args:
        run_dir: the run folder; ``[]`` when it holds no ``metrics.csv`` (nothing was logged).
    """
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def fit_in(run_dir: Path | None, *args: str, config: str | Path | None = None) -> FitRun:
    """``slm-lab fit [--config CONFIG] ARGS`` in-process, then its ``summary.json`` and metrics.

    Args:
        run_dir: the run folder (``--trainer.default_root_dir``); ``None`` lets the CLI pick
            (``runs/<config>/<timestamp>``, or a resumed checkpoint's own folder).
        args: the rest of the command line (``--model.init_args.max_frames=…``).
        config: a config file passed first, so ``args`` override it.
    """
    argv = ["fit"]
    if config is not None:
        argv += ["--config", str(config)]
    if run_dir is not None:
        argv.append(f"--trainer.default_root_dir={run_dir}")
    cli = run_main([*argv, *args])
    folder = Path(cli.trainer.default_root_dir)
    summary = json.loads((folder / "summary.json").read_text())
    return FitRun(cli=cli, run_dir=folder, summary=summary, rows=read_metrics(folder))
