"""The lab's figures: a trial's sessions with their mean and a 95% bootstrap band, a run's
logged metrics one panel each, and the mean curves of several trials side by side.

Each ``plot_*`` saves the figure its ``*_figure`` builds (tests inspect the latter's artists).
Figures are ``matplotlib.figure.Figure`` objects drawn by the Agg canvas, never pyplot's: no
global backend switch, no figure manager to close, nothing left behind when a trial draws
hundreds of figures in one process (matplotlib's "Embedding in a web application server"
advice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from slm_lightning.lab.runs import FRAMES, RunRecord

# Columns that are the x axis or Lightning's step counter, not a metric to plot.
NOT_METRICS = ("step", FRAMES)

# Groups take the colours of this palette in the order given, so a comparison drawn twice
# (or with one group left out at the end) keeps each group's colour.
# tab10's ten colours, then tab20's lighter shades: up to 20 groups in distinct colours.
PALETTE = colormaps["tab10"].colors + colormaps["tab20"].colors[1::2]

SESSION_ALPHA = 0.25
BAND_ALPHA = 0.2
DPI = 100


def curve_band(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    seed: int = 0,
    reps: int = 1000,
    points: int = 200,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sessions' mean curve and the 95% bootstrap interval of that mean, on a common grid.

    Sessions log at different x and may stop at different points, so the grid is ``points``
    evenly spaced x over the span every session covers, ``[max first x, min last x]``; each
    curve is linearly interpolated onto it (``np.interp``), never extrapolated -- the rule of
    :func:`~slm_lightning.lab.analysis.consistency`. Every bootstrap replicate resamples the
    sessions (whole curves) with replacement from ``np.random.default_rng(seed)``, so the
    same curves and seed give the same band.

    Args:
        curves: per session, ``(x, y)`` with x increasing; rows with a non-finite x or y (a
            return MA before the first episode, seconds a run did not log) are dropped, and a
            curve left with no row is left out.
        seed: seeds the bootstrap.
        reps: bootstrap replicates.
        points: grid points.

    Returns:
        ``(grid, mean, low, high)``, each ``(points,)`` (one point where the span is a single
        x, none where no x is covered by every curve or no curve has a row). One session's
        band is its curve itself.
    """
    kept = []
    for x, y in curves:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        finite = np.isfinite(x) & np.isfinite(y)
        if finite.any():
            kept.append((x[finite], y[finite]))
    empty = np.empty(0)
    if not kept:
        return empty, empty, empty, empty
    start = max(x[0] for x, _ in kept)
    stop = min(x[-1] for x, _ in kept)
    if start > stop:
        return empty, empty, empty, empty
    grid = np.linspace(start, stop, points) if stop > start else np.array([start])
    table = np.stack([np.interp(grid, x, y) for x, y in kept])  # (sessions, points)
    mean = table.mean(axis=0)
    if len(kept) == 1:
        return grid, mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(kept), size=(reps, len(kept)))
    means = table[picks].mean(axis=1)  # (reps, points): every grid point in one operation
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    return grid, mean, low, high


def _draw_band(
    ax: Axes,
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    color: tuple[float, ...] | str,
    label: str | None,
    seed: int,
    sessions: bool,
) -> None:
    """Each curve faint (when ``sessions``), then their mean with its 95% band."""
    if sessions:
        for x, y in curves:
            ax.plot(x, y, color=color, alpha=SESSION_ALPHA, linewidth=0.8)
    grid, mean, low, high = curve_band(curves, seed=seed)
    if grid.size:
        ax.fill_between(grid, low, high, color=color, alpha=BAND_ALPHA, linewidth=0)
        ax.plot(grid, mean, color=color, linewidth=1.8, label=label)


def _draw_target(ax: Axes, target: float | None) -> None:
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")


def _finite_curve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(x) & np.isfinite(y)
    return x[finite], y[finite]


def trial_figure(
    records: Sequence[RunRecord], *, target: float | None, title: str, seed: int = 0
) -> Figure:
    """The figure :func:`plot_trial` saves: return MA against frames (left) and training
    seconds (right); every session faint, their mean with its 95% band, the target dashed.

    Args:
        records: the sessions' run folders, from :func:`~slm_lightning.lab.runs.read_run`.
        target: the return that counts as solved, or None.
        title: the figure's title.
        seed: seeds the band's bootstrap.
    """
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_frames, by_seconds = fig.subplots(1, 2)
    # Runs written before metrics rows logged seconds have none: their curves leave only
    # the seconds panel.
    for ax, clock, xlabel in (
        (by_frames, "frames", "frames"),
        (by_seconds, "seconds", "training seconds"),
    ):
        curves = [_finite_curve(getattr(r, clock).astype(np.float64), r.return_ma) for r in records]
        curves = [(x, y) for x, y in curves if x.size]
        _draw_band(ax, curves, color=PALETTE[0], label="mean, 95% CI", seed=seed, sessions=True)
        _draw_target(ax, target)
        if not curves:
            ax.text(0.5, 0.5, f"no {xlabel} logged", ha="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("return MA")
        ax.grid(alpha=0.3)
    if by_frames.get_legend_handles_labels()[0]:
        by_frames.legend(loc="lower right")
    fig.suptitle(title)
    return fig


def plot_trial(
    path: str | Path,
    records: Sequence[RunRecord],
    *,
    target: float | None,
    title: str,
    seed: int = 0,
) -> None:
    """Save a trial's sessions' return MA with their mean and 95% band (``trial.png``).

    Args:
        path: the PNG to write.
        records: the sessions' run folders.
        target: the return that counts as solved, or None.
        title: the figure's title.
        seed: seeds the band's bootstrap.
    """
    trial_figure(records, target=target, title=title, seed=seed).savefig(path, dpi=DPI)


def metric_columns(record: RunRecord) -> list[str]:
    """The logged metrics :func:`plot_metrics` draws: every column but the frame clock and
    Lightning's step, in the CSV's order, left out where no row has a finite value.

    Args:
        record: the run.
    """
    return [
        key
        for key, values in record.columns.items()
        if key not in NOT_METRICS and np.isfinite(values).any()
    ]


def metrics_figure(record: RunRecord, title: str) -> Figure:
    """The figure :func:`plot_metrics` saves: one small panel per logged metric against
    frames, in a grid of up to 4 columns sized to the number of metrics.

    Args:
        record: the run, from :func:`~slm_lightning.lab.runs.read_run`.
        title: the figure's title.
    """
    keys = metric_columns(record)
    cols = max(1, min(4, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    height = 2.2 * rows + 0.9
    fig = Figure(figsize=(3.2 * cols, height))
    # Fixed margins: constrained layout measures every tick label of every panel and took
    # 1.3 s of a 20-panel figure's 2.5 s here, at the end of every fit.
    axes = fig.subplots(
        rows,
        cols,
        squeeze=False,
        sharex=True,
        gridspec_kw={
            "left": 0.08 if cols > 1 else 0.2,
            "right": 0.98,
            "bottom": 0.45 / height,
            "top": 1 - 0.8 / height,  # room for the title above the first row's titles
            "wspace": 0.35,
            "hspace": 0.45,
        },
    ).ravel()
    frames = record.frames.astype(np.float64)
    for ax, key in zip(axes, keys, strict=False):
        # Some metrics are logged only on some rows (a loss after the first update): plot
        # the rows that have them.
        x, y = _finite_curve(frames, record.columns[key])
        ax.plot(x, y, linewidth=1, marker="." if x.size < 3 else None)
        # A text, not set_title: placing titles measures every tick label (0.5 s of 0.9 s here).
        ax.text(0.5, 1.03, key, transform=ax.transAxes, ha="center", va="bottom", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    for ax in axes[max(0, len(keys) - cols) : len(keys)]:  # the lowest panel of each column
        ax.set_xlabel("frames", fontsize=8)
        ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(title)
    return fig


def plot_metrics(path: str | Path, record: RunRecord, title: str) -> None:
    """Save one small panel per logged metric of a run against frames (``metrics.png``), as
    SLM Lab plots a session: losses, entropy, lr, epsilon/alpha/clip, approx_kl, fps, return.

    Args:
        path: the PNG to write.
        record: the run.
        title: the figure's title.
    """
    metrics_figure(record, title).savefig(path, dpi=DPI)


def compare_figure(
    groups: Sequence[tuple[str, Sequence[RunRecord]]],
    *,
    target: float | None,
    title: str,
    seed: int = 0,
) -> Figure:
    """The figure :func:`plot_compare` saves: per group its sessions' mean return MA against
    frames with the 95% band, in the colours of ``PALETTE`` and a legend in the order given.

    Args:
        groups: ``(label, sessions)`` per trial or run.
        target: the return that counts as solved, or None.
        title: the figure's title.
        seed: seeds the bands' bootstrap.
    """
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    for index, (label, records) in enumerate(groups):
        curves = [_finite_curve(r.frames.astype(np.float64), r.return_ma) for r in records]
        curves = [(x, y) for x, y in curves if x.size]
        color = PALETTE[index % len(PALETTE)]
        _draw_band(ax, curves, color=color, label=label, seed=seed, sessions=False)
    _draw_target(ax, target)
    ax.set_xlabel("frames")
    ax.set_ylabel("return MA")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        # Beside the axes, where it hides no curve however many groups there are.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title)
    return fig


def plot_compare(
    path: str | Path,
    groups: Sequence[tuple[str, Sequence[RunRecord]]],
    *,
    target: float | None,
    title: str,
    seed: int = 0,
) -> None:
    """Save the mean return MA curves of several trials with their 95% bands (``compare.png``).

    Args:
        path: the PNG to write.
        groups: ``(label, sessions)`` per trial or run, in legend order.
        target: the return that counts as solved, or None.
        title: the figure's title.
        seed: seeds the bands' bootstrap.
    """
    compare_figure(groups, target=target, title=title, seed=seed).savefig(path, dpi=DPI)
