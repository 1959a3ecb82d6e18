"""benchmarks/before_after.py: the steady-state fps it reports, against hand values."""

from pathlib import Path

import pytest

from benchmarks.before_after import CASES, steady_fps


def test_steady_fps_starts_at_the_first_row_past_the_warm_up(tmp_path: Path) -> None:
    """Rows at 1000 (2 s), 2000 (3 s), 4000 (5 s), 6000 (8 s) frames, measured from 1500:
    (6000 - 2000) / (8 - 3) = 800 fps. Catches measuring from the first row (5000 / 6 =
    833.3) or taking the whole run's mean (6000 / 8 = 750)."""
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "rollout/frames,rollout/seconds,train/loss\n"
        "1000,2.0,\n2000,3.0,0.5\n4000,5.0,\n6000,8.0,0.1\n,,0.2\n"
    )
    assert steady_fps(metrics, 1500) == pytest.approx(800.0)
    assert steady_fps(metrics, 0) == pytest.approx(5000 / 6)
    assert steady_fps(metrics, 6000) is None  # one row: no interval


def test_every_case_measures_after_its_warm_up_within_its_budget() -> None:
    for name, case in CASES.items():
        budget = next(int(a.split("=")[1]) for a in case.args if "max_frames=" in a)
        assert 0 < case.measure_from < budget, name
