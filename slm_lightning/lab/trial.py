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
import dataclasses
import difflib
import json
import logging
import math
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.cli import TRAINER_DEFAULTS, SLMLabCLI
from slm_lightning.envs.workers import usable_cores
from slm_lightning.errors import ConfigError
from slm_lightning.lab.analysis import TrialMetrics, trial_metrics
from slm_lightning.lab.baseline import random_return
from slm_lightning.lab.plots import plot_trial
from slm_lightning.lab.runs import analyse_run, read_run
from slm_lightning.lab.sessions import Session, SessionPool

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
        torch_threads: the config's ``torch_threads``.
        values: every key of the parsed config, dotted (``model.init_args.lr``), with its value.
    """

    name: str
    algorithm: str
    env: str
    env_spec: Any
    seed: int | None
    target: float | None
    max_frames: int
    torch_threads: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def check_overrides(overrides: list[str], trial_options: list[str], prog: str = "trial") -> None:
    """Refuse the fit options a trial sets itself, and a misspelt trial option (which would
    otherwise reach fit as an unknown key).

    Args:
        overrides: the arguments passed on to every session.
        trial_options: the command's own option strings.
        prog: the command, for the messages (``trial``, ``search``).
    """
    for arg in overrides:
        option = arg.split("=", 1)[0]
        close = difflib.get_close_matches(option, trial_options, n=1, cutoff=0.8)
        if option.startswith("--") and "." not in option and close:
            raise ConfigError(f"{prog}: unknown option {option}; did you mean {close[0]}?")
        if option in OWNED_OPTIONS:
            raise ConfigError(
                f"{prog}: {option} is set by the trial for each session; "
                f"use {OWNED_OPTIONS[option]}"
            )
        if option == "fit":
            raise ConfigError(f"{prog}: runs fit itself; pass fit's options without `fit`")


def describe_config(configs: list[str], overrides: list[str]) -> ConfigFacts:
    """Parse and instantiate the config with the overrides as a session's fit would, so bad
    input fails here, once, before any folder is written; and read what the trial needs.

    Args:
        configs: the ``--config`` files.
        overrides: the fit options passed on to every session.
    """

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
        torch_threads=int(cli.config.torch_threads),
        # Namespace.keys() walks nested sections as dotted keys; iterating it does not.
        values={key: cli.config[key] for key in cli.config.keys()},  # noqa: SIM118
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


def claim_dir(name: str, kind: str = "trial") -> Path:
    """A new folder ``runs/<name>/<kind>-<timestamp>`` (``-1``, ``-2`` … if taken).

    Args:
        name: the config's name.
        kind: ``trial``, ``search`` …
    """
    parent = Path("runs") / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y_%m_%d_%H%M%S")
    for suffix in range(1000):
        folder = parent / (f"{kind}-{stamp}-{suffix}" if suffix else f"{kind}-{stamp}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"--dir: no free {kind} folder under {parent}")


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


def prepare_trial(
    folder: Path, command: dict[str, Any], facts: ConfigFacts, label: str = ""
) -> list[Session]:
    """Record what a trial folder runs (``trial_command.json``) and plan its sessions, each
    with its fit command line: a trial's, a search trial's or a validation's.

    Args:
        folder: the trial folder.
        command: its configs, overrides and seeds.
        facts: the config's facts.
        label: prefix of the sessions' names in log lines (``trial-3/``).
    """
    (folder / STATE_FILE).write_text(json.dumps(command, indent=2) + "\n")
    fit = [sys.executable, "-m", "slm_lightning.cli", "fit"]
    fit += [arg for c in command["configs"] for arg in ("--config", c)] + command["overrides"]
    sessions = plan_sessions(folder, command["seeds"])
    for session in sessions:
        session.command = fit
        session.max_frames = facts.max_frames
        session.torch_threads = facts.torch_threads
        session.label = f"{label}session-{session.seed}"
    return sessions


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
) -> dict[str, Any]:
    """Analyse the sessions' run folders; write ``trial.json`` and ``trial.png``; return
    what ``trial.json`` holds (its ``line`` is the trial line; undefined figures are None).

    Args:
        folder: the trial folder.
        sessions: the trial's sessions, as they ended.
        facts: the config's facts.
        command: the trial's configs, overrides and seeds.
    """

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
    return report


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
        folder = claim_dir(facts.name)
    sessions = prepare_trial(folder, command, facts)
    kept = [s.seed for s in sessions if s.status == "finished"]
    if kept:
        logger.info(f"trial {folder}: sessions {kept} finished before; kept")

    workers = options.workers or max(1, min(len(seeds), usable_cores()))
    logger.info(
        f"trial {folder}: {facts.algorithm} on {facts.env}, seeds {seeds}, "
        f"{min(workers, len(seeds))} at once"
    )
    pool = SessionPool(workers, options.progress_every)
    pool.run(sessions)
    line = analyse_trial(folder, sessions, facts, command)["line"]
    logger.info(line)
    crashed = [s for s in sessions if s.status == "crashed"]
    for session in crashed:
        logger.error(f"session-{session.seed} crashed: {session.error}")
    if pool.stop_signal is not None:
        logger.info(f"trial stopped; rerun the same command with --dir {folder} to resume it")
        sys.exit(130 if pool.stop_signal == signal.SIGINT else 128 + signal.SIGTERM)
    if crashed:
        sys.exit(1)
