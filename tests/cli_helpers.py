"""The CLI in-process, as the tests drive it: parsed and instantiated without running
(``instantiate``), or run through ``slm_lightning.cli.main`` with the CLI object it built
handed back (``run_main``, ``recording_cli``)."""

import contextlib
from collections.abc import Iterator

import pytest

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
