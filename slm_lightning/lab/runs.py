"""Reading a finished (or stopped) run folder back: its metrics rows and its summary.

A run folder is what ``slm-lab fit`` leaves (see run_folder.py): ``metrics.csv`` with one row
every ``log_frequency`` frames, ``summary.json`` written when the session ends, ``config.yaml``
and ``checkpoints/``. The lab's trials, comparisons and plots read run folders only through
:func:`read_run`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from slm_lightning.lab.analysis import SessionMetrics, session_metrics

# metrics.csv columns the analysis reads (see callbacks/metrics.py for every key).
FRAMES = "rollout/frames"
UPDATES = "rollout/updates"
SECONDS = "rollout/seconds"
RETURN_MA = "episode/return_ma"
# The metrics of an evaluation during fit (callbacks/evaluation.py), logged in rows of their own.
EVAL_PREFIX = "eval/"
EVAL_RETURN = "eval/return_mean"


@dataclass
class RunRecord:
    """One run folder's logged history and end-of-run summary.

    Args:
        folder: the run folder.
        frames: f_i, the frame clock of each metrics row that has one, in logging order.
        updates: u_i, optimizer updates at those rows (0 where not logged).
        seconds: training wall seconds at those rows (NaN where not logged: runs written
            before the column existed).
        return_ma: R_i, the episode return moving average (NaN before the first episode).
        columns: every numeric column of those rows by its metrics key (the per-metric plots).
        summary: ``summary.json`` (empty if the session never wrote one).
    """

    folder: Path
    frames: np.ndarray
    updates: np.ndarray
    seconds: np.ndarray
    return_ma: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str | None:
        """How the session ended (``finished``, ``stopped``, ``crashed``); None without a
        summary, or for a summary written before summaries recorded it."""
        return self.summary.get("status")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_metrics(path: Path, training_only: bool = False) -> dict[str, np.ndarray]:
    """The rows of a ``metrics.csv`` that carry the frame clock, as float columns.

    Lightning's CSV logger writes one line per ``log_metrics`` call with the union of the keys
    as header, an empty cell where a row lacks a key; the rows without ``rollout/frames``
    (hyperparameters, a validation's rows) are left out.

    Args:
        path: the file; a missing or empty file gives no rows.
        training_only: also leave out the evaluation rows logged during fit (``PeriodicEval``:
            the frame clock and ``eval/`` metrics only), so that the last row, or the first
            past a frame, is one with the training metrics.
    """
    if not path.is_file():
        return {}

    def wanted(row: dict[str, str]) -> bool:
        if not row.get(FRAMES):
            return False
        return not training_only or not any(
            row.get(key) for key in row if key is not None and key.startswith(EVAL_PREFIX)
        )

    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if wanted(row)]
    if not rows:
        return {}
    keys = [k for k in rows[0] if k is not None]
    return {key: np.array([_number(row.get(key) or "") for row in rows]) for key in keys}


def read_run(folder: str | Path) -> RunRecord:
    """Read a run folder's ``metrics.csv`` and ``summary.json``.

    Args:
        folder: the run folder.
    """
    folder = Path(folder)
    columns = read_metrics(folder / "metrics.csv")
    n = len(columns.get(FRAMES, ()))

    def column(key: str, fill: float) -> np.ndarray:
        return columns[key] if key in columns else np.full(n, fill)

    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return RunRecord(
        folder=folder,
        frames=column(FRAMES, math.nan).astype(np.int64),
        updates=np.nan_to_num(column(UPDATES, 0.0)).astype(np.int64),
        seconds=column(SECONDS, math.nan),
        return_ma=column(RETURN_MA, math.nan),
        columns=columns,
        summary=summary,
    )


def analyse_run(record: RunRecord, random_return: float, target: float | None) -> SessionMetrics:
    """SLM Lab's metrics of one run folder (see :func:`~slm_lightning.lab.analysis.session_metrics`).

    The frames and seconds to the target are the summary's where it has them: the summary
    marks the first episode at which a full window's average reached the target, exactly,
    where the metrics rows only know the first logged row past it (and count partial windows).

    Args:
        record: the run, from :func:`read_run`.
        random_return: the env's random baseline.
        target: the return MA that counts as solved, or None.
    """
    metrics = session_metrics(
        record.frames,
        record.updates,
        record.return_ma,
        random_return,
        seconds=record.seconds if np.isfinite(record.seconds).any() else None,
        target=target,
    )
    if "frames_to_target" in record.summary:
        metrics = replace(
            metrics,
            frames_to_target=record.summary["frames_to_target"],
            seconds_to_target=record.summary.get("seconds_to_target"),
        )
    return metrics
