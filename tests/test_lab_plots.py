"""The lab's figures: the bootstrap band against a hand computation, and each figure's artists
(a missing session curve, mean, band or target line fails), and metrics.png at a run's end."""

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from slm_lightning.callbacks.run_summary import SUMMARY_LINE_KEYS, write_summary
from slm_lightning.lab.plots import (
    PALETTE,
    compare_figure,
    curve_band,
    metric_columns,
    metrics_figure,
    plot_compare,
    plot_metrics,
    plot_trial,
    trial_figure,
)
from slm_lightning.lab.runs import RunRecord

PNG = b"\x89PNG\r\n\x1a\n"
NAN = math.nan


def record(frames, return_ma, seconds=None, columns=None) -> RunRecord:
    frames = np.asarray(frames, dtype=np.int64)
    seconds = np.full(frames.size, NAN) if seconds is None else np.asarray(seconds, float)
    return RunRecord(
        folder=Path("unused"),
        frames=frames,
        updates=np.zeros(frames.size, dtype=np.int64),
        seconds=seconds,
        return_ma=np.asarray(return_ma, dtype=float),
        columns=columns or {},
    )


def test_curve_band_two_sessions_on_the_common_span():
    # Session a covers frames 0..20, b 5..30: the grid spans [5, 20], nothing extrapolated.
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 10.0, 20.0]))
    b = (np.array([5.0, 15.0, 30.0]), np.array([1.0, 1.0, 1.0]))
    grid, mean, low, high = curve_band([a, b], points=4)
    np.testing.assert_array_equal(grid, [5.0, 10.0, 15.0, 20.0])
    # a interpolates to 5, 10, 15, 20 there; b is 1 throughout.
    np.testing.assert_allclose(mean, [3.0, 5.5, 8.0, 10.5])
    # Two sessions: a replicate's mean is a, b or (a+b)/2, and (a, a) and (b, b) each come up
    # in a quarter of the replicates, so the 2.5th and 97.5th percentiles are b and a exactly.
    np.testing.assert_allclose(low, [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(high, [5.0, 10.0, 15.0, 20.0])


def test_curve_band_drops_nan_rows_and_keeps_one_session_as_is():
    a = (np.array([0.0, 10.0, 20.0]), np.array([NAN, 10.0, 20.0]))  # no return MA at 0 yet
    b = (np.array([0.0, 20.0]), np.array([0.0, 0.0]))
    grid, mean, _, _ = curve_band([a, b], points=3)
    np.testing.assert_array_equal(grid, [10.0, 15.0, 20.0])
    np.testing.assert_allclose(mean, [5.0, 7.5, 10.0])
    grid, mean, low, high = curve_band([a], points=3)
    np.testing.assert_allclose(mean, [10.0, 15.0, 20.0])
    np.testing.assert_array_equal(low, mean)
    np.testing.assert_array_equal(high, mean)
    # Spans that do not overlap leave no common grid.
    c = (np.array([30.0, 40.0]), np.array([1.0, 2.0]))
    assert all(part.size == 0 for part in curve_band([a, c]))


def test_curve_band_is_seeded_and_narrower_than_the_sessions_with_five():
    x = np.array([0.0, 100.0])
    curves = [(x, np.array([v, v + 10.0])) for v in (0.0, 1.0, 2.0, 3.0, 10.0)]
    grid, mean, low, high = curve_band(curves, seed=3, points=5)
    np.testing.assert_allclose(mean, np.linspace(3.2, 13.2, 5))
    # All five picks equal to the lowest session happen in 1/3125 of the replicates, far below
    # 2.5%: the interval lies strictly inside [min, max] and around the mean.
    assert np.all(low > np.linspace(0.0, 10.0, 5)) and np.all(high < np.linspace(10.0, 20.0, 5))
    assert np.all(low < mean) and np.all(mean < high)
    again = curve_band(curves, seed=3, points=5)
    np.testing.assert_array_equal(again[2], low)
    np.testing.assert_array_equal(again[3], high)
    other = curve_band(curves, seed=4, points=5)
    assert not (np.array_equal(other[2], low) and np.array_equal(other[3], high))


def _sessions() -> list[RunRecord]:
    return [
        record([0, 100, 200], [NAN, 10.0, 30.0], seconds=[0.0, 1.0, 2.0]),
        record([0, 100, 200], [5.0, 15.0, 25.0], seconds=[0.0, 1.5, 3.0]),
        record([0, 100, 200], [2.0, 8.0, 40.0]),  # logged before rows had seconds
    ]


def test_trial_figure_draws_every_session_mean_band_and_target(tmp_path: Path):
    records = _sessions()
    fig = trial_figure(records, target=35.0, title="PPO CartPole-v1", seed=0)
    by_frames, by_seconds = fig.axes
    # 3 faint sessions, the mean, the dashed target.
    assert len(by_frames.lines) == 5
    np.testing.assert_array_equal(by_frames.lines[0].get_xdata(), [100, 200])  # NaN row left out
    np.testing.assert_array_equal(by_frames.lines[0].get_ydata(), [10.0, 30.0])
    np.testing.assert_array_equal(by_frames.lines[2].get_ydata(), [2.0, 8.0, 40.0])
    np.testing.assert_allclose(by_frames.lines[3].get_ydata()[[0, -1]], [(10 + 15 + 8) / 3, 95 / 3])
    target = by_frames.lines[4]
    assert list(target.get_ydata()) == [35.0, 35.0] and target.get_linestyle() == "--"
    assert sum(isinstance(c, PolyCollection) for c in by_frames.collections) == 1
    # Against seconds: the session without seconds is left out.
    assert len(by_seconds.lines) == 4
    np.testing.assert_array_equal(by_seconds.lines[1].get_xdata(), [0.0, 1.5, 3.0])
    assert by_seconds.get_xlabel() == "training seconds"

    no_target = trial_figure(records, target=None, title="t")
    assert len(no_target.axes[0].lines) == 4

    path = tmp_path / "trial.png"
    plot_trial(path, records, target=35.0, title="PPO CartPole-v1")
    assert path.read_bytes()[:8] == PNG


def test_metrics_figure_has_one_panel_per_logged_metric(tmp_path: Path):
    frames = np.array([1000.0, 2000.0, 3000.0])
    columns = {
        "episode/return_ma": np.array([NAN, 12.0, 20.0]),
        "rollout/frames": frames,
        "rollout/fps": np.array([500.0, 600.0, 700.0]),
        "step": frames,
        "train/epsilon": np.array([NAN, NAN, NAN]),  # never logged: no panel
        "train/loss": np.array([1.0, 0.5, 0.25]),
        "train/lr": np.array([3e-4, 2e-4, 1e-4]),
        "train/approx_kl": np.array([0.01, 0.02, 0.015]),
    }
    run = record(frames, columns["episode/return_ma"], columns=columns)
    keys = ["episode/return_ma", "rollout/fps", "train/loss", "train/lr", "train/approx_kl"]
    assert metric_columns(run) == keys
    fig = metrics_figure(run, "PPO CartPole-v1")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [[t.get_text() for t in ax.texts] for ax in shown] == [[k] for k in keys]
    assert len(fig.axes) == 8  # 5 metrics: a grid of 2 rows x 4, three panels hidden
    for ax, key in zip(shown, keys, strict=True):
        (line,) = ax.lines
        finite = np.isfinite(columns[key])
        np.testing.assert_array_equal(line.get_xdata(), frames[finite])
        np.testing.assert_array_equal(line.get_ydata(), columns[key][finite])
    # Four metrics fill one row.
    few = record(frames, columns["episode/return_ma"], columns={k: columns[k] for k in keys[:4]})
    assert len(metrics_figure(few, "t").axes) == 4

    path = tmp_path / "metrics.png"
    plot_metrics(path, run, "PPO CartPole-v1")
    assert path.read_bytes()[:8] == PNG


def test_compare_figure_one_band_per_group_in_palette_and_legend_order(tmp_path: Path):
    groups = [("SAC", _sessions()[:2]), ("PPO", _sessions()[1:]), ("DQN", _sessions()[2:])]
    fig = compare_figure(groups, target=35.0, title="CartPole-v1")
    (ax,) = fig.axes
    assert len(ax.lines) == 4  # three means (no faint sessions here) and the target
    for index, line in enumerate(ax.lines[:3]):
        assert line.get_color() == PALETTE[index]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SAC", "PPO", "DQN", "target"]

    path = tmp_path / "compare.png"
    plot_compare(path, groups, target=None, title="CartPole-v1")
    assert path.read_bytes()[:8] == PNG


@pytest.mark.parametrize(("with_rows", "switch"), [(True, "1"), (False, "1"), (True, "0")])
def test_write_summary_writes_metrics_png_when_the_run_logged_rows(
    tmp_path: Path, monkeypatch, with_rows, switch
):
    monkeypatch.setenv("SLM_LAB_METRICS_PNG", switch)  # 0 leaves it out
    if with_rows:
        (tmp_path / "metrics.csv").write_text(
            "episode/return_ma,rollout/frames,step,train/loss\n,100,100,1.0\n12.5,200,200,0.5\n"
        )
    summary = {"algorithm": "PPO", "env": "CartPole-v1", **dict.fromkeys(SUMMARY_LINE_KEYS)}
    write_summary(tmp_path, summary, {"frames": [150], "returns": [12.5]}, window=100)
    assert (tmp_path / "returns.png").is_file()
    metrics_png = tmp_path / "metrics.png"
    assert metrics_png.is_file() == (with_rows and switch == "1")
    if metrics_png.is_file():
        assert metrics_png.read_bytes()[:8] == PNG
