"""``slm-lab compare DIR1 DIR2 ... [--out DIR]``: trials (or single runs) of one env side by side.

Data path: :func:`load_entry` (each DIR: ``trial.json`` and its ``session-*/`` run folders, or
one run folder, read with runs.py:read_run and analysed with runs.py:analyse_run and
analysis.py:trial_metrics) → :func:`compare_table` (the Markdown table, with
:func:`probability_of_improvement` of each row over the first) → ``OUT/compare.md`` and
``OUT/compare.png`` (plots.py:plot_compare), and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from loguru import logger

from slm_lightning.envs.spec import AtariSpec, EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.lab.analysis import SessionMetrics, TrialMetrics, trial_metrics
from slm_lightning.lab.plots import plot_compare
from slm_lightning.lab.runs import RunRecord, analyse_run, read_run

UNDEFINED = "–"

COLUMNS = (
    "algorithm",
    "config",
    "sessions",
    "final return IQM [95% CI]",
    "mean ± std",
    "solved",
    "median frames to target",
    "fps",
    "strength",
    "sample efficiency",
    "stability",
    "consistency",
    "P(improve)",
)


@dataclass(frozen=True)
class Entry:
    """One DIR of the comparison: a trial or a single run, analysed.

    Args:
        folder: the DIR as the user typed it.
        algorithm: the algorithm's class name (``PPO``).
        config: the config's name, with the trial's overrides.
        env: the gymnasium id.
        target: the return that counts as solved, or None.
        random_return: the env's random baseline (NaN where unknown).
        records: the sessions' run folders.
        sessions: their ``SessionMetrics``.
        trial: the ``TrialMetrics`` across them.
    """

    folder: str
    algorithm: str
    config: str
    env: str
    target: float | None
    random_return: float
    records: list[RunRecord]
    sessions: list[SessionMetrics]
    trial: TrialMetrics


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + 0.5 P(X = Y) over every pair of a score of ``x`` and one of ``y``.

    Agarwal et al. 2021 ("Deep RL at the Edge of the Statistical Precipice", the
    Mann-Whitney U statistic normalised by the number of pairs): the probability that a run
    of X beats a run of Y, a tie counting half. 0.5 means neither is better.

    Args:
        x: the runs' scores of one algorithm (final return MA per session).
        y: those of the other.

    Returns:
        The probability; NaN when either has no score.
    """
    x = np.asarray(x, dtype=np.float64).ravel()[:, None]
    y = np.asarray(y, dtype=np.float64).ravel()[None, :]
    if x.size == 0 or y.size == 0:
        return math.nan
    return float(np.mean(x > y) + 0.5 * np.mean(x == y))


def _env_spec(folder: Path) -> EnvSpec:
    """The env a run folder's ``config.yaml`` configured."""
    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    try:
        env = dict(config["model"]["init_args"]["env"])
    except (KeyError, TypeError):
        raise ConfigError(
            f"compare: {folder}/config.yaml has no model.init_args.env to name the env"
        ) from None
    if isinstance(env.get("atari"), dict):
        env["atari"] = AtariSpec(**env["atari"])
    return EnvSpec(**env)


def _random_return_of_run(folder: Path) -> float:
    """The random baseline of the env a run folder trained on.

    Args:
        folder: the run folder.
    """
    # Imported here: the baseline measures (and caches) episodes of gymnasium envs, which a
    # comparison of trials, whose trial.json holds the baseline, never needs.
    from slm_lightning.lab.baseline import random_return

    return random_return(_env_spec(folder))


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _config_name(info: dict[str, Any]) -> str:
    """The trial's config name and its overrides as ``key=value`` (``lr=0.001``)."""
    overrides = [
        o.removeprefix("--").removeprefix("model.init_args.") for o in info.get("overrides", [])
    ]
    return " ".join([str(info.get("name", "")), *overrides]).strip()


def _load_trial(folder: Path) -> tuple[dict[str, Any], list[RunRecord]]:
    info = json.loads((folder / "trial.json").read_text())
    records = [read_run(folder / session["folder"]) for session in info.get("sessions", [])]
    return {
        "algorithm": info.get("algorithm") or UNDEFINED,
        "config": _config_name(info) or folder.name,
        "env": info.get("env"),
        "target": info.get("target_return"),
        "random_return": _float_or_nan(info.get("random_return")),
    }, records


def _load_run(folder: Path) -> tuple[dict[str, Any], list[RunRecord]]:
    record = read_run(folder)
    summary = record.summary
    spec = _env_spec(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    # A config saved with the --config file it came from names it; LightningCLI's config.yaml
    # does not, and the run folder's parent is then runs/<config name>/.
    files = config.get("config") or []
    name = Path(files[0]).stem if files else folder.resolve().parent.name
    algorithm = summary.get("algorithm") or str(config["model"]["class_path"]).rpartition(".")[2]
    target = summary["target_return"] if "target_return" in summary else spec.reward_threshold()
    return {
        "algorithm": algorithm,
        "config": name,
        "env": summary.get("env") or spec.env_id,
        "target": target,
        "random_return": _random_return_of_run(folder),
    }, [record]


def load_entry(folder: str | Path, *, seed: int = 0) -> Entry:
    """Read and analyse one DIR of the comparison.

    A trial folder holds ``trial.json`` (algorithm, name, env, target and random baseline;
    its ``sessions`` list the ``session-*/`` run folders). A run folder holds ``metrics.csv``
    and ``config.yaml``: one session, its algorithm, env and target from ``summary.json``
    (from ``config.yaml`` and the env's reward threshold if the run wrote none), its random
    baseline measured (or read from the cache) for the env ``config.yaml`` names.

    Args:
        folder: the DIR as the user typed it.
        seed: seeds the IQM's bootstrap.
    """
    path = Path(folder)
    if (path / "trial.json").is_file():
        info, records = _load_trial(path)
    elif (path / "metrics.csv").is_file() and (path / "config.yaml").is_file():
        info, records = _load_run(path)
    else:
        raise ConfigError(
            f"compare: {folder} is neither a trial folder (trial.json) nor a run folder "
            "(metrics.csv and config.yaml)"
        )
    target = None if info["target"] is None else float(info["target"])
    sessions = [analyse_run(r, info["random_return"], target) for r in records]
    return Entry(
        folder=str(folder),
        algorithm=info["algorithm"],
        config=info["config"],
        env=str(info["env"]),
        target=target,
        random_return=info["random_return"],
        records=records,
        sessions=sessions,
        trial=trial_metrics(sessions, seed=seed),
    )


def _finals(entry: Entry) -> np.ndarray:
    return np.array([s.final_return_ma for s in entry.sessions if math.isfinite(s.final_return_ma)])


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return UNDEFINED
    return f"{value:.{digits}f}"


def table_row(entry: Entry, first: Entry | None) -> list[str]:
    """One row of the table, in the order of ``COLUMNS``.

    Args:
        entry: the row's trial or run.
        first: the first row, for the probability of improvement; None for the first row
            itself (written ``–``).
    """
    trial = entry.trial
    iqm = _fmt(trial.final_return_ma_iqm)
    if iqm != UNDEFINED:
        iqm = f"{iqm} [{_fmt(trial.iqm_ci_low)}, {_fmt(trial.iqm_ci_high)}]"
    mean = _fmt(trial.final_return_ma_mean)
    if mean != UNDEFINED:
        mean = f"{mean} ± {_fmt(trial.final_return_ma_std)}"
    fps = [s.fps for s in entry.sessions if math.isfinite(s.fps)]
    improve = (
        UNDEFINED
        if first is None
        else _fmt(probability_of_improvement(_finals(entry), _finals(first)), 2)
    )
    return [
        entry.algorithm,
        entry.config,
        str(trial.sessions),
        iqm,
        mean,
        UNDEFINED if entry.target is None else f"{trial.solved}/{trial.sessions}",
        _fmt(trial.frames_to_target_median, 0),
        _fmt(float(np.median(fps)) if fps else None, 0),
        _fmt(trial.strength),
        _fmt(trial.sample_efficiency),
        _fmt(trial.stability, 2),
        _fmt(trial.consistency, 2),
        improve,
    ]


def compare_table(entries: Sequence[Entry]) -> str:
    """The Markdown table of ``compare.md``: one row per trial or run, in the order given.

    Args:
        entries: the analysed DIRs; the first is the reference of P(improve).
    """
    rows = [table_row(e, None if i == 0 else entries[0]) for i, e in enumerate(entries)]
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _check_one_env(entries: Sequence[Entry]) -> None:
    for entry in entries[1:]:
        if entry.env != entries[0].env:
            raise ConfigError(
                f"compare: {entries[0].folder} is {entries[0].env} but {entry.folder} is "
                f"{entry.env}; compare runs of one env"
            )


def compare_main(argv: list[str]) -> None:
    """``slm-lab compare DIR1 DIR2 ... [--out DIR]``: write ``compare.md`` and ``compare.png``
    and print the table.

    Args:
        argv: the arguments after ``compare``.
    """
    parser = argparse.ArgumentParser(
        prog="slm-lab compare",
        description="Compare trials (or single runs) of one env: a Markdown table of SLM "
        "Lab's metrics with IQM intervals, and their mean curves with 95% bands.",
        exit_on_error=False,
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="trial or run folders")
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/compare-<timestamp>/)"
    )
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"compare: {err}") from None
    if unknown:
        raise ConfigError(
            f"compare: unknown argument {unknown[0]}; usage: slm-lab compare DIR1 DIR2 ... "
            "[--out DIR]"
        )
    if not args.dirs:
        raise ConfigError(
            "compare: give at least one trial or run folder, e.g. slm-lab compare DIR1 DIR2"
        )
    entries = [load_entry(folder) for folder in args.dirs]
    _check_one_env(entries)
    out = Path(args.out or f"runs/compare-{time.strftime('%Y_%m_%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    env = entries[0].env
    table = compare_table(entries)
    lines = [
        f"# {env}: {', '.join(f'{e.algorithm} ({e.config})' for e in entries)}",
        "",
        table,
        "",
        "Final return IQM: interquartile mean of the sessions' final return MA, 95% stratified "
        "bootstrap interval. P(improve): probability that a session of the row ends above one "
        f"of the first row, ties counting half (Agarwal et al. 2021). {UNDEFINED}: undefined.",
        "Sources: " + ", ".join(e.folder for e in entries),
        "",
    ]
    (out / "compare.md").write_text("\n".join(lines))
    groups = [(f"{e.algorithm} {e.config}", e.records) for e in entries]
    plot_compare(out / "compare.png", groups, target=entries[0].target, title=env)
    print(table)
    logger.info(f"compare: wrote {out / 'compare.md'} and {out / 'compare.png'}")
