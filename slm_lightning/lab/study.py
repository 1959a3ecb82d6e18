"""The Optuna study a search runs on, shared by every process that searches it: its storage,
sampler and pruner, the exact trial budget across processes, and the trials whose process
died (failed and queued again once).

Used by :mod:`slm_lightning.lab.search`. Nothing here runs a session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from loguru import logger
from optuna.trial import FrozenTrial, TrialState

from slm_lightning.errors import ConfigError
from slm_lightning.lab.space import SearchSpace

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("none", "median", "halving", "hyperband")
COMMAND_ATTR = "slm_lab:command"  # the study's configs, space, seeds, objective (user attr)
WORKER_ATTR = "slm_lab:worker:"  # + host/pid: the processes that joined the study
HEARTBEAT_SECONDS = 60  # database storages: Optuna's heartbeat, a trial stale after 3 missed


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


def superseded(trials: list[FrozenTrial]) -> set[int]:
    """The numbers of the trials that do not count: failed ones queued again (their retry
    counts instead), and ones a process asked for past the budget.

    Args:
        trials: the study's trials.
    """
    out = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return out | {t.number for t in trials if t.user_attrs.get("over_budget")}


def may_ask(trials: list[FrozenTrial], budget: int) -> bool:
    """Whether a new trial may be asked for: fewer than ``budget`` trials count, or a queued
    trial is waiting to be run.

    Args:
        trials: the study's trials.
        budget: ``--trials``.
    """
    gone = superseded(trials)
    counted = [t for t in trials if t.number not in gone]
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
    gone = superseded(trials)
    before = [t for t in trials if t.number < number and t.number not in gone]
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
