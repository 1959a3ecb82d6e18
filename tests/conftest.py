"""Shared fixtures: every test writes under tmp_path, W&B never goes online, one torch thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch):
    """Run each test from its own temporary directory (``runs/`` lands there) with W&B offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    torch.set_num_threads(1)
    return tmp_path
