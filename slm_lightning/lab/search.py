"""``slm-lab search``: hyperparameter search on Optuna, every Optuna trial a multi-seed trial.

Data path: :func:`search_main` parses the search's options, checks the config with the fit
overrides and the space (lab/space.py: every key against the config, two probe values
through the config's own parse) before anything is written → :func:`open_storage` (a
journal file in the search folder by default; any Optuna storage URL) and
``optuna.create_study(load_if_exists=True)``: processes that share the storage and study name
share the study → :class:`Searcher` asks Optuna for trials while the study's budget allows
(:func:`may_ask`, :func:`admitted`), runs each as ``DIR/trial-<n>/`` (lab/trial.py's folder,
sessions and analysis) with its sessions on one :class:`SessionPool` of ``--workers``
processes, reports the sessions' mean return MA on a frame grid as Optuna intermediate values
(:func:`grid_values`) and stops a trial's sessions at a checkpoint when the pruner says so →
:func:`write_results`: ``study.csv``, ``best.yaml``, ``search.png`` and the ``search:`` line
→ ``--validate-top K`` reruns the K best as fresh trials with new seeds.

A trial whose process died (SIGKILL, a lost machine) is failed and queued again once, its
sessions resuming from their checkpoints where its folder is on this machine: on this host
the owner's process id tells (:func:`reap_dead_trials`), across machines Optuna's heartbeat
on a database storage does.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from loguru import logger
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from slm_lightning.envs.workers import usable_cores
from slm_lightning.errors import ConfigError, explain
from slm_lightning.lab.runs import FRAMES, RETURN_MA, read_metrics
from slm_lightning.lab.sessions import Session, SessionPool
from slm_lightning.lab.space import SearchSpace, check_space_keys, load_space, parse_value
from slm_lightning.lab.trial import (
    STATE_FILE,
    ConfigFacts,
    analyse_trial,
    check_overrides,
    describe_config,
    plan_sessions,
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
SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("none", "median", "halving", "hyperband")
# objective name -> the trial.json figure it maximises
OBJECTIVES = {
    "return_ma": "final_return_ma_mean",
    "strength": "strength",
    "iqm": "final_return_ma_iqm",
}
COMMAND_ATTR = "slm_lab:command"  # the study's configs, space, seeds, objective (user attr)
WORKER_ATTR = "slm_lab:worker:"  # + host/pid: the processes that joined the study
HEARTBEAT_SECONDS = 60  # database storages: Optuna's heartbeat, a trial stale after 3 missed
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


def open_storage(url: str | None, folder: Path) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file in the search folder by default (nothing to
    start), any database URL Optuna takes (``sqlite:///…``, ``postgresql://…``), or a path to
    a journal file.

    Args:
        url: ``--storage``, or None.
        folder: the search folder.
    """
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None or "://" not in url:
        path = Path(url) if url else folder / "study.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes on one SQLite file queue for its write lock; the default 5 s can
        # run out while another process writes a trial.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=3 * HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=lambda study, trial: requeue(study, trial, died=True),
            **kwargs,
        )
    except (ImportError, ModuleNotFoundError) as err:
        raise ConfigError(f"--storage {url}: needs a database driver ({err})") from None
    except Exception as err:  # sqlalchemy's errors: unreachable server, bad URL
        raise ConfigError(f"--storage {url}: {type(err).__name__}: {err}".splitlines()[0]) from None


def make_sampler(
    name: str, space: SearchSpace, seed: int, startup: int
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``--sampler``.

    Args:
        name: ``tpe``, ``random``, ``cmaes`` or ``grid``.
        space: the search space (the grid's values).
        seed: the sampler's seed.
        startup: trials drawn at random before TPE or CMA-ES model the results.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar: trials running at once (here or on other machines) count as
            # poor results, so that parallel workers do not sample the same point.
            return optuna.samplers.TPESampler(
                n_startup_trials=startup, seed=seed, multivariate=True, constant_liar=True
            )
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(
                n_startup_trials=startup, seed=seed, warn_independent_sampling=False
            )
        if name == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def make_pruner(name: str, max_frames: int, startup: int, warmup: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner named by ``--pruner``; its steps are frames.

    Args:
        name: ``none``, ``median``, ``halving`` or ``hyperband``.
        max_frames: a session's frame budget.
        startup: trials that complete before the median pruner prunes any.
        warmup: frames before which no trial is pruned.
    """
    # Successive halving's first rung at 1/27 of the budget: rungs at 1/27, 1/9, 1/3 with the
    # default reduction factor 3, as Hyperband's smallest bracket.
    min_resource = max(1, max_frames // 27)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(min_resource, warmup))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(min_resource, warmup), max_resource=max_frames
        )
    raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


# --- the study's budget, shared by every process ------------------------------------------


def _superseded(trials: list[FrozenTrial]) -> set[int]:
    """Trials that do not count: failed ones queued again (their retry counts instead), and
    ones a process asked for past the budget."""
    out = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return out | {t.number for t in trials if t.user_attrs.get("over_budget")}


def may_ask(trials: list[FrozenTrial], budget: int) -> bool:
    """Whether a new trial may be asked for: fewer than ``budget`` trials count, or a queued
    trial is waiting to be run.

    Args:
        trials: the study's trials.
        budget: ``--trials``.
    """
    superseded = _superseded(trials)
    counted = [t for t in trials if t.number not in superseded]
    if any(t.state == TrialState.WAITING for t in counted):
        return True
    return len(counted) < budget


def admitted(trials: list[FrozenTrial], number: int, budget: int) -> bool:
    """Whether trial ``number`` is within the budget: fewer than ``budget`` counted trials
    come before it. Optuna numbers trials in the order the storage creates them, so processes
    that asked at the same moment agree on which of them is one too many (Optuna's
    ``MaxTrialsCallback`` checks after a trial ends, which lets racing processes overshoot).

    Args:
        trials: the study's trials, read after the ask.
        number: the new trial's number.
        budget: ``--trials``.
    """
    superseded = _superseded(trials)
    before = [t for t in trials if t.number < number and t.number not in superseded]
    return len(before) < budget


def tell(study: optuna.Study, trial: optuna.Trial | int, *args: Any, **kwargs: Any) -> None:
    """``study.tell``, minus GridSampler's complaint after the grid's last point: it calls
    ``Study.stop``, which raises outside ``optimize`` once the trial is already stored
    (optuna/optuna#5141); ``Searcher`` stops asking by ``GridSampler.is_exhausted``.

    Args:
        study: the study.
        trial: the trial or its number.
        args: ``values``.
        kwargs: ``state`` …
    """
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as err:
        if not isinstance(study.sampler, optuna.samplers.GridSampler) or "Study.stop" not in str(
            err
        ):
            raise


# --- trials whose process died --------------------------------------------------------------


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_record(pid: int) -> dict[str, Any]:
    """What identifies a process across the study: host, boot, pid and start time.

    Args:
        pid: the process id.
    """
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": pid,
        "start": _start_ticks(pid),
    }


def is_dead(record: dict[str, Any]) -> bool | None:
    """Whether the recorded process is gone: True or False on its own host, None elsewhere
    (another machine's processes cannot be seen from here).

    Args:
        record: a :func:`process_record`.
    """
    if record.get("host") != socket.gethostname():
        return None
    if record.get("boot") and record["boot"] != _boot_id():
        return True  # this machine rebooted since
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _start_ticks(record["pid"])
    return record.get("start") is not None and start is not None and start != record["start"]


def requeue(study: optuna.Study, trial: FrozenTrial, died: bool) -> None:
    """Queue a failed trial's parameters again (Optuna runs a waiting trial first).

    A trial stopped by its user is always queued again; one whose process died is queued once
    (a configuration that kills its process every time is not retried forever).

    Args:
        study: the study.
        trial: the failed trial.
        died: its process died (rather than being stopped).
    """
    deaths = int(trial.user_attrs.get("deaths", 0)) + int(died)
    if deaths > 1:
        logger.warning(f"trial-{trial.number}: its process died again; not queued again")
        return
    attrs = {
        k: v
        for k, v in trial.user_attrs.items()
        if k in ("first_number",) or k.startswith("slm_lab")
    }
    attrs.update(
        retry_of=trial.number, deaths=deaths, first_number=attrs.get("first_number", trial.number)
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=attrs,
        )
    )
    logger.info(f"trial-{trial.number}: queued again ({'its process died' if died else 'stopped'})")


def reap_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and queue again the running trials whose process died on this machine, once their
    sessions are gone too (a retry resumes from their checkpoints); on a database storage,
    also those whose heartbeat stopped (Optuna's ``fail_stale_trials``).

    Returns the trials whose process died but whose sessions are still stopping (the next
    call reaps them).

    Args:
        study: the study.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    stopping = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner")
        if not owner or not is_dead(owner):
            continue
        if not all(is_dead(record) for record in trial.user_attrs.get("sessions", [])):
            stopping.append(trial.number)  # its sessions are stopping at a checkpoint
            continue
        try:
            tell(study, trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first
        logger.warning(f"trial-{trial.number}: its search process (pid {owner['pid']}) died")
        requeue(study, trial, died=True)
    return stopping


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


@dataclass
class SearchSetup:
    """What every trial of the search shares.

    Args:
        configs: the ``--config`` files.
        overrides: the fit options given to the search.
        facts: the config's facts.
        space: the search space.
        seeds: every trial's seeds.
        objective: ``return_ma``, ``strength`` or ``iqm``.
        budget: ``--trials``.
        grid: frames between two intermediate values.
        folder: the search folder.
    """

    configs: list[str]
    overrides: list[str]
    facts: ConfigFacts
    space: SearchSpace
    seeds: list[int]
    objective: str
    budget: int
    grid: int
    folder: Path


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
        fit = [sys.executable, "-m", "slm_lightning.cli", "fit"]
        self.fit = fit + [arg for c in self.setup.configs for arg in ("--config", c)]
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
        (folder / STATE_FILE).write_text(json.dumps(command, indent=2) + "\n")
        sessions = plan_sessions(folder, setup.seeds)
        for session in sessions:
            session.command = self.fit + overrides
            session.max_frames = setup.facts.max_frames
            session.torch_threads = setup.facts.torch_threads
            session.label = f"trial-{trial.number}/session-{session.seed}"
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


# --- results ------------------------------------------------------------------------------


def write_study_csv(study: optuna.Study, path: Path, seeds: list[int]) -> None:
    """``study.csv``: one row per trial of the study (from every process sharing it): number,
    state, objective, the sampled values, each session's final return MA, frames, seconds,
    its folder and what became of it.

    Args:
        study: the study.
        path: the file.
        seeds: the sessions' seeds (a column each).
    """
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("over_budget")]
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    header = ["number", "state", "objective", *keys]
    header += [f"return_ma_seed{seed}" for seed in seeds]
    header += ["frames", "seconds", "retry_of", "folder", "error"]
    rows = []
    for t in trials:
        finals = list(t.user_attrs.get("return_ma", [])) + [None] * len(seeds)
        rows.append(
            [t.number, t.state.name, t.value]
            + [t.params.get(k) for k in keys]
            + finals[: len(seeds)]
            + [t.user_attrs.get(k) for k in ("frames", "seconds", "retry_of", "folder", "error")]
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes may share DIR
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    tmp.replace(path)  # a reader never sees half a table


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[leaf] = value


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def override_pairs(overrides: list[str]) -> list[tuple[str, str]]:
    """``--key=value`` and ``--key value`` command-line options as (``key``, ``value``).

    Args:
        overrides: fit options.
    """
    pairs, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if "=" in arg:
            key, text = arg.split("=", 1)
            i += 1
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            key, text = arg, overrides[i + 1]
            i += 2
        else:
            raise ConfigError(f"{arg}: an option without a value")
        pairs.append((key.removeprefix("--"), text))
    return pairs


def best_config(configs: list[str], overrides: list[str], values: dict[str, Any]) -> dict:
    """The search's config with its overrides and the best values applied, as one YAML tree.

    Args:
        configs: the ``--config`` files (later ones override earlier ones, as in fit).
        overrides: the fit options given to the search.
        values: the best trial's values by dotted key.
    """
    tree: dict[str, Any] = {}
    for config in configs:
        _merge(tree, yaml.safe_load(Path(config).read_text()) or {})
    for key, text in override_pairs(overrides):
        _set_dotted(tree, key, parse_value(text))
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return tree


def write_best_yaml(study: optuna.Study, setup: SearchSetup, path: Path) -> FrozenTrial | None:
    """``best.yaml``: the config with the best trial's values, ready for ``slm-lab fit`` or
    ``slm-lab trial``; checked to parse to what the best trial's sessions ran.

    Args:
        study: the study.
        setup: the search's setup.
        path: the file.
    """
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    values = setup.space.values(best.params)
    tree = best_config(setup.configs, setup.overrides, values)
    header = [
        f"# The best of the search in {setup.folder} (study {study.study_name}): trial "
        f"{best.number}, {setup.objective} {best.value:.6g} over seeds {setup.seeds}.",
        f"# Made from {', '.join(setup.configs)}"
        + (f" with {' '.join(setup.overrides)}" if setup.overrides else "")
        + "; searched: "
        + ", ".join(f"{k}={v}" for k, v in values.items()),
        "# The best of many noisy trials is optimistic: `slm-lab trial --config` this file "
        "with new --seeds to see what it is worth.",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.yaml")
    tmp.write_text(text)
    ran = describe_config(setup.configs, setup.overrides + setup.space.overrides(best.params))
    written = describe_config([str(tmp)], [])
    differ = [
        k
        for k, v in ran.values.items()
        if k != "config" and v != written.values.get(k) and "slm-lab-trial-check-" not in str(v)
    ]  # (paths under the scratch folder of describe_config differ by construction)
    if differ:
        logger.error(
            f"best.yaml: not written; it would not set {', '.join(differ)} as trial "
            f"{best.number} ran them (left in {tmp})"
        )
        return best
    tmp.replace(path)
    return best


def plot_search(study: optuna.Study, path: Path) -> bool:
    """``search.png``: Optuna's optimisation history beside its parameter importances (where
    enough trials completed to compute them). False when no trial completed.

    Args:
        study: the study.
        path: the file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return False
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # PED-ANOVA on a handful of trials: "importances will be equal", as drawn.
        warnings.simplefilter("ignore", UserWarning)
        panels = [lambda: ovm.plot_optimization_history(study)]
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
            # PED-ANOVA needs no scikit-learn (fANOVA, Optuna's default, does).
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            panels.append(lambda: ovm.plot_param_importances(study, evaluator=evaluator))
        for draw in panels:
            try:
                axes = draw()
            except (ValueError, RuntimeError, ImportError) as err:  # e.g. a constant objective
                logger.warning(f"search.png: {err}")
                continue
            figure = axes.figure
            figure.set_size_inches(7, 5)
            buffer = io.BytesIO()
            # bbox "tight": Optuna puts the history's legend outside the axes.
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            buffer.seek(0)
            images.append(plt.imread(buffer, format="png"))
    height = max(image.shape[0] for image in images)
    padded = [
        np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=1.0)
        for im in images
    ]
    plt.imsave(path, np.hstack(padded))
    return True


def search_line(study: optuna.Study, best: FrozenTrial | None, space: SearchSpace) -> str:
    """``search: trials=30 complete=22 pruned=7 failed=1 best=231.4 (trial 12) params={…}``.

    Args:
        study: the study.
        best: its best trial, or None.
        space: the search space (to show the values as configured).
    """
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("over_budget")]
    trials = [t for t in trials if t.number not in _superseded(trials)]
    count = {state: sum(t.state == state for t in trials) for state in TrialState}
    line = (
        f"search: trials={len(trials)} complete={count[TrialState.COMPLETE]} "
        f"pruned={count[TrialState.PRUNED]} failed={count[TrialState.FAIL]}"
    )
    if count[TrialState.RUNNING]:
        line += f" running={count[TrialState.RUNNING]}"
    if count[TrialState.WAITING]:
        line += f" queued={count[TrialState.WAITING]}"
    if best is None:
        return line + " best=None"
    params = ", ".join(
        f"{k.removeprefix('model.init_args.')}: {v}" for k, v in space.values(best.params).items()
    )
    return line + f" best={best.value:.4g} (trial {best.number}) params={{{params}}}"


def write_results(study: optuna.Study, setup: SearchSetup) -> str:
    """Write ``study.csv``, ``best.yaml`` and ``search.png``; return the search line.

    Args:
        study: the study.
        setup: the search's setup.
    """
    write_study_csv(study, setup.folder / "study.csv", setup.seeds)
    best = write_best_yaml(study, setup, setup.folder / "best.yaml")
    plot_search(study, setup.folder / "search.png")
    return search_line(study, best, setup.space)


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
    fit = [sys.executable, "-m", "slm_lightning.cli", "fit"]
    fit += [arg for c in setup.configs for arg in ("--config", c)]
    lines = []
    for trial in best:
        folder = setup.folder / f"validate-{trial.number}"
        folder.mkdir(parents=True, exist_ok=True)
        overrides = setup.overrides + setup.space.overrides(trial.params)
        command = {"configs": setup.configs, "overrides": overrides, "seeds": seeds}
        (folder / STATE_FILE).write_text(json.dumps(command, indent=2) + "\n")
        planned = plan_sessions(folder, seeds)
        for session in planned:
            session.command = fit + overrides
            session.max_frames = setup.facts.max_frames
            session.torch_threads = setup.facts.torch_threads
            session.label = f"validate-{trial.number}/session-{session.seed}"
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


def claim_search_dir(name: str) -> Path:
    """A new folder ``runs/<name>/search-<timestamp>`` (``-1``, ``-2`` … if taken)."""
    parent = Path("runs") / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y_%m_%d_%H%M%S")
    for suffix in range(1000):
        folder = parent / (f"search-{stamp}-{suffix}" if suffix else f"search-{stamp}")
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            return folder
    raise ConfigError(f"--dir: no free search folder under {parent}")


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


def join_study(study: optuna.Study, command: dict[str, Any]) -> int:
    """Record this process as a worker of the study, check that the study searches what this
    process would (processes sharing a storage must run the same command), and return this
    process's rank among the workers (its sampler's seed offset).

    Args:
        study: the study.
        command: configs, overrides, space, seeds and objective of this process.
    """
    before = study.user_attrs.get(COMMAND_ATTR)
    if before is None:
        study.set_user_attr(COMMAND_ATTR, command)
    elif before != command:
        differ = [k for k in command if before.get(k) != command[k]]
        raise ConfigError(
            f"--study {study.study_name}: the study searches other {', '.join(differ)} "
            f"({ {k: before.get(k) for k in differ} }); pass another --study or --storage"
        )
    key = f"{WORKER_ATTR}{socket.gethostname()}/{os.getpid()}"
    study.set_user_attr(key, time.time())
    workers = sorted((v, k) for k, v in study.user_attrs.items() if k.startswith(WORKER_ATTR))
    return [k for _, k in workers].index(key)


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
    folder = options.dir or claim_search_dir(facts.name)
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
