"""``slm-lab trial``: several sessions (seeds) of one config, run as processes and analysed
together.

Data path: :func:`trial_main` parses the trial's own options and checks the config with the
fit overrides in-process (:func:`describe_config`, bad input is one line before anything is
written) → :func:`plan_sessions` (one ``DIR/session-<seed>/`` run folder each; a finished one
is kept) → :class:`SessionPool` runs ``slm-lab fit … --ckpt_path last`` for each, at most
``--workers`` at once, each pinned to its share of the cores and GPUs, and shows their
progress → :func:`analyse_trial` reads the run folders back (lab/runs.py), computes SLM Lab's
metrics (lab/analysis.py) against the env's random baseline (lab/baseline.py), and writes
``trial.json``, ``trial.png`` and the ``trial:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from slm_lightning.errors import ConfigError
from slm_lightning.lab.analysis import TrialMetrics, trial_metrics
from slm_lightning.lab.runs import FRAMES, RETURN_MA, analyse_run, read_metrics, read_run
from slm_lightning.run_folder import RUN_STAMP_VAR

# Fit options the trial sets for every session itself.
OWNED_OPTIONS = {
    "--trainer.default_root_dir": "--dir",
    "--ckpt_path": "--dir (a trial resumes its sessions from their last.ckpt)",
}
# The trial's own options (build_parser); every other option is passed on to fit.
TRIAL_OPTIONS = ["--config", "--sessions", "--seeds", "--workers", "--dir", "--progress-every"]
STATE_FILE = "trial_command.json"  # what the trial in a folder runs, to resume it alike


@dataclass
class ConfigFacts:
    """What the trial needs to know about the config, read off its instantiated classes.

    Args:
        name: the first config file's stem (``ppo_cartpole``).
        algorithm: the algorithm's class name.
        env: the env id.
        env_spec: the env spec (for the random baseline).
        seed: the config's ``seed_everything`` with the overrides applied.
        target: the return MA that counts as solved, or None.
        max_frames: the frame budget of one session.
    """

    name: str
    algorithm: str
    env: str
    env_spec: Any
    seed: int | None
    target: float | None
    max_frames: int


@dataclass
class Session:
    """One session of a trial and, once it ran, how it ended.

    Args:
        seed: its ``seed_everything``.
        folder: its run folder ``DIR/session-<seed>``.
        status: ``pending``, ``running``, ``finished``, ``stopped`` or ``crashed``.
        exit_code: the fit process's exit status (None until it ends or if kept from before).
        error: the last error line of a crashed session's log.
    """

    seed: int
    folder: Path
    status: str = "pending"
    exit_code: int | None = None
    error: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    signalled: bool = False


def build_parser() -> argparse.ArgumentParser:
    """The trial's own options; everything else is passed on to every session's ``fit``."""
    parser = argparse.ArgumentParser(
        prog="slm-lab trial",
        description="Run several sessions (seeds) of one config and analyse them together. "
        "Any other option (--model.init_args.lr=0.001 …) is passed to every session's fit.",
        allow_abbrev=False,
        exit_on_error=False,
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions (seeds); default 4")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="the sessions' seeds (default: seed_everything + 0..N-1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="sessions running at once (default: as many as the cores allow)",
    )
    parser.add_argument(
        "--dir", type=Path, help="trial folder (default runs/<config>/trial-<timestamp>)"
    )
    parser.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between two progress lines per running session (0: none)",
    )
    return parser


def check_overrides(overrides: list[str], trial_options: list[str]) -> None:
    """Refuse the fit options a trial sets itself, and a misspelt trial option (which would
    otherwise reach fit as an unknown key).

    Args:
        overrides: the arguments passed on to every session.
        trial_options: the trial's own option strings.
    """
    for arg in overrides:
        option = arg.split("=", 1)[0]
        close = difflib.get_close_matches(option, trial_options, n=1, cutoff=0.8)
        if option.startswith("--") and "." not in option and close:
            raise ConfigError(f"trial: unknown option {option}; did you mean {close[0]}?")
        if option in OWNED_OPTIONS:
            raise ConfigError(
                f"trial: {option} is set by the trial for each session; use {OWNED_OPTIONS[option]}"
            )
        if option == "fit":
            raise ConfigError("trial: runs fit itself; pass fit's options without `fit`")


def describe_config(configs: list[str], overrides: list[str]) -> ConfigFacts:
    """Parse and instantiate the config with the overrides as a session's fit would, so bad
    input fails here, once, before any folder is written; and read what the trial needs.

    Args:
        configs: the ``--config`` files.
        overrides: the fit options passed on to every session.
    """
    from slm_lightning.algorithms.base import RLAlgorithm
    from slm_lightning.cli import TRAINER_DEFAULTS, SLMLabCLI

    scratch = tempfile.mkdtemp(prefix="slm-lab-trial-check-")
    args = [arg for c in configs for arg in ("--config", c)] + overrides
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    try:
        # The sessions print what Lightning says about the machine and the seed; the check
        # here would only repeat it before the trial starts.
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            cli = SLMLabCLI(
                RLAlgorithm,
                subclass_mode_model=True,
                trainer_defaults=TRAINER_DEFAULTS,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
                args=[*args, f"--trainer.default_root_dir={scratch}"],
                run=False,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    model = cli.model
    seed = cli.config.get("seed_everything")
    target = cli.config.metrics.get("target_return")
    if target is None:
        target = model.env_spec.reward_threshold()
    return ConfigFacts(
        name=Path(configs[0]).stem,
        algorithm=type(model).__name__,
        env=model.env_spec.env_id,
        env_spec=model.env_spec,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        target=None if target is None else float(target),
        max_frames=int(model.max_frames),
    )


def resolve_seeds(seeds: list[int] | None, sessions: int, base: int | None) -> list[int]:
    """The sessions' seeds: ``--seeds`` as given, else ``base + 0..sessions-1``.

    Args:
        seeds: ``--seeds``, or None.
        sessions: ``--sessions``.
        base: the config's integer ``seed_everything``, or None.
    """
    if seeds is not None:
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds must be distinct, got {seeds}")
        return list(seeds)
    if sessions < 1:
        raise ConfigError(f"--sessions must be >= 1, got {sessions}")
    if base is None:
        raise ConfigError(
            "seed_everything: a trial seeds its sessions from an integer seed_everything; "
            "set one in the config or pass --seeds"
        )
    return [base + i for i in range(sessions)]


def claim_trial_dir(name: str) -> Path:
    """A new folder ``runs/<name>/trial-<timestamp>`` (``-1``, ``-2`` … if taken)."""
    parent = Path("runs") / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y_%m_%d_%H%M%S")
    for suffix in range(1000):
        folder = parent / (f"trial-{stamp}-{suffix}" if suffix else f"trial-{stamp}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"--dir: no free trial folder under {parent}")


def check_same_trial(folder: Path, command: dict[str, Any]) -> None:
    """A trial folder is resumed only by the trial that made it: the same configs, overrides
    and seeds. Anything else would mix sessions of different experiments.

    Args:
        folder: the trial folder.
        command: this trial's configs, overrides and seeds.
    """
    path = folder / STATE_FILE
    if not path.is_file():
        if any(folder.iterdir()):
            raise ConfigError(
                f"--dir {folder}: is not empty and holds no trial ({STATE_FILE}); pass a new "
                "or empty folder, or the folder of the trial to resume"
            )
        return
    before = json.loads(path.read_text())
    for key in ("configs", "overrides", "seeds"):
        if before.get(key) != command[key]:
            raise ConfigError(
                f"--dir {folder}: holds a trial with {key}={before.get(key)}, not "
                f"{command[key]}; rerun it with the same options to resume it, or pass another --dir"
            )


def plan_sessions(folder: Path, seeds: list[int]) -> list[Session]:
    """The trial's sessions; one whose summary says it finished is kept as it is.

    Args:
        folder: the trial folder.
        seeds: the sessions' seeds.
    """
    sessions = []
    for seed in seeds:
        session = Session(seed=seed, folder=folder / f"session-{seed}")
        summary = session.folder / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "finished":
            session.status = "finished"
        sessions.append(session)
    return sessions


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (none on a CPU
    machine)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def core_slots(workers: int) -> list[list[int]]:
    """Split this process's cores into ``workers`` disjoint shares, one per running session
    (every share gets the whole machine where the OS cannot pin processes)."""
    if not hasattr(os, "sched_getaffinity"):
        return [[] for _ in range(workers)]
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // workers)
    return [cores[(i * per) % len(cores) :][:per] for i in range(workers)]


def last_error_line(log: Path) -> str:
    """The line of a session's log that says why it failed: the last line naming an error,
    else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if "Error" in line or "ERROR" in line or "error:" in line:
            return line
    return lines[-1] if lines else "no output"


class SessionPool:
    """Runs the sessions' fit processes, at most ``workers`` at once.

    Each session is ``python -m slm_lightning.cli fit --config … <overrides>
    --seed_everything <seed> --trainer.default_root_dir <folder> --ckpt_path last`` (a fresh
    start where the folder has no checkpoint yet, else a resume), with its output in
    ``<folder>/session.log``. A session is pinned to its own share of the cores
    (``sched_setaffinity``; the env factory sizes its worker processes to it) and, on a
    machine with GPUs, sees one GPU (``CUDA_VISIBLE_DEVICES``, round-robin). SIGTERM or Ctrl-C
    to the trial is passed to every running session, which stops at a checkpoint; no new
    session starts; a second Ctrl-C kills them.

    Args:
        sessions: the trial's sessions (finished ones are not run).
        command: the fit command line before the per-session options.
        workers: sessions at once.
        progress_every: seconds between progress lines (0: none).
        max_frames: a session's frame budget (shown in the progress).
    """

    def __init__(
        self,
        sessions: list[Session],
        command: list[str],
        workers: int,
        progress_every: float,
        max_frames: int,
    ) -> None:
        self.sessions = sessions
        self.command = command
        self.workers = workers
        self.progress_every = progress_every
        self.max_frames = max_frames
        self.stop_signal: int | None = None
        self.kills = 0
        self.slots = core_slots(workers)
        self.gpus = visible_gpus()
        self.started = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            self.kills += 1  # a second Ctrl-C: stop now
        self.stop_signal = signum

    def run(self) -> None:
        """Run every pending session to its end, or until the trial is stopped."""
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        free = list(range(self.workers))
        running: dict[int, Session] = {}  # slot -> session
        next_progress = time.monotonic() + self.progress_every
        try:
            pending = [s for s in self.sessions if s.status != "finished"]
            while pending or running:
                if self.stop_signal is not None:
                    self._stop(running.values())
                    pending = []
                while pending and free and self.stop_signal is None:
                    slot = free.pop(0)
                    running[slot] = self._start(pending.pop(0), slot)
                for slot, session in list(running.items()):
                    if session.process is not None and session.process.poll() is not None:
                        self._finish(session)
                        del running[slot]
                        free.append(slot)
                if self.progress_every > 0 and time.monotonic() >= next_progress:
                    for session in running.values():
                        self._show_progress(session)
                    next_progress = time.monotonic() + self.progress_every
                time.sleep(0.2)
        finally:
            for session in running.values():  # the trial itself failed: leave no orphan
                if session.process is not None and session.process.poll() is None:
                    session.process.kill()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _start(self, session: Session, slot: int) -> Session:
        session.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != RUN_STAMP_VAR}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[self.started % len(self.gpus)]
        self.started += 1
        args = [
            *self.command,
            f"--seed_everything={session.seed}",
            f"--trainer.default_root_dir={session.folder}",
            "--ckpt_path=last",
        ]
        log = (session.folder / "session.log").open("a")
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
        session.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # Its own process group: a terminal's Ctrl-C reaches the trial alone, which passes
            # it on once to every session (a session signalled twice would stop at once).
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        if self.slots[slot]:
            # Pinned from here, before the child imports torch or forks env workers (which
            # inherit it): its threads and workers stay on this share of the cores.
            with contextlib.suppress(OSError):  # already gone: _finish reports how it ended
                os.sched_setaffinity(session.process.pid, self.slots[slot])
        session.status = "running"
        cores = f" on cores {self.slots[slot]}" if self.slots[slot] else ""
        gpu = f" GPU {env['CUDA_VISIBLE_DEVICES']}" if self.gpus else ""
        logger.info(
            f"session-{session.seed}: started{cores}{gpu} (log: {session.folder}/session.log)"
        )
        return session

    def _stop(self, running: Any) -> None:
        for session in running:
            process = session.process
            if process is None or process.poll() is not None:
                continue
            if self.kills:
                process.kill()
            elif not session.signalled:
                process.send_signal(self.stop_signal or signal.SIGTERM)
                session.signalled = True

    def _finish(self, session: Session) -> None:
        assert session.process is not None
        session.exit_code = session.process.returncode
        summary_path = session.folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if session.exit_code == 0:
            session.status = "finished"
        elif self.stop_signal is not None and summary.get("status") != "crashed":
            session.status = "stopped"
        else:
            session.status = "crashed"
            session.error = last_error_line(session.folder / "session.log")
        line = f"session-{session.seed}: {session.status} (exit {session.exit_code})"
        if session.error:
            line += f": {session.error}"
        (logger.error if session.status == "crashed" else logger.info)(line)

    def _show_progress(self, session: Session) -> None:
        columns = read_metrics(session.folder / "metrics.csv")
        if FRAMES not in columns:
            logger.info(f"session-{session.seed}: starting")
            return
        frames = int(columns[FRAMES][-1])
        fps = columns.get("rollout/fps", [math.nan])[-1]
        ma = columns.get(RETURN_MA, [math.nan])[-1]
        logger.info(
            f"session-{session.seed}: frames={frames}/{self.max_frames} fps={fps:.0f} "
            f"return_ma={ma:.4g}"
        )


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined figures are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "None"
    return f"{value:.{digits}g}"


def trial_line(metrics: TrialMetrics) -> str:
    """``trial: sessions=4 solved=4/4 return_ma=498.1±1.2 iqm=499.0 [497.8, 500.0] …``."""
    m = metrics
    frames = None if math.isnan(m.frames_to_target_median) else int(m.frames_to_target_median)
    return (
        f"trial: sessions={m.sessions} solved={m.solved}/{m.sessions} "
        f"return_ma={m.final_return_ma_mean:.4g}±{_fmt(m.final_return_ma_std, 3)} "
        f"iqm={m.final_return_ma_iqm:.4g} [{m.iqm_ci_low:.4g}, {m.iqm_ci_high:.4g}] "
        f"frames_to_target={frames} seconds_to_target={_fmt(m.seconds_to_target_median, 3)} "
        f"strength={_fmt(m.strength)} sample_efficiency={_fmt(m.sample_efficiency)} "
        f"stability={_fmt(m.stability, 3)} consistency={_fmt(m.consistency, 3)}"
    )


def analyse_trial(
    folder: Path, sessions: list[Session], facts: ConfigFacts, command: dict[str, Any]
) -> str:
    """Analyse the sessions' run folders; write ``trial.json`` and ``trial.png``; return the
    trial line.

    Args:
        folder: the trial folder.
        sessions: the trial's sessions, as they ended.
        facts: the config's facts.
        command: the trial's configs, overrides and seeds.
    """
    from slm_lightning.lab.baseline import random_return
    from slm_lightning.lab.plots import plot_trial

    baseline = random_return(facts.env_spec)
    records = [read_run(s.folder) for s in sessions]
    per_session = [analyse_run(r, baseline, facts.target) for r in records]
    metrics = trial_metrics(per_session)
    line = trial_line(metrics)
    report = {
        "config": command["configs"][0],
        "configs": command["configs"],
        "name": facts.name,
        "algorithm": facts.algorithm,
        "env": facts.env,
        "target_return": facts.target,
        "random_return": baseline,
        "overrides": command["overrides"],
        "seeds": command["seeds"],
        "sessions": [
            {
                "seed": s.seed,
                "folder": s.folder.name,
                "status": s.status,
                "exit_code": s.exit_code,
                "error": s.error,
                "metrics": {k: _finite(v) for k, v in m.scalars().items()},
                "summary": r.summary,
            }
            for s, m, r in zip(sessions, per_session, records, strict=True)
        ],
        "trial": {k: _finite(v) for k, v in dataclasses.asdict(metrics).items()},
        "line": line,
    }
    (folder / "trial.json").write_text(json.dumps(report, indent=2) + "\n")
    figures = textwrap.fill(line.removeprefix("trial: "), width=110)
    title = f"{facts.algorithm} {facts.env} ({facts.name})\n{figures}"
    plot_trial(folder / "trial.png", records, target=facts.target, title=title)
    return line


def trial_main(argv: list[str]) -> None:
    """``slm-lab trial --config C [--sessions N | --seeds S…] [--workers W] [--dir DIR]
    [fit overrides…]``.

    Exits 0 when every session finished, 1 when one crashed (the others still run; each
    failure is reported with its last error line), and 143 / 130 when SIGTERM / Ctrl-C
    stopped the trial (its sessions stopped at a checkpoint; the same command resumes it).

    Args:
        argv: the arguments after ``slm-lab trial``.
    """
    try:
        options, overrides = build_parser().parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"trial: {err}") from None
    check_overrides(overrides, TRIAL_OPTIONS)
    if options.workers is not None and options.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {options.workers}")
    facts = describe_config(options.config, overrides)
    seeds = resolve_seeds(options.seeds, options.sessions, facts.seed)
    command = {"configs": options.config, "overrides": overrides, "seeds": seeds}
    if options.dir is not None:
        folder = options.dir
        if folder.exists():
            check_same_trial(folder, command)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = claim_trial_dir(facts.name)
    (folder / STATE_FILE).write_text(json.dumps(command, indent=2) + "\n")
    sessions = plan_sessions(folder, seeds)
    kept = [s.seed for s in sessions if s.status == "finished"]
    if kept:
        logger.info(f"trial {folder}: sessions {kept} finished before; kept")
    from slm_lightning.envs.factory import usable_cores

    workers = options.workers or max(1, min(len(seeds), usable_cores()))
    logger.info(
        f"trial {folder}: {facts.algorithm} on {facts.env}, seeds {seeds}, "
        f"{min(workers, len(seeds))} at once"
    )
    fit = [sys.executable, "-m", "slm_lightning.cli", "fit"]
    fit += [arg for c in options.config for arg in ("--config", c)] + overrides
    pool = SessionPool(sessions, fit, workers, options.progress_every, facts.max_frames)
    pool.run()
    line = analyse_trial(folder, sessions, facts, command)
    logger.info(line)
    crashed = [s for s in sessions if s.status == "crashed"]
    for session in crashed:
        logger.error(f"session-{session.seed} crashed: {session.error}")
    if pool.stop_signal is not None:
        logger.info(f"trial stopped; rerun the same command with --dir {folder} to resume it")
        sys.exit(130 if pool.stop_signal == signal.SIGINT else 128 + signal.SIGTERM)
    if crashed:
        sys.exit(1)
