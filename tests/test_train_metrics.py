"""TrainMetrics: a row logs the mean of the per-update values and the latest setting."""

import pytest
import torch

from slm_lightning.train_metrics import TrainMetrics


def test_a_row_logs_the_mean_over_updates_and_the_latest_setting() -> None:
    """Three updates with losses 1, 2, 6 and clipfracs 0.1, 0.3 (not every update reports
    it): the row holds 3.0 and 0.2, not the last update's 6 and 0.3. The lr set twice logs the
    second value; after the row the means start over, while the setting stays."""
    metrics = TrainMetrics()
    metrics.set({"train/lr": 1e-3})
    metrics.add({"train/loss": torch.tensor(1.0), "train/clipfrac": torch.tensor(0.1)})
    metrics.add({"train/loss": torch.tensor(2.0), "train/clipfrac": torch.tensor(0.3)})
    metrics.add({"train/loss": torch.tensor(6.0), "train/explained_variance": 0.5})
    metrics.set({"train/lr": 5e-4})
    assert float(metrics["train/loss"]) == 6.0  # the latest, for error messages and tests
    row = metrics.pop_row()
    assert row == pytest.approx(
        {
            "train/lr": 5e-4,
            "train/loss": 3.0,
            "train/clipfrac": 0.2,
            "train/explained_variance": 0.5,
        }
    )
    metrics.add({"train/loss": torch.tensor(4.0, requires_grad=True) * 1})
    assert metrics.pop_row() == pytest.approx({"train/lr": 5e-4, "train/loss": 4.0})
    assert metrics.pop_row() == pytest.approx({"train/lr": 5e-4})


def test_many_updates_are_folded_into_one_sum_per_key() -> None:
    """600 updates (more than two folds of 256) with losses 0..599 and an alpha of shape
    (1,): the row holds their means, 299.5 and 2.0, and nothing waits after it."""
    metrics = TrainMetrics()
    for i in range(600):
        metrics.add({"train/loss": torch.tensor(float(i)), "train/alpha": torch.full((1,), 2.0)})
    assert metrics.pop_row() == pytest.approx({"train/loss": 299.5, "train/alpha": 2.0})
    assert all(not pending for pending in metrics._pending.values())
