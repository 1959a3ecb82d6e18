"""``slm-lab search``: hyperparameter search on Optuna, every Optuna trial a multi-seed trial.

Data path: :func:`search_main` parses the search's options and checks the config with the
fit overrides and the space (lab/space.py: every key against the config; every option and
both ends of every range through the config's own parse) before anything is written →
lab/study.py:open_storage (a journal file in the search folder by default; any Optuna
storage URL) and ``optuna.create_study(load_if_exists=True)``: processes that share the
storage and study name share the study → :class:`Searcher` asks Optuna for trials while the
study's budget allows (lab/study.py:may_ask, admitted), runs each as ``DIR/trial-<n>/``
(lab/trial.py's folder, sessions and analysis) with its sessions on one
:class:`SessionPool` of ``--workers`` processes, reports the sessions' mean return MA on a
frame grid as Optuna intermediate values (:func:`grid_values`) and stops a trial's sessions
at a checkpoint when the pruner says so → lab/search_results.py:write_results
(``study.csv``, ``best.yaml``, ``search.png``, the ``search:`` line) → ``--validate-top K``
reruns the K best as fresh trials with new seeds.

A trial whose process died (SIGKILL, a lost machine) is failed and queued again once, its
sessions resuming from their checkpoints where its folder is on this machine: on this host
the owner's process id tells (lab/study.py:reap_dead_trials), across machines Optuna's
heartbeat on a database storage does.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from loguru import logger
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState

from slm_lightning.envs.workers import usable_cores
from slm_lightning.errors import ConfigError, explain
from slm_lightning.lab.runs import FRAMES, RETURN_MA, read_metrics
from slm_lightning.lab.search_results import SearchSetup, write_results, write_study_csv
from slm_lightning.lab.sessions import Session, SessionPool
from slm_lightning.lab.space import SearchSpace, check_space_keys, load_space
from slm_lightning.lab.study import (
    HEARTBEAT_SECONDS,
    PRUNERS,
    SAMPLERS,
    admitted,
    join_study,
    make_pruner,
    make_sampler,
    may_ask,
    open_storage,
    process_record,
    reap_dead_trials,
    requeue,
    tell,
)
from slm_lightning.lab.trial import (
    analyse_trial,
    check_overrides,
    claim_dir,
    describe_config,
    prepare_trial,
    resolve_seeds,
)

SEARCH_OPTIONS = [
    "--config",
    "--space",
    "--trials",
    "--sessions",
    "--seeds",
    "--workers",
    "--dir",
    "--sampler",
    "--pruner",
    "--objective",
    "--storage",
    "--study",
    "--startup-trials",
    "--warmup-frames",
    "--validate-top",
    "--validate-sessions",
    "--progress-every",
]
# objective name -> the trial.json figure it maximises
OBJECTIVES = {
    "return_ma": "final_return_ma_mean",
    "strength": "strength",
    "iqm": "final_return_ma_iqm",
}
REAP_SECONDS = 15.0  # how often a running search looks for trials whose process died


def build_parser() -> argparse.ArgumentParser:
    """The search's own options; everything else is passed on to every session's ``fit``."""
    parser = argparse.ArgumentParser(
        prog="slm-lab search",
        description="Search hyperparameters with Optuna; every trial runs several seeds. "
        "Any other option (--model.init_args.max_frames=100000 …) is passed to every session.",
        allow_abbrev=False,
        exit_on_error=False,
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s)")
    parser.add_argument("--space", type=Path, required=True, help="search space YAML file")
    parser.add_argument(
        "--trials", type=int, required=True, help="trials in the study, all processes together"
    )
    parser.add_argument("--sessions", type=int, default=2, help="sessions (seeds) per trial")
    parser.add_argument("--seeds", type=int, nargs="+", help="the sessions' seeds")
    parser.add_argument("--workers", type=int, help="sessions at once (default: the cores)")
    parser.add_argument(
        "--dir", type=Path, help="search folder (default runs/<config>/search-<timestamp>)"
    )
    parser.add_argument("--sampler", default="tpe", help=f"one of {', '.join(SAMPLERS)}")
    parser.add_argument("--pruner", default="median", help=f"one of {', '.join(PRUNERS)}")
    parser.add_argument("--objective", default="return_ma", help=f"one of {', '.join(OBJECTIVES)}")
    parser.add_argument(
        "--storage",
        help="Optuna storage: sqlite:///FILE, postgresql://…, or a journal file "
        "(default DIR/study.journal)",
    )
    parser.add_argument("--study", help="study name (default: the config's name)")
    parser.add_argument(
        "--startup-trials",
        type=int,
        default=5,
        help="trials the sampler draws at random, and that complete before any is pruned",
    )
    parser.add_argument(
        "--warmup-frames",
        type=int,
        help="no trial is pruned before this many frames (default: a fifth of the budget)",
    )
    parser.add_argument(
        "--validate-top", type=int, default=0, help="rerun the K best trials with new seeds"
    )
    parser.add_argument(
        "--validate-sessions", type=int, default=4, help="sessions of each validation trial"
    )
    parser.add_argument(
        "--progress-every", type=float, default=30.0, help="seconds between progress lines"
    )
    return parser


# --- one trial's progress ---------------------------------------------------------------------


def grid_values(
    columns: list[dict[str, Any]], grid: int, max_frames: int
) -> list[tuple[int, float]]:
    """The steps of the frame grid (``grid``, ``2 grid`` … up to ``max_frames``) that every
    session has logged, each with the mean over sessions of the return MA of each session's
    first metrics row at or past it. Steps align across trials, as the median pruner needs;
    a step where a session has no return MA yet is left out.

    Args:
        columns: each session's metrics columns (``read_metrics``).
        grid: the grid's spacing in frames.
        max_frames: a session's budget.
    """
    out: list[tuple[int, float]] = []
    for step in range(grid, max_frames + 1, grid):
        values = []
        for col in columns:
            frames = col.get(FRAMES, [])
            index = next((i for i, f in enumerate(frames) if f >= step), None)
            if index is None:
                return out  # not there yet
            values.append(col.get(RETURN_MA, [math.nan] * len(frames))[index])
        if values and all(math.isfinite(v) for v in values):
            out.append((step, float(sum(values) / len(values))))
    return out


@dataclass
class RunningTrial:
    """An Optuna trial being run here: its folder and sessions.

    Args:
        trial: the Optuna trial.
        folder: ``DIR/trial-<n>``.
        sessions: its sessions.
        overrides: the fit options of its sessions (the search's and the sampled values).
        pruned: the pruner stopped it.
        reported: the last frame step reported to Optuna.
        value: the value reported at that step.
        checked: when its progress was last read (monotonic seconds).
    """

    trial: optuna.Trial
    folder: Path
    sessions: list[Session]
    overrides: list[str]
    pruned: bool = False
    reported: int = 0
    value: float = math.nan
    checked: float = 0.0

    @property
    def ended(self) -> bool:
        return all(s.status not in ("pending", "running") for s in self.sessions)


class Searcher:
    """Runs the study's trials on one pool of session processes, until the study's budget is
    spent or the search is stopped.

    Args:
        study: the Optuna study.
        setup: what the trials share.
        pool: the session processes (``--workers`` at once).
    """

    def __init__(self, study: optuna.Study, setup: SearchSetup, pool: SessionPool) -> None:
        self.study = study
        self.setup = setup
        self.pool = pool
        self.trials: list[RunningTrial] = []
        self.exhausted = False
        self.heartbeat = 0.0
        self.reaped = 0.0

    def run(self) -> None:
        """Ask, run, prune and tell until no trial is left to run here."""
        with self.pool.signals():
            while True:
                stopping = self.pool.stop_signal is not None
                if stopping:
                    self.pool.stop(list(self.pool.running.values()))
                else:
                    self._fill()
                self.pool.poll()
                for running in list(self.trials):
                    self._check(running)
                if not self.trials and (stopping or self.exhausted):
                    return
                self._upkeep()
                time.sleep(0.2)

    def _fill(self) -> None:
        """Start sessions while shares of the cores are free: the pending sessions of the
        trials running here first, then a new trial's."""
        while self.pool.free:
            pending = [
                s for t in self.trials if not t.pruned for s in t.sessions if s.status == "pending"
            ]
            if pending:
                self._start(pending[0])
                continue
            if self.exhausted or not self._ask():
                return

    def _start(self, session: Session) -> None:
        self.pool.start(session)
        running = next(t for t in self.trials if session in t.sessions)
        records = running.trial.user_attrs.get("sessions", [])
        assert session.process is not None
        running.trial.set_user_attr("sessions", [*records, process_record(session.process.pid)])

    def _ask(self) -> bool:
        """Ask Optuna for a trial within the budget; False when the budget is spent."""
        if time.monotonic() - self.reaped > REAP_SECONDS:
            reap_dead_trials(self.study)
            self.reaped = time.monotonic()
        grid = self.study.sampler
        if not may_ask(self.study.get_trials(deepcopy=False), self.setup.budget) or (
            isinstance(grid, optuna.samplers.GridSampler) and grid.is_exhausted(self.study)
        ):
            self.exhausted = True
            return False
        with warnings.catch_warnings():
            # GridSampler warns once its grid is used up, and stops the study itself.
            warnings.simplefilter("ignore", UserWarning)
            trial = self.study.ask(self.setup.space.distributions)
        if not admitted(self.study.get_trials(deepcopy=False), trial.number, self.setup.budget):
            trial.set_user_attr("over_budget", True)
            tell(self.study, trial, state=TrialState.FAIL)
            self.exhausted = True
            return False
        trial.set_user_attr("owner", process_record(os.getpid()))
        self.heartbeat = 0.0  # the new trial's first heartbeat now
        self.trials.append(self._prepare(trial))
        self._upkeep()
        return True

    def _prepare(self, trial: optuna.Trial) -> RunningTrial:
        """The trial's folder (a queued trial takes over its previous attempt's folder, so its
        sessions resume from their checkpoints) and sessions."""
        setup = self.setup
        folder = setup.folder / f"trial-{trial.number}"
        previous = trial.user_attrs.get("retry_of")
        if previous is not None and not folder.exists():
            before = setup.folder / f"trial-{previous}"
            if before.is_dir():
                before.rename(folder)
                logger.info(f"trial-{trial.number}: resumes trial-{previous}'s sessions")
        folder.mkdir(parents=True, exist_ok=True)
        overrides = setup.overrides + setup.space.overrides(trial.params)
        command = {"configs": setup.configs, "overrides": overrides, "seeds": setup.seeds}
        sessions = prepare_trial(folder, command, setup.facts, f"trial-{trial.number}/")
        values = ", ".join(f"{k}={v}" for k, v in setup.space.values(trial.params).items())
        logger.info(f"trial-{trial.number}: {values}")
        trial.set_user_attr("folder", str(folder))
        return RunningTrial(trial, folder, sessions, overrides)

    def _check(self, running: RunningTrial) -> None:
        """Report a trial's progress, prune it when the pruner says so, and tell Optuna how it
        ended once its sessions have."""
        if running.ended:
            self._report(running)
            self._tell(running)
            self.trials.remove(running)
            return
        crashed = any(s.status == "crashed" for s in running.sessions)
        if crashed or self.pool.stop_signal is not None:
            self._halt(running)  # a crashed session fails the trial: spare the others' time
            return
        if running.pruned or time.monotonic() - running.checked < 1.0:
            return
        running.checked = time.monotonic()
        if self._report(running) and running.trial.should_prune():
            logger.info(
                f"trial-{running.trial.number}: pruned at {running.reported} frames "
                f"(sessions' mean return MA {running.value:.4g})"
            )
            running.pruned = True
            self._halt(running)

    def _report(self, running: RunningTrial) -> bool:
        """Report the grid steps the sessions reached since the last report; True if any."""
        columns = [
            read_metrics(s.folder / "metrics.csv", training_only=True) for s in running.sessions
        ]
        steps = grid_values(columns, self.setup.grid, self.setup.facts.max_frames)
        new = [(step, value) for step, value in steps if step > running.reported]
        for step, value in new:
            running.trial.report(value, step)
            running.reported, running.value = step, value
        return bool(new)

    def _halt(self, running: RunningTrial) -> None:
        """Stop a trial's running sessions at a checkpoint and drop its pending ones."""
        for session in running.sessions:
            if session.status == "pending":
                session.status = "stopped"
        self.pool.stop([s for s in running.sessions if s.status == "running"])

    def _tell(self, running: RunningTrial) -> None:
        setup = self.setup
        trial = running.trial
        command = {"configs": setup.configs, "overrides": running.overrides, "seeds": setup.seeds}
        report = analyse_trial(running.folder, running.sessions, setup.facts, command)
        finals = [s["metrics"].get("final_return_ma") for s in report["sessions"]]
        trial.set_user_attr("return_ma", finals)
        trial.set_user_attr(
            "frames", int(sum(s["summary"].get("frames") or 0 for s in report["sessions"]))
        )
        trial.set_user_attr(
            "seconds", float(sum(s["summary"].get("seconds") or 0.0 for s in report["sessions"]))
        )
        trial.set_user_attr("line", report["line"])
        crashed = [s for s in running.sessions if s.status == "crashed"]
        value = report["trial"].get(OBJECTIVES[setup.objective])
        name = f"trial-{trial.number}"
        if crashed:
            trial.set_user_attr("error", f"session-{crashed[0].seed}: {crashed[0].error}")
            tell(self.study, trial, state=TrialState.FAIL)
            logger.error(f"{name}: failed: session-{crashed[0].seed} crashed: {crashed[0].error}")
        elif running.pruned:
            tell(self.study, trial, state=TrialState.PRUNED)
            logger.info(f"{name}: pruned; {report['line']}")
        elif self.pool.stop_signal is not None and any(
            s.status != "finished" for s in running.sessions
        ):
            tell(self.study, trial, state=TrialState.FAIL)
            requeue(self.study, self.study.get_trials(deepcopy=False)[trial.number], died=False)
        elif value is None or not math.isfinite(value):
            trial.set_user_attr("error", f"no {setup.objective}: no episode ended")
            tell(self.study, trial, state=TrialState.FAIL)
            logger.error(f"{name}: failed: no {setup.objective} (no episode ended)")
        else:
            tell(self.study, trial, value)
            logger.info(f"{name}: {setup.objective}={value:.4g}; {report['line']}")
        write_study_csv(self.study, setup.folder / "study.csv", setup.seeds)

    def _upkeep(self) -> None:
        """Heartbeats of the trials running here, on a database storage (Optuna fails a trial
        whose heartbeat stopped, from any machine)."""
        storage = self.study._storage  # Optuna's heartbeat API is on the storage
        if not isinstance(storage, optuna.storages.RDBStorage):
            return
        if time.monotonic() - self.heartbeat > HEARTBEAT_SECONDS / 2:
            for running in self.trials:
                storage.record_heartbeat(running.trial._trial_id)
            self.heartbeat = time.monotonic()


def validate_top(
    study: optuna.Study, setup: SearchSetup, pool: SessionPool, top: int, sessions: int
) -> list[str]:
    """Rerun the ``top`` best complete trials as fresh trials in ``DIR/validate-<n>/`` with
    seeds none of the search's trials used, and return a line per trial comparing its
    search objective with the fresh interval (the best of many noisy trials is optimistic).

    Args:
        study: the study.
        setup: the search's setup.
        pool: the session processes.
        top: how many of the best trials.
        sessions: sessions of each validation trial.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sorted(complete, key=lambda t: t.value, reverse=True)[:top]
    seeds = [max(setup.seeds) + 1 + i for i in range(sessions)]
    lines = []
    for trial in best:
        folder = setup.folder / f"validate-{trial.number}"
        folder.mkdir(parents=True, exist_ok=True)
        overrides = setup.overrides + setup.space.overrides(trial.params)
        command = {"configs": setup.configs, "overrides": overrides, "seeds": seeds}
        planned = prepare_trial(folder, command, setup.facts, f"validate-{trial.number}/")
        logger.info(f"validate-{trial.number}: trial {trial.number}'s values, seeds {seeds}")
        pool.run(planned)
        if pool.stop_signal is not None:
            break
        report = analyse_trial(folder, planned, setup.facts, command)
        figures = report["trial"]
        lines.append(
            f"validate: trial {trial.number} {setup.objective}={trial.value:.4g} (seeds "
            f"{setup.seeds}) -> return_ma={_num(figures['final_return_ma_mean'])} "
            f"iqm={_num(figures['final_return_ma_iqm'])} [{_num(figures['iqm_ci_low'])}, "
            f"{_num(figures['iqm_ci_high'])}] solved={figures['solved']}/{figures['sessions']} "
            f"(seeds {seeds}, {folder})"
        )
        logger.info(lines[-1])
    return lines


def _num(value: float | None) -> str:
    return "None" if value is None else f"{value:.4g}"


# --- the command ----------------------------------------------------------------------------


def probe_space(configs: list[str], overrides: list[str], space: SearchSpace) -> None:
    """Parse the config with both ends of every range and every option of every choice, so
    that a value the algorithm rejects is one line now, not a failed trial later.

    Args:
        configs: the ``--config`` files.
        overrides: the search's fit options.
        space: the search space.
    """
    choices = [
        len(d.choices)
        for d in space.distributions.values()
        if isinstance(d, optuna.distributions.CategoricalDistribution)
    ]
    for i in range(max([2, *choices])):  # probe i: option i of each choice, alternate ends
        params = {}
        for key, dist in space.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                params[key] = dist.choices[i % len(dist.choices)]
            else:
                params[key] = dist.low if i % 2 == 0 else dist.high
        probe = space.overrides(params)
        try:
            describe_config(configs, overrides + probe)
        except Exception as err:  # what fit would say about these values, on one line
            text = explain(err, [arg for c in configs for arg in ("--config", c)] + probe)
            raise ConfigError(f"--space {space.source}: {' '.join(probe)}: {text}") from None


def search_main(argv: list[str]) -> None:
    """``slm-lab search --config C --space S --trials N [--sessions K] [--workers W] [--dir
    DIR] [--sampler …] [--pruner …] [--objective …] [--storage URL --study NAME]
    [--validate-top K] [fit overrides…]``.

    Exits 0 when the search ran (failed trials are in ``study.csv``), 1 when no trial
    completed and one failed, 143 / 130 when SIGTERM / Ctrl-C stopped it (running trials are
    queued again; the same command continues the study).

    Args:
        argv: the arguments after ``slm-lab search``.
    """
    try:
        options, overrides = build_parser().parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"search: {err}") from None
    check_overrides(overrides, SEARCH_OPTIONS, prog="search")
    for name, value, allowed in (
        ("--sampler", options.sampler, SAMPLERS),
        ("--pruner", options.pruner, PRUNERS),
        ("--objective", options.objective, tuple(OBJECTIVES)),
    ):
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    for name, value, low in (
        ("--trials", options.trials, 1),
        ("--workers", options.workers, 1),
        ("--startup-trials", options.startup_trials, 0),
        ("--validate-top", options.validate_top, 0),
        ("--validate-sessions", options.validate_sessions, 1),
        ("--warmup-frames", options.warmup_frames, 0),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    space = load_space(options.space)
    facts = describe_config(options.config, overrides)
    check_space_keys(space, facts.values, options.config[0])
    if options.sampler == "grid":
        space.grid()  # a continuous range is an error now, not after the first trial
    probe_space(options.config, overrides, space)
    seeds = resolve_seeds(options.seeds, options.sessions, facts.seed)
    folder = options.dir or claim_dir(facts.name, "search")
    folder.mkdir(parents=True, exist_ok=True)
    command = {
        "configs": options.config,
        "overrides": overrides,
        "space": {k: distribution_to_json(d) for k, d in space.distributions.items()},
        "seeds": seeds,
        "objective": options.objective,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    storage = open_storage(options.storage, folder)
    study_name = options.study or facts.name
    log_frequency = int(facts.values.get("metrics.log_frequency") or facts.max_frames // 20)
    warmup = facts.max_frames // 5 if options.warmup_frames is None else options.warmup_frames
    base_seed = facts.seed if facts.seed is not None else seeds[0]
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        load_if_exists=True,
        pruner=make_pruner(options.pruner, facts.max_frames, options.startup_trials, warmup),
    )
    rank = join_study(study, command)
    # Each process that shares the study draws its own random points.
    study.sampler = make_sampler(options.sampler, space, base_seed + rank, options.startup_trials)
    setup = SearchSetup(
        configs=options.config,
        overrides=overrides,
        facts=facts,
        space=space,
        seeds=seeds,
        objective=options.objective,
        budget=options.trials,
        grid=max(1, log_frequency),
        folder=folder,
    )
    workers = options.workers or max(1, usable_cores())
    logger.info(
        f"search {folder}: study {study_name!r}, {options.trials} trials of seeds {seeds}, "
        f"{workers} sessions at once, sampler {options.sampler}, pruner {options.pruner}, "
        f"objective {options.objective}"
    )
    deadline = time.monotonic() + 120
    while (stopping := reap_dead_trials(study)) and time.monotonic() < deadline:
        # A search killed a moment ago: its sessions stop at a checkpoint within seconds (they
        # got SIGTERM when it died); its trials resume from there once they have.
        logger.info(f"waiting for the sessions of trials {stopping} to stop")
        time.sleep(2.0)
    pool = SessionPool(workers, options.progress_every)
    Searcher(study, setup, pool).run()
    line = write_results(study, setup)
    logger.info(line)
    if pool.stop_signal is not None:
        logger.info(f"search stopped; rerun the same command with --dir {folder} to continue it")
        sys.exit(130 if pool.stop_signal == signal.SIGINT else 128 + signal.SIGTERM)
    if options.validate_top:
        with pool.signals():
            lines = validate_top(
                study, setup, pool, options.validate_top, options.validate_sessions
            )
        (folder / "validation.txt").write_text("".join(f"{x}\n" for x in lines))
        if pool.stop_signal is not None:
            sys.exit(130 if pool.stop_signal == signal.SIGINT else 128 + signal.SIGTERM)
        logger.info(line)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if TrialState.COMPLETE not in states and TrialState.FAIL in states:
        sys.exit(1)
