"""Our configs and Stable-Baselines3 at identical settings, side by side in one sitting.

Usage (from the repository root):
    uv run python benchmarks/peers.py                          # every case, seed 0
    uv run python benchmarks/peers.py --case sac_pendulum_256 --seeds 0 1 2
    uv run python benchmarks/peers.py --frames 3000            # a quick end-to-end check

Each case trains our side (``slm-lab fit`` of a config, in a subprocess, read back from the
run's ``summary.json``) and then SB3's (``benchmarks/peers_sb3.py`` in SB3's own virtual
environment, read back from its last line), one process at a time, and prints one Markdown
table: frames per second of each side (median over seeds), their ratio (ours / SB3), each
seed's final return moving average (the mean of the last 100 training episodes) and the
frames and seconds to the case's target (median over seeds; the target counts once 100
episodes exist, on both sides). Both sides run torch on one CPU thread: ``--torch_threads``
defaults to 1 in our CLI, ``peers_sb3.py`` calls ``torch.set_num_threads(1)``.

"Identical settings" holds by construction: a case's hyperparameters are one ``settings``
dict, and both our command-line overrides (``ours_overrides``) and SB3's keyword arguments
(``sb3_kwargs``) are derived from it through one table per algorithm (``PARAMS``) that
names, for every setting, our key and SB3's; a setting without a row is an error.

SB3 lives in its own virtual environment, outside the repository (it is not one of our
dependencies). Set it up once, with the torch our ``uv.lock`` resolves (2.12.x):
    PEERS="$HOME/peers"
    uv venv "$PEERS/sb3" --python 3.11
    uv pip install --python "$PEERS/sb3/bin/python" "torch==2.12.*" stable-baselines3 \\
        rl-zoo3 "gymnasium[box2d]"
This script finds that interpreter at ``$PEERS/sb3/bin/python`` (``$PEERS`` defaults to
``~/peers``), or where ``--sb3-python`` says.

This module imports only the standard library: ``peers_sb3.py`` imports its episode
statistics from here, so that both sides count a target the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SB3_SCRIPT = Path(__file__).resolve().parent / "peers_sb3.py"
WINDOW = 100  # episodes in the return moving average, ours (metrics.window) and SB3's


# --- the settings each side receives ------------------------------------------------------------

Values = dict[str, Any]


@dataclass(frozen=True)
class Param:
    """How one shared setting reaches each side.

    Args:
        ours: ``model.init_args`` keys (dotted below init_args) that take the value.
        sb3: SB3 keyword arguments (``policy_kwargs.x`` nests) that take the value; empty
            when SB3 has no knob because the value is SB3's only behaviour (``fixed_sb3``).
        to_ours: turns the setting into our value; None passes it unchanged.
        to_sb3: turns the setting and the frame budget into SB3's keyword arguments; None
            passes the setting unchanged to every name in ``sb3``.
        fixed_sb3: the one value SB3 implements, for settings SB3 cannot change.
    """

    ours: tuple[str, ...]
    sb3: tuple[str, ...] = ()
    to_ours: Callable[[Any], Any] | None = None
    to_sb3: Callable[[Any, int], Values] | None = None
    fixed_sb3: Any = None


def _epsilon_ours(schedule: Sequence[float]) -> Values:
    start, end, end_frame = schedule
    return {"start": start, "end": end, "end_frame": int(end_frame)}


def _epsilon_sb3(schedule: Sequence[float], frames: int) -> Values:
    # SB3 anneals over a fraction of the budget, ours to a frame: this run's fraction gives
    # the same frame. A shortened run keeps the 8000-frame anneal: SB3's get_linear_fn is
    # linear in the fraction and takes one above 1.
    start, end, end_frame = schedule
    return {
        "exploration_initial_eps": start,
        "exploration_final_eps": end,
        "exploration_fraction": end_frame / frames,
    }


# One row per setting; a case may use a setting only if its algorithm has the row.
PARAMS: dict[str, dict[str, Param]] = {
    "sac": {
        "net": Param(("actor.hidden_sizes", "critic.hidden_sizes"), ("policy_kwargs.net_arch",)),
        # peers_sb3.py turns the name into SB3's torch.nn class.
        "activation": Param(
            ("actor.activation", "critic.activation"), ("policy_kwargs.activation_fn",)
        ),
        "lr": Param(("actor_lr", "critic_lr", "alpha_lr"), ("learning_rate",)),
        "batch_size": Param(("batch_size",), ("batch_size",)),
        "buffer_size": Param(("memory_size",), ("buffer_size",)),
        "learning_starts": Param(("learning_starts",), ("learning_starts",)),
        "train_freq": Param(("training_frequency",), ("train_freq",)),
        "gradient_steps": Param(("updates_per_step",), ("gradient_steps",)),
        "tau": Param(("tau",), ("tau",)),
        "gamma": Param(("gamma",), ("gamma",)),
        "initial_alpha": Param(
            ("initial_alpha",), ("ent_coef",), to_sb3=lambda v, _: {"ent_coef": f"auto_{v}"}
        ),
    },
    "dqn": {
        "net": Param(("net.hidden_sizes",), ("policy_kwargs.net_arch",)),
        "activation": Param(("net.activation",), ("policy_kwargs.activation_fn",)),
        "lr": Param(("lr",), ("learning_rate",)),
        "batch_size": Param(("batch_size",), ("batch_size",)),
        "buffer_size": Param(("memory_size",), ("buffer_size",)),
        "learning_starts": Param(("learning_starts",), ("learning_starts",)),
        "train_freq": Param(("training_frequency",), ("train_freq",)),
        "gradient_steps": Param(("updates_per_step",), ("gradient_steps",)),
        "target_update_interval": Param(("target_update_frequency",), ("target_update_interval",)),
        "gamma": Param(("gamma",), ("gamma",)),
        "n_steps": Param(("n_steps",), ("n_steps",)),
        "max_grad_norm": Param(("max_grad_norm",), ("max_grad_norm",)),
        "epsilon": Param(
            ("epsilon",),
            ("exploration_initial_eps", "exploration_final_eps", "exploration_fraction"),
            to_ours=_epsilon_ours,
            to_sb3=_epsilon_sb3,
        ),
        # SB3's DQN always uses smooth L1 (Huber, delta 1) and max-of-target targets.
        "loss": Param(("loss",), fixed_sb3="huber"),
        "double": Param(("double",), fixed_sb3=False),
    },
    "ppo": {},
}


@dataclass(frozen=True)
class Case:
    """One comparison: an algorithm on an env, our config and SB3, at shared settings.

    Args:
        name: what ``--case`` selects.
        algo: ``sac``, ``dqn`` or ``ppo`` (SB3's class, and the row table in ``PARAMS``).
        env_id: the gymnasium id, the same on both sides.
        config: our config file, relative to the repository root.
        frames: the frame budget of both sides (``--frames`` overrides it).
        target: the return moving average counted as reached.
        settings: the hyperparameters both sides get, as ``PARAMS[algo]`` names them.
        sb3_zoo: SB3 takes RL Zoo's tuned hyperparameters for (algo, env) instead of
            ``settings``, and ours the config's own (a comparison of tuned against tuned).
        summary: the settings in a few words, for the table.
    """

    name: str
    algo: str
    env_id: str
    config: str
    frames: int
    target: float
    settings: Values = field(default_factory=dict)
    sb3_zoo: bool = False
    summary: str = ""


def _sac_pendulum(net: list[int]) -> Case:
    return Case(
        name=f"sac_pendulum_{net[0]}",
        algo="sac",
        env_id="Pendulum-v1",
        config="configs/sac_pendulum.yaml",
        frames=30_000,
        target=-200.0,
        settings={
            "net": net,
            "activation": "relu",
            "lr": 1e-3,
            "batch_size": 256,
            "buffer_size": 100_000,
            "learning_starts": 1000,
            "train_freq": 1,
            "gradient_steps": 1,
            "tau": 0.005,
            "gamma": 0.99,
            "initial_alpha": 1.0,
        },
        summary=f"Pendulum-v1, 1 env, nets {net}, 1 update of 256 per frame, lr 1e-3",
    )


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        _sac_pendulum([256, 256]),
        _sac_pendulum([64, 64]),
        Case(
            name="dqn_cartpole_zoo",
            algo="dqn",
            env_id="CartPole-v1",
            config="configs/dqn_cartpole_zoo.yaml",
            frames=50_000,
            target=475.0,
            # rl_zoo3 2.9 hyperparams/dqn.yml, CartPole-v1 (its 50k-frame budget is `frames`).
            settings={
                "net": [256, 256],
                "activation": "relu",
                "lr": 2.3e-3,
                "batch_size": 64,
                "buffer_size": 100_000,
                "learning_starts": 1000,
                "train_freq": 256,
                "gradient_steps": 128,
                "target_update_interval": 10,
                "gamma": 0.99,
                "n_steps": 1,
                "max_grad_norm": 10.0,
                "epsilon": (1.0, 0.04, 8000),  # exploration_fraction 0.16 of 50k frames
                "loss": "huber",
                "double": False,
            },
            summary="CartPole-v1, RL Zoo's DQN: 1 env, net [256, 256], 128 updates of 64 "
            "every 256 frames, lr 2.3e-3",
        ),
        Case(
            name="ppo_cartpole",
            algo="ppo",
            env_id="CartPole-v1",
            config="configs/ppo_cartpole.yaml",
            frames=0,  # each side's own budget: ours 150k, the zoo's 100k
            target=475.0,
            sb3_zoo=True,
            summary="CartPole-v1, each side tuned: configs/ppo_cartpole.yaml vs RL Zoo's PPO",
        ),
    )
}


def _rows(case: Case) -> Iterable[tuple[Param, Any]]:
    table = PARAMS[case.algo]
    for key, value in case.settings.items():
        if key not in table:
            raise KeyError(f"{case.name}: setting {key!r} has no row in PARAMS[{case.algo!r}]")
        yield table[key], value


def _cli_value(value: Any) -> str:
    # JSON is YAML, which jsonargparse parses: lists, mappings, true/false all round-trip.
    return value if isinstance(value, str) else json.dumps(value)


def ours_overrides(case: Case, frames: int | None = None) -> list[str]:
    """The ``slm-lab fit`` arguments that set a case's shared settings on our side.

    Args:
        case: the comparison.
        frames: the frame budget; None keeps the case's (0: the config's own).
    """
    frames = case.frames if frames is None else frames
    args = [f"--metrics.target_return={case.target}"]
    if frames:
        args.append(f"--model.init_args.max_frames={frames}")
    for param, value in _rows(case):
        ours = param.to_ours(value) if param.to_ours else value
        args += [f"--model.init_args.{key}={_cli_value(ours)}" for key in param.ours]
    return args


def sb3_kwargs(case: Case, frames: int | None = None) -> Values:
    """SB3's keyword arguments for a case's shared settings (nested ``policy_kwargs``).

    Args:
        case: the comparison.
        frames: the frame budget (SB3's exploration fraction is relative to it); None keeps
            the case's.
    """
    frames = case.frames if frames is None else frames
    flat: Values = {}
    for param, value in _rows(case):
        if not param.sb3:
            if value != param.fixed_sb3:
                raise ValueError(
                    f"{case.name}: SB3 implements only {param.fixed_sb3!r} for {param.ours[0]}"
                )
            continue
        flat |= param.to_sb3(value, frames) if param.to_sb3 else dict.fromkeys(param.sb3, value)
    kwargs: Values = {}
    for key, value in flat.items():
        outer, _, inner = key.partition(".")
        if inner:
            kwargs.setdefault(outer, {})[inner] = value
        else:
            kwargs[key] = value
    return kwargs


# --- episode statistics, the same on both sides -------------------------------------------------


def episode_stats(
    episodes: Iterable[tuple[int, float, float]], target: float | None, window: int = WINDOW
) -> Values:
    """The final return moving average and when it first reached ``target``.

    As our MetricsTracker counts them: the moving average is over the last ``window``
    finished episodes (fewer while fewer exist), and the target counts only with a full
    window.

    Args:
        episodes: ``(frame, seconds, return)`` of each finished episode in order: the
            frame counter and training seconds when it ended.
        target: the moving average counted as reached; None for none.
        window: episodes in the moving average.
    """
    recent: deque[float] = deque(maxlen=window)
    stats: Values = {"episodes": 0, "frames_to_target": None, "seconds_to_target": None}
    for frame, seconds, ret in episodes:
        recent.append(ret)
        stats["episodes"] += 1
        if (
            target is not None
            and stats["frames_to_target"] is None
            and len(recent) == window
            and sum(recent) / window >= target
        ):
            stats["frames_to_target"], stats["seconds_to_target"] = frame, seconds
    stats["return_ma"] = sum(recent) / len(recent) if recent else None
    return stats


def result_line(fields: Values) -> str:
    """One ``key=value`` line (``never`` for None); values must not contain spaces.

    Args:
        fields: the figures, in the order printed.
    """
    return " ".join(f"{k}={'never' if v is None else v}" for k, v in fields.items())


def parse_result_line(line: str) -> Values:
    """The figures of a ``result_line``: ints, floats, None for ``never``, else strings.

    Args:
        line: the line, e.g. ``peer=sb3 frames=3000 seconds=12.5 return_ma=-1210.3``.
    """
    fields: Values = {}
    for item in line.split():
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"not a key=value field: {item!r} in {line!r}")
        value: Any = raw
        if raw == "never":
            value = None
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        fields[key] = value
    return fields


# --- running both sides -------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One side's run.

    Args:
        frames: frames trained.
        seconds: training seconds (setup and imports excluded on both sides).
        return_ma: final return moving average (None without a finished episode).
        frames_to_target: first frame the moving average reached the target (None: never).
        seconds_to_target: training seconds at that frame (None: never).
    """

    frames: int
    seconds: float
    return_ma: float | None
    frames_to_target: int | None
    seconds_to_target: float | None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @classmethod
    def of(cls, figures: Values) -> Result:
        """From a ``summary.json`` or a parsed result line (extra keys ignored)."""
        return cls(**{name: figures[name] for name in cls.__dataclass_fields__})


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-8:])


def run_ours(case: Case, seed: int, frames: int | None, out: Path) -> Result:
    """Train our side of a case once and read its ``summary.json``.

    Args:
        case: the comparison.
        seed: ``seed_everything``.
        frames: the frame budget; None keeps the case's.
        out: the folder the run writes into.
    """
    cmd = [
        sys.executable,
        "-m",
        "slm_lightning.cli",
        "fit",
        "--config",
        str(ROOT / case.config),
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={out}",
        "--torch_threads=1",
        "--trainer.enable_progress_bar=false",
        *ours_overrides(case, frames),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = out / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        raise RuntimeError(f"ours, {case.name} seed {seed} failed:\n{_tail(proc)}")
    return Result.of(json.loads(summary.read_text()))


def run_sb3(case: Case, seed: int, frames: int | None, python: Path) -> Result:
    """Train SB3's side of a case once in its virtual environment and parse its last line.

    Args:
        case: the comparison.
        seed: SB3's ``seed``.
        frames: the frame budget; None keeps the case's (0: the zoo's).
        python: the interpreter of SB3's virtual environment.
    """
    frames = case.frames if frames is None else frames
    cmd = [str(python), str(SB3_SCRIPT), "--algo", case.algo, "--env", case.env_id]
    cmd += ["--seed", str(seed), "--frames", str(frames), "--target", str(case.target)]
    cmd += ["--zoo"] if case.sb3_zoo else ["--kwargs", json.dumps(sb3_kwargs(case, frames))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("peer=sb3"):
        raise RuntimeError(f"SB3, {case.name} seed {seed} failed:\n{_tail(proc)}")
    return Result.of(parse_result_line(lines[-1]))


# --- the table ----------------------------------------------------------------------------------


def _median(values: Iterable[float | None]) -> float:
    """Median with None (never reached) counted as infinite."""
    return statistics.median(math.inf if v is None else v for v in values)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isinf(value):
        return "never"
    return f"{value:.{digits}f}"


def _to_target(results: Sequence[Result]) -> str:
    frames = _median(r.frames_to_target for r in results)
    seconds = _median(r.seconds_to_target for r in results)
    if math.isinf(frames):
        return "never"
    return f"{_num(frames)} f, {_num(seconds, 1)} s"


def table_row(case: Case, ours: Sequence[Result], sb3: Sequence[Result]) -> str:
    """One Markdown row: fps medians over seeds, their ratio, each seed's final return MA,
    and the median frames and seconds to the target.

    Args:
        case: the comparison.
        ours: our runs, one per seed.
        sb3: SB3's runs, the same seeds in the same order.
    """
    ours_fps = statistics.median(r.fps for r in ours)
    sb3_fps = statistics.median(r.fps for r in sb3)
    cells = [
        case.name,
        case.summary,
        _num(ours_fps),
        _num(sb3_fps),
        f"{ours_fps / sb3_fps:.2f}x",
        " / ".join(_num(r.return_ma, 1) for r in ours),
        " / ".join(_num(r.return_ma, 1) for r in sb3),
        f"{case.target:g}",
        _to_target(ours),
        _to_target(sb3),
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| case | settings | ours fps | SB3 fps | ratio (ours/SB3) | ours return MA | SB3 return MA "
    "| target | ours to target | SB3 to target |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def _usage_error(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--frames", type=int, help="frame budget of every case (both sides)")
    parser.add_argument(
        "--sb3-python",
        type=Path,
        default=Path(os.environ.get("PEERS", Path.home() / "peers")) / "sb3" / "bin" / "python",
        help="the interpreter of SB3's virtual environment (default $PEERS/sb3/bin/python)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "peers",
        help="our runs go to OUT/<date-time>/<case>/seed<N>/ (default runs/peers)",
    )
    args = parser.parse_args(argv)
    if args.frames is not None and args.frames < 1:
        _usage_error(f"--frames must be >= 1, got {args.frames}")
    if not args.sb3_python.is_file():
        _usage_error(
            f"--sb3-python: {args.sb3_python} is not a file; set up SB3's virtual "
            "environment as benchmarks/peers.py's docstring says, or pass its python"
        )
    out = args.out / time.strftime("%Y%m%d-%H%M%S")  # a fresh folder: no stale summary.json
    rows = []
    for name in args.case:
        case = CASES[name]
        ours, sb3 = [], []
        for seed in args.seeds:
            ours.append(run_ours(case, seed, args.frames, out / name / f"seed{seed}"))
            sb3.append(run_sb3(case, seed, args.frames, args.sb3_python))
            for side, r in (("ours", ours[-1]), ("sb3", sb3[-1])):
                figures = vars(r) | {"fps": round(r.fps)}
                print(f"{name} seed={seed} side={side} {result_line(figures)}", flush=True)
        rows.append(table_row(case, ours, sb3))
    print(f"\nseeds {args.seeds}, torch on 1 thread on both sides\n")
    print(TABLE_HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
