"""Env worker processes leave SIGINT and SIGTERM to the trainer that started them.

A forked worker (``async``: gymnasium's ``AsyncVectorEnv``; ``blocks``:
:class:`~slm_lightning.envs.blocks.BlockVectorEnv`) inherits the parent's Python signal
handlers. The trainer's SIGTERM handler only sets a flag, so a worker running it ignores the
``terminate()`` that ``close`` and the interpreter's exit send, and the parent waits for it
for ever. Ctrl-C in a terminal sends SIGINT to the whole process group, workers included:
gymnasium 1.4's ``_async_worker`` catches the ``KeyboardInterrupt``, reports it as the
worker's error and exits, so the parent's next step fails and every worker prints a
traceback. The parent closes its workers through their pipes on every exit path; the
workers themselves ignore SIGINT and die on SIGTERM.
"""

import os
import signal
from typing import Any

from gymnasium.vector.async_vector_env import _async_worker


def leave_signals_to_parent() -> None:
    """Ignore SIGINT and restore the default (exit) for SIGTERM in this worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def async_worker(*args: Any) -> None:
    """gymnasium's ``AsyncVectorEnv`` worker, after :func:`leave_signals_to_parent`.

    Passed as ``AsyncVectorEnv(worker=...)``, whose documentation (gymnasium 1.4) points to
    the private ``_async_worker`` for the signature; this forwards its arguments unchanged.
    """
    leave_signals_to_parent()
    _async_worker(*args)


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity set where the OS has one (a trial
    pins each session to its share of the cores), else every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
