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
