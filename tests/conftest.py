"""Shared fixtures: every test writes under tmp_path, W&B never goes online, one torch thread;
``run_fit`` runs an in-process ``slm-lab fit`` and reads what it wrote."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from loguru import logger

from tests.cli_helpers import FitRun, fit_in


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch):
    """Run each test from its own temporary directory (``runs/`` lands there) with W&B offline,
    the lab's cache (measured random baselines) there too, and ``sys.argv`` as ``slm-lab``
    sees it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["slm-lab"])  # the CLI sees only its args, not pytest's
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("SLM_LAB_CACHE", str(tmp_path / "cache"))
    # metrics.png costs ~0.3 s a fit; the tests that check it turn it back on.
    monkeypatch.setenv("SLM_LAB_METRICS_PNG", "0")
    torch.set_num_threads(1)
    return tmp_path


@pytest.fixture
def warnings_logged():
    """The messages loguru logs at WARNING and above during the test."""
    messages: list[str] = []
    handler = logger.add(
        lambda message: messages.append(message.record["message"]), level="WARNING"
    )
    yield messages
    logger.remove(handler)


@pytest.fixture
def run_fit(tmp_path: Path) -> Callable[..., FitRun]:
    """``run_fit(*args, config=None, run_dir="run")``: :func:`tests.cli_helpers.fit_in` with the
    run folder ``tmp_path / run_dir`` (``run_dir=None``: the folder the CLI picks)."""

    def fit(*args: str, config: str | Path | None = None, run_dir: str | None = "run") -> FitRun:
        return fit_in(None if run_dir is None else tmp_path / run_dir, *args, config=config)

    return fit
