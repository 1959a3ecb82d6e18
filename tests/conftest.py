"""Shared fixtures: every test writes under tmp_path, W&B never goes online, one torch thread."""

import pytest
import torch
from loguru import logger


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch):
    """Run each test from its own temporary directory (``runs/`` lands there) with W&B offline
    and ``sys.argv`` as ``slm-lab`` sees it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["slm-lab"])  # the CLI sees only its args, not pytest's
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
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
