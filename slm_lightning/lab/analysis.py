"""The analysis of a trial's sessions: SLM Lab's metrics and an IQM with a bootstrap interval.

Pure functions over numpy arrays (no files, no Lightning), in the order a trial uses them:

1. ``session_metrics``: one session's metrics rows (frames f_i, optimizer updates u_i, return
   moving average R_i) and the env's random baseline R_rand -> ``SessionMetrics``: SLM Lab's
   strength, efficiencies and stability, plus the return, target and speed figures.
2. ``trial_metrics``: the sessions' ``SessionMetrics`` -> ``TrialMetrics``: SLM Lab's
   consistency, the final return MA's mean ± std, median and IQM with a 95% stratified bootstrap
   interval, solved k/N and the median frames and seconds to the target.

SLM Lab's formulas are those of kengz/SLM-Lab ``slm_lab/experiment/analysis.py``
(``calc_strength``, ``calc_efficiency``, ``calc_stability``, ``calc_consistency``, read at
commit 017b070; their docstrings hold the LaTeX). Where that code departs from its own formula,
the formula wins and the docstring below says so. The IQM and the bootstrap follow Agarwal et al.
2021, "Deep RL at the Edge of the Statistical Precipice" (rliable's ``aggregate_iqm`` and
``StratifiedBootstrap``), written here in numpy with a seeded generator: rliable 1.2 draws from
the global numpy RNG and pins old dependencies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

NAN = float("nan")


@dataclass(frozen=True)
class SessionMetrics:
    """One session's analysis. A figure with no defined value is NaN (or None for the target).

    Args:
        rows: metrics rows with a finite return MA that the figures were computed from.
        final_frames: frames at the last such row (0 for a session that never logged one).
        final_return_ma: R_N, the return MA at the last row.
        best_return_ma: max_i R_i.
        strength: mean_i s_i, with s_i = R_i - R_rand.
        max_strength: max_i s_i.
        final_strength: s_N.
        sample_efficiency: sum_i (s_i / f_i) / sum_i (1 / f_i), rows with f_i > 0.
        training_efficiency: the same with optimizer updates u_i, rows with u_i > 0.
        stability: 1 - |sum_i min(s_{i+1} - s_i, 0)| / sum_{i<N} s_i (see ``stability``).
        frames_to_target: frames at the first row whose return MA reached the target; None if
            no row did or no target was given.
        seconds_to_target: wall seconds at that row; None likewise or without seconds.
        fps: final frames / final seconds; NaN without seconds.
        frames: f_i of the rows kept, for the trial's consistency and plots.
        strengths: s_i of the rows kept.
    """

    rows: int
    final_frames: int
    final_return_ma: float
    best_return_ma: float
    strength: float
    max_strength: float
    final_strength: float
    sample_efficiency: float
    training_efficiency: float
    stability: float
    frames_to_target: int | None
    seconds_to_target: float | None
    fps: float
    frames: np.ndarray
    strengths: np.ndarray

    def scalars(self) -> dict[str, float | int | None]:
        """Every figure but the per-row arrays, as plain Python numbers (for ``trial.json``)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("frames", "strengths")
        }


@dataclass(frozen=True)
class TrialMetrics:
    """The analysis across a trial's sessions. Undefined figures are NaN (or None).

    Args:
        sessions: N, every session given, including any that never logged a return MA.
        solved: k, the sessions whose return MA reached the target at some row.
        final_return_ma_mean: mean of the sessions' final return MA.
        final_return_ma_std: their sample standard deviation (ddof=1; NaN for one session).
        final_return_ma_median: their median.
        final_return_ma_iqm: their interquartile mean (``iqm``).
        iqm_ci_low: lower end of the 95% stratified bootstrap interval of the IQM.
        iqm_ci_high: upper end of that interval.
        frames_to_target_median: median frames to target over the solved sessions.
        seconds_to_target_median: median seconds to target over the solved sessions with seconds.
        strength: mean over sessions of each session's strength (likewise the next five).
        max_strength: mean of max_strength.
        final_strength: mean of final_strength.
        sample_efficiency: mean of sample_efficiency.
        training_efficiency: mean of training_efficiency.
        stability: mean of stability over the sessions where it is defined.
        consistency: SLM Lab's consistency (see ``consistency``).
    """

    sessions: int
    solved: int
    final_return_ma_mean: float
    final_return_ma_std: float
    final_return_ma_median: float
    final_return_ma_iqm: float
    iqm_ci_low: float
    iqm_ci_high: float
    frames_to_target_median: float
    seconds_to_target_median: float
    strength: float
    max_strength: float
    final_strength: float
    sample_efficiency: float
    training_efficiency: float
    stability: float
    consistency: float


def efficiency(strengths: np.ndarray, clock: np.ndarray) -> float:
    """SLM Lab's efficiency: the mean local strength weighted by 1 / clock.

    ``e = sum_i (s_i / t_i) / sum_i (1 / t_i)``, the formula of SLM Lab's ``calc_efficiency``
    docstring. Its code divides by ``sum_i s_i`` instead, which is not a strength (it changes
    with the number of rows); we follow the formula. Rows at ``t_i <= 0`` (the row logged
    before the first frame or update) have no defined weight and are left out, as upstream drops
    their infinite ratio.

    Args:
        strengths: local strengths s_i.
        clock: frames f_i (sample efficiency) or optimizer updates u_i (training efficiency).

    Returns:
        The efficiency; NaN when no row has ``t_i > 0``.
    """
    keep = clock > 0
    if not keep.any():
        return NAN
    weights = 1.0 / clock[keep].astype(np.float64)
    return float(np.sum(strengths[keep] * weights) / np.sum(weights))


def stability(strengths: np.ndarray) -> float:
    """SLM Lab's stability: one minus the strength lost to drops, relative to the strength held.

    ``sta = 1 - |sum_{i<N} min(s_{i+1} - s_i, 0)| / sum_{i<N} s_i``: as in SLM Lab's
    ``calc_stability``, the denominator sums the rows that have a successor (``s[:-1]``), the
    same rows as the drops. A run that never drops scores 1.

    Args:
        strengths: local strengths s_1..s_N.

    Returns:
        The stability; NaN when it is undefined: fewer than 2 rows (no step to drop), or
        ``sum_{i<N} s_i <= 0`` -- a session no better than random on average has no strength to
        lose, and a negative denominator would turn drops into a stability above 1.
    """
    if strengths.size < 2:
        return NAN
    held = float(np.sum(strengths[:-1]))
    if held <= 0:
        return NAN
    drops = np.minimum(np.diff(strengths), 0.0)
    return 1.0 - abs(float(np.sum(drops))) / held


def _first_reached(return_ma: np.ndarray, clock: np.ndarray, target: float | None) -> float | None:
    """``clock`` at the first row whose return MA is >= ``target``; None if none or no target."""
    if target is None:
        return None
    reached = np.flatnonzero(return_ma >= target)
    return None if reached.size == 0 else float(clock[reached[0]])


def session_metrics(
    frames: np.ndarray,
    updates: np.ndarray,
    return_ma: np.ndarray,
    random_return: float,
    *,
    seconds: np.ndarray | None = None,
    target: float | None = None,
) -> SessionMetrics:
    """Analyse one session from its metrics rows, in logging order.

    Rows whose return MA is not finite (logged before the first episode ended) are left out:
    there is no return yet to measure. A session left with no row gets NaN figures, so that a
    trial can still report it.

    Args:
        frames: f_i, environment frames at each row.
        updates: u_i, optimizer updates at each row.
        return_ma: R_i, the episode return moving average at each row.
        random_return: R_rand, the env's mean return under a random policy.
        seconds: wall seconds since the start at each row, for seconds to target and fps.
        target: the return MA that counts as solved, or None.

    Returns:
        The session's ``SessionMetrics``.
    """
    return_ma = np.asarray(return_ma, dtype=np.float64)
    keep = np.isfinite(return_ma)
    frames = np.asarray(frames, dtype=np.int64)[keep]
    updates = np.asarray(updates, dtype=np.int64)[keep]
    return_ma = return_ma[keep]
    secs = None if seconds is None else np.asarray(seconds, dtype=np.float64)[keep]
    if return_ma.size == 0:
        return SessionMetrics(
            rows=0,
            final_frames=0,
            final_return_ma=NAN,
            best_return_ma=NAN,
            strength=NAN,
            max_strength=NAN,
            final_strength=NAN,
            sample_efficiency=NAN,
            training_efficiency=NAN,
            stability=NAN,
            frames_to_target=None,
            seconds_to_target=None,
            fps=NAN,
            frames=frames,
            strengths=return_ma,
        )
    strengths = return_ma - random_return
    frames_to_target = _first_reached(return_ma, frames, target)
    fps = NAN
    if secs is not None and secs[-1] > 0:
        fps = float(frames[-1] / secs[-1])
    return SessionMetrics(
        rows=int(return_ma.size),
        final_frames=int(frames[-1]),
        final_return_ma=float(return_ma[-1]),
        best_return_ma=float(return_ma.max()),
        strength=float(strengths.mean()),
        max_strength=float(strengths.max()),
        final_strength=float(strengths[-1]),
        sample_efficiency=efficiency(strengths, frames),
        training_efficiency=efficiency(strengths, updates),
        stability=stability(strengths),
        frames_to_target=None if frames_to_target is None else int(frames_to_target),
        seconds_to_target=None if secs is None else _first_reached(return_ma, secs, target),
        fps=fps,
        frames=frames,
        strengths=strengths,
    )


def consistency(frames: Sequence[np.ndarray], strengths: Sequence[np.ndarray]) -> float:
    """SLM Lab's consistency: ``1 - sum_i 2 stdev_j(s_ij) / sum_i mean_j(s_ij)`` over sessions j.

    Sessions log at different frames and may stop at different points (early stopping), so the
    rows i are a common frame grid: every frame any session logged within the span all sessions
    covered, ``[max_j first frame, min_j last frame]``; each session's strength is linearly
    interpolated onto it (``np.interp``), never extrapolated. SLM Lab instead truncates every
    series to the shortest by row index, which pairs rows logged at different frames.
    ``stdev`` is the sample standard deviation (ddof=1), pandas' default that upstream uses.

    Args:
        frames: per session, its rows' frames, increasing.
        strengths: per session, its rows' local strengths.

    Returns:
        The consistency; NaN when undefined: fewer than 2 sessions with rows (no spread to
        measure), no frame all of them covered, or ``sum_i mean_j(s_ij) <= 0`` (strength no
        better than random on average gives nothing to be consistent about).
    """
    series = [(np.asarray(f), np.asarray(s)) for f, s in zip(frames, strengths, strict=True)]
    series = [(f, s) for f, s in series if f.size > 0]
    if len(series) < 2:
        return NAN
    start = max(float(f[0]) for f, _ in series)
    stop = min(float(f[-1]) for f, _ in series)
    grid = np.unique(np.concatenate([f for f, _ in series]).astype(np.float64))
    grid = grid[(grid >= start) & (grid <= stop)]
    if grid.size == 0:
        return NAN
    table = np.stack([np.interp(grid, f, s) for f, s in series])  # (sessions, grid)
    mean_sum = float(table.mean(axis=0).sum())
    if mean_sum <= 0:
        return NAN
    return 1.0 - 2.0 * float(table.std(axis=0, ddof=1).sum()) / mean_sum


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the scores left after cutting a quarter at each end.

    Equals ``scipy.stats.trim_mean(scores, 0.25, axis=None)``, rliable's ``aggregate_iqm``:
    ``int(0.25 * n)`` sorted scores are cut from each end (no fractional weighting), so for
    n = 5 the middle 3 are averaged.

    Args:
        scores: scores of any shape; flattened.

    Returns:
        The IQM; NaN for no score.
    """
    flat = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if flat.size == 0:
        return NAN
    cut = int(0.25 * flat.size)
    return float(flat[cut : flat.size - cut].mean())


def bootstrap_ci(
    scores: np.ndarray,
    statistic: Callable[[np.ndarray], float] = iqm,
    *,
    seed: int = 0,
    reps: int = 2000,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` under a stratified bootstrap (Agarwal et al. 2021).

    Scores are ``(runs,)`` or ``(runs, tasks)``; each replicate resamples the runs with
    replacement within every task independently (a task is a stratum), as rliable's
    ``StratifiedBootstrap``, and applies ``statistic`` to the resampled array. A trial is one
    task, so its stratum is all its sessions. The generator is ``np.random.default_rng(seed)``:
    the same scores and seed give the same interval.

    Args:
        scores: the runs' scores, ``(runs,)`` or ``(runs, tasks)``.
        statistic: maps a resampled array of the same shape to a number.
        seed: seeds the generator.
        reps: bootstrap replicates.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no run.
    """
    table = np.asarray(scores, dtype=np.float64)
    if table.size == 0:
        return NAN, NAN
    table = table.reshape(table.shape[0], -1)
    runs, tasks = table.shape
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, runs, size=(reps, runs, tasks))
    resampled = np.take_along_axis(table[None, :, :], picks, axis=1)
    stats = np.array([statistic(sample) for sample in resampled])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def _median_or_nan(values: list[float]) -> float:
    return float(np.median(values)) if values else NAN


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else NAN


def trial_metrics(
    sessions: Sequence[SessionMetrics], *, seed: int = 0, reps: int = 2000
) -> TrialMetrics:
    """Aggregate a trial's sessions.

    Return statistics use the sessions with a final return MA (a session that never logged one
    counts in N, and so against solved k/N, but has no return to average). The per-session SLM
    Lab metrics are averaged over the sessions where they are defined, as upstream's
    ``calc_trial_metrics`` averages them.

    Args:
        sessions: every session's ``SessionMetrics``, computed with the same target.
        seed: seeds the bootstrap, so the same sessions give the same interval.
        reps: bootstrap replicates.

    Returns:
        The trial's ``TrialMetrics``.
    """
    finals = np.array([s.final_return_ma for s in sessions if np.isfinite(s.final_return_ma)])
    solved = [s for s in sessions if s.frames_to_target is not None]
    low, high = bootstrap_ci(finals, iqm, seed=seed, reps=reps)
    return TrialMetrics(
        sessions=len(sessions),
        solved=len(solved),
        final_return_ma_mean=float(finals.mean()) if finals.size else NAN,
        final_return_ma_std=float(finals.std(ddof=1)) if finals.size > 1 else NAN,
        final_return_ma_median=float(np.median(finals)) if finals.size else NAN,
        final_return_ma_iqm=iqm(finals),
        iqm_ci_low=low,
        iqm_ci_high=high,
        frames_to_target_median=_median_or_nan([float(s.frames_to_target) for s in solved]),
        seconds_to_target_median=_median_or_nan(
            [s.seconds_to_target for s in solved if s.seconds_to_target is not None]
        ),
        strength=_nanmean([s.strength for s in sessions]),
        max_strength=_nanmean([s.max_strength for s in sessions]),
        final_strength=_nanmean([s.final_strength for s in sessions]),
        sample_efficiency=_nanmean([s.sample_efficiency for s in sessions]),
        training_efficiency=_nanmean([s.training_efficiency for s in sessions]),
        stability=_nanmean([s.stability for s in sessions]),
        consistency=consistency([s.frames for s in sessions], [s.strengths for s in sessions]),
    )
