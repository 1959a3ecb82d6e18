"""The analysis functions against numbers worked out by hand."""

import math

import numpy as np
import pytest

from slm_lightning.lab.analysis import (
    bootstrap_ci,
    consistency,
    iqm,
    session_metrics,
    stability,
    trial_metrics,
)

# A 4-row session: R = [10, 30, 20, 40], R_rand = 10 -> s = [0, 20, 10, 30].
FRAMES = np.array([100, 200, 300, 400])
RETURNS = np.array([10.0, 30.0, 20.0, 40.0])


def test_session_metrics_of_a_four_row_session() -> None:
    """s = [0, 20, 10, 30]:
    strength = 60 / 4 = 15; max 30; final 30.
    sample_efficiency = (0/100 + 20/200 + 10/300 + 30/400) / (1/100 + 1/200 + 1/300 + 1/400)
                      = (10 + 10/3 + 7.5) / (1 + 1/2 + 1/3 + 1/4)   (x100 above and below)
                      = (125/6) / (25/12) = 10.
    training_efficiency with u = [0, 1, 2, 4]: the row at u = 0 is left out,
                      = (20/1 + 10/2 + 30/4) / (1 + 1/2 + 1/4) = 32.5 / 1.75 = 130/7.
    stability: drops min(20,0) + min(-10,0) + min(20,0) = -10 over s_1..s_3 = 0+20+10 = 30
                      -> 1 - 10/30 = 2/3.
    target 30: first R >= 30 is row 2 (R = 30, equal counts) at 200 frames and 2 s;
    fps = 400 / 4 = 100."""
    m = session_metrics(
        FRAMES,
        np.array([0, 1, 2, 4]),
        RETURNS,
        10.0,
        seconds=np.array([1.0, 2.0, 3.0, 4.0]),
        target=30.0,
    )
    assert m.rows == 4
    assert m.final_frames == 400
    assert m.final_return_ma == 40.0
    assert m.best_return_ma == 40.0
    assert m.strength == pytest.approx(15.0)
    assert m.max_strength == 30.0
    assert m.final_strength == 30.0
    assert m.sample_efficiency == pytest.approx(10.0)
    assert m.training_efficiency == pytest.approx(130 / 7)
    assert m.stability == pytest.approx(2 / 3)
    assert m.frames_to_target == 200
    assert m.seconds_to_target == 2.0
    assert m.fps == pytest.approx(100.0)
    np.testing.assert_allclose(m.strengths, [0, 20, 10, 30])
    assert "strengths" not in m.scalars() and m.scalars()["stability"] == pytest.approx(2 / 3)


def test_rows_before_the_first_episode_and_an_unreached_target() -> None:
    """A first row with no return MA yet (NaN) is left out: the rest is s = [20, 10] at
    f = [200, 400]: strength 15, sample_efficiency (20/200 + 10/400) / (1/200 + 1/400)
    = (0.125) / (0.0075) = 50/3, stability 1 - 10/20 = 0.5. Target 100 never reached; no
    seconds -> fps NaN."""
    m = session_metrics(
        np.array([100, 200, 400]), np.array([1, 2, 3]), np.array([np.nan, 30.0, 20.0]), 10.0,
        target=100.0,
    )  # fmt: skip
    assert m.rows == 2
    assert m.strength == pytest.approx(15.0)
    assert m.sample_efficiency == pytest.approx(50 / 3)
    assert m.stability == pytest.approx(0.5)
    assert m.frames_to_target is None and m.seconds_to_target is None
    assert math.isnan(m.fps)


def test_stability_is_undefined_without_a_step_or_without_strength() -> None:
    """One row: no step to drop. s = [-5, -1, 3]: sum over s_1..s_2 = -6 <= 0; a formula
    applied blindly would give 1 - 0/-6 = 1. s = [0, 0]: sum 0, division by zero. s rising
    [1, 2, 3]: no drop -> 1."""
    assert math.isnan(stability(np.array([5.0])))
    assert math.isnan(stability(np.array([-5.0, -1.0, 3.0])))
    assert math.isnan(stability(np.array([0.0, 0.0])))
    assert stability(np.array([1.0, 2.0, 3.0])) == 1.0


def test_a_session_that_never_logged_a_return() -> None:
    """Every figure undefined, nothing raised."""
    m = session_metrics(np.array([100]), np.array([1]), np.array([np.nan]), 0.0, target=1.0)
    assert m.rows == 0 and m.final_frames == 0
    assert all(math.isnan(v) for k, v in m.scalars().items() if isinstance(v, float))
    assert m.frames_to_target is None
    empty = session_metrics(np.array([]), np.array([]), np.array([]), 0.0)
    assert empty.rows == 0 and math.isnan(empty.strength)


def test_iqm_cuts_a_whole_quarter_at_each_end_as_scipy_trim_mean() -> None:
    """n=5: int(1.25) = 1 cut each end -> mean(2, 3, 4) = 3 (a fractional trim would weigh 2
    and 4 by 1/4: (0.25*2 + 3 + 0.25*4) / 1.5 = 3 too, so also n=5 skewed: [1, 2, 3, 10, 100]
    -> mean(2, 3, 10) = 5, fractional (0.5 + 3 + 2.5) / 1.5 = 4). n=6: int(1.5) = 1 cut -> mean(1, 2, 3, 10) = 4 (not 2 cut, mean(2, 3)).
    n=8 with ties: cut 2 -> five 5s and one 100 trimmed -> 5. n=4: cut 1 -> mean(2, 3) = 2.5."""
    assert iqm(np.array([4.0, 100.0, 2.0, 1.0, 3.0])) == pytest.approx(3.0)
    assert iqm(np.array([1.0, 2.0, 3.0, 10.0, 100.0])) == pytest.approx(5.0)
    assert iqm(np.array([0.0, 1.0, 2.0, 3.0, 10.0, 50.0])) == pytest.approx(4.0)
    assert iqm(np.array([5.0] * 7 + [100.0])) == pytest.approx(5.0)
    assert iqm(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2.5)
    assert iqm(np.array([7.0])) == 7.0
    assert math.isnan(iqm(np.array([])))


def test_bootstrap_is_seeded_and_its_interval_holds_the_iqm() -> None:
    """Same scores and seed -> the same interval; another seed -> another. The interval of the
    IQM of 8 spread scores contains the IQM itself, and lies within [min, max]."""
    scores = np.array([480.0, 495.0, 500.0, 470.0, 499.0, 300.0, 490.0, 500.0])
    first = bootstrap_ci(scores, iqm, seed=3)
    assert first == bootstrap_ci(scores, iqm, seed=3)
    assert first != bootstrap_ci(scores, iqm, seed=4)
    low, high = first
    assert 300.0 <= low < iqm(scores) < high <= 500.0


def test_bootstrap_percentiles_on_two_scores() -> None:
    """Scores [0, 1], statistic mean: a replicate's mean is 0, 0.5 or 1 with probability
    1/4, 1/2, 1/4, so with 2000 replicates the 2.5th percentile is 0 and the 97.5th is 1; at
    50% coverage the quartiles are both 0.5."""
    assert bootstrap_ci(np.array([0.0, 1.0]), np.mean, seed=0) == (0.0, 1.0)
    assert bootstrap_ci(np.array([0.0, 1.0]), np.mean, seed=0, confidence=0.5) == (0.5, 0.5)


def test_bootstrap_resamples_within_each_task() -> None:
    """Runs x tasks [[0, 10], [1, 11]]: stratified resampling keeps task 1's column in
    {10, 11}, so its minimum is >= 10 in every replicate; pooling the runs across tasks would
    let 0 or 1 in."""
    table = np.array([[0.0, 10.0], [1.0, 11.0]])
    low, high = bootstrap_ci(table, lambda a: float(a[:, 1].min()), seed=0)
    assert low == 10.0 and high == 11.0


def test_consistency_of_identical_sessions_is_one() -> None:
    """stdev_j = 0 at every frame -> 1 - 0 / sum(mean) = 1."""
    s = RETURNS - 10.0
    assert consistency([FRAMES, FRAMES, FRAMES], [s, s, s]) == pytest.approx(1.0)


def test_consistency_aligns_sessions_of_different_lengths_on_frames() -> None:
    """A: f = [100, 200, 300, 400], s = [0, 20, 10, 30]; B: f = [150, 250], s = [10, 30].
    Frames both covered: [150, 250]; grid = logged frames in it = {150, 200, 250}.
    A interpolated: 10, 20, 15; B: 10, 20, 30. Means 10, 20, 22.5 (sum 52.5); sample stdevs
    0, 0, 15/sqrt(2). consistency = 1 - 2 * 15/sqrt(2) / 52.5 = 1 - 15*sqrt(2)/52.5."""
    got = consistency([FRAMES, np.array([150, 250])], [RETURNS - 10.0, np.array([10.0, 30.0])])
    assert got == pytest.approx(1 - 15 * math.sqrt(2) / 52.5)


def test_consistency_is_undefined_for_one_session_or_no_strength() -> None:
    """One session: no spread. Strength summing to <= 0: nothing to be consistent about.
    Sessions with no common frame: nothing to compare. A session with no row is left out."""
    s = np.array([1.0, 2.0])
    f = np.array([1, 2])
    assert math.isnan(consistency([f], [s]))
    assert math.isnan(consistency([f, np.array([], dtype=int)], [s, np.array([])]))
    assert math.isnan(consistency([f, f], [-s, -s]))
    assert math.isnan(consistency([f, f + 10], [s, s]))


def test_trial_metrics_over_sessions_one_of_which_never_logged() -> None:
    """Three sessions with target 25 and R_rand 10, plus one with no row:
    S1 = the 4-row session (final 40, solved at 200 frames / 2 s, strength 15, stability 2/3),
    S2 = R [10, 20] at f [100, 200] (final 20, not solved; strength 5; s = [0, 10] holds
    nothing before its last row, so stability is undefined),
    S3 = R [30, 30] at f [100, 200] (final 30, solved at 100 frames / 1 s; strength 20,
    stability 1). Finals [40, 20, 30]: mean 30, sample std 10, median 30, IQM (n=3, cut
    int(0.75) = 0) 30. solved 2/4; median frames to target (200 + 100)/2 = 150, seconds 1.5.
    strength (15 + 5 + 20)/3 = 40/3, stability over the defined ones (2/3 + 1)/2 = 5/6.
    consistency (S4 left out) on grid {100, 200}: s at 100 = (0, 0, 20), at 200 = (20, 10, 20):
    means 20/3 and 50/3 (sum 70/3), sample stdevs 20/sqrt(3) and 10/sqrt(3) (sum 10*sqrt(3))
    -> 1 - 20*sqrt(3) / (70/3) = 1 - 6*sqrt(3)/7."""
    secs = np.array([1.0, 2.0, 3.0, 4.0])
    s1 = session_metrics(FRAMES, FRAMES, RETURNS, 10.0, seconds=secs, target=25.0)
    s2 = session_metrics(
        FRAMES[:2], FRAMES[:2], np.array([10.0, 20.0]), 10.0, seconds=secs[:2], target=25.0
    )
    s3 = session_metrics(
        FRAMES[:2], FRAMES[:2], np.array([30.0, 30.0]), 10.0, seconds=secs[:2], target=25.0
    )
    s4 = session_metrics(FRAMES[:1], FRAMES[:1], np.array([np.nan]), 10.0, target=25.0)
    t = trial_metrics([s1, s2, s3, s4], seed=0)
    assert t.sessions == 4 and t.solved == 2
    assert t.final_return_ma_mean == pytest.approx(30.0)
    assert t.final_return_ma_std == pytest.approx(10.0)
    assert t.final_return_ma_median == 30.0
    assert t.final_return_ma_iqm == pytest.approx(30.0)
    assert 20.0 <= t.iqm_ci_low <= 30.0 <= t.iqm_ci_high <= 40.0
    again = trial_metrics([s1, s2, s3, s4], seed=0)
    assert (t.iqm_ci_low, t.iqm_ci_high) == (again.iqm_ci_low, again.iqm_ci_high)
    assert t.frames_to_target_median == 150.0
    assert t.seconds_to_target_median == 1.5
    assert t.strength == pytest.approx(40 / 3)
    assert t.stability == pytest.approx(5 / 6)
    assert t.consistency == pytest.approx(1 - 6 * math.sqrt(3) / 7)


def test_trial_of_one_session() -> None:
    """One session: mean = median = IQM = its final return, the interval collapses on it,
    std and consistency are undefined."""
    t = trial_metrics([session_metrics(FRAMES, FRAMES, RETURNS, 10.0, target=25.0)])
    assert t.final_return_ma_mean == t.final_return_ma_iqm == 40.0
    assert (t.iqm_ci_low, t.iqm_ci_high) == (40.0, 40.0)
    assert math.isnan(t.final_return_ma_std) and math.isnan(t.consistency)
    assert t.solved == 1 and t.frames_to_target_median == 200.0


def test_a_session_that_reached_the_target_and_fell_back_counts_as_solved() -> None:
    """R = [30, 20], target 25: reached at the first row (100 frames), as early stopping would
    have ended the run there, though its final return 20 is below the target: solved 1/1."""
    m = session_metrics(np.array([100, 200]), np.array([1, 2]), np.array([30.0, 20.0]), 0.0,
                        target=25.0)  # fmt: skip
    t = trial_metrics([m])
    assert t.solved == 1 and t.frames_to_target_median == 100.0
