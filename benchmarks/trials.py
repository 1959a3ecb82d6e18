"""Learning benchmarks as trials: 4 sessions (seeds 0-3) of each classic-control and Box2D
config, side by side with upstream SLM Lab's published 4-session scores.

Usage:
    uv run python benchmarks/trials.py [--out DIR] [--lanes N] [--deadline SECONDS]
        [--only CONFIG ...] [--sessions 4]

Every trial is ``slm-lab trial --config configs/<name>.yaml --sessions 4`` in its own
process. Trials run in ``--lanes`` lanes at once (one after another within a lane), each lane
pinned to its own cores, at most one session per core: a machine with 16 cores runs 4 trials
of 4 sessions at a time, one with 2 cores one trial, 2 sessions at a time. The configs are dealt to the lanes in the order given
(``--only`` sets it), each onto the lane expected to be free first. At ``--deadline``
seconds every running trial gets SIGTERM (its sessions stop at a checkpoint and its
trial.json still says what they reached) and the trials not started are listed as not run. The script prints one Markdown table from the
trials' ``trial.json`` files and writes ``compare.md`` / ``compare.png`` for CartPole-v1 and
LunarLander-v3 with ``slm-lab compare``.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slm_lightning.lab.runs import read_run

ROOT = Path(__file__).resolve().parent.parent

# (config, expected seconds of one session on one core here), longest first within a family.
CONFIGS: list[tuple[str, float]] = [
    ("ppo_cartpole", 8),
    ("ppo_shared_cartpole", 14),
    ("a2c_cartpole", 10),
    ("a2c_nstep_cartpole", 10),
    ("reinforce_cartpole", 10),
    ("dqn_cartpole", 40),
    ("ddqn_per_cartpole", 45),
    ("dueling_dqn_cartpole", 130),
    ("sarsa_cartpole", 35),
    ("sac_cartpole", 210),
    ("random_cartpole", 3),
    ("ppo_acrobot", 35),
    ("ppo_pendulum", 55),
    ("a2c_pendulum", 65),
    ("sac_pendulum", 150),
    ("crossq_pendulum", 250),
    ("ppo_lunar", 280),
    ("ddqn_per_lunar", 380),
    ("ppo_lunar_continuous", 300),
    ("sac_lunar_continuous", 900),
    ("ppo_bipedalwalker", 330),
    ("ppo_mlp_cartpole_pomdp", 40),
    ("ppo_rnn_cartpole_pomdp", 120),
]

# Upstream SLM Lab's published 4-session mean of the final return MA and the frame budget it
# was reached in (kengz/SLM-Lab docs/BENCHMARKS.md, the "arc" specs of 2026-02).
UPSTREAM: dict[str, tuple[float, int]] = {
    "ppo_cartpole": (498.94, 200_000),
    "a2c_cartpole": (496.68, 200_000),
    "reinforce_cartpole": (483.31, 200_000),
    "ddqn_per_cartpole": (451.51, 200_000),
    "dqn_cartpole": (239.94, 200_000),
    "sac_cartpole": (406.09, 200_000),
    "sarsa_cartpole": (430.95, 200_000),
    "ppo_acrobot": (-81.28, 300_000),
    "sac_pendulum": (-150.97, 300_000),
    "ppo_pendulum": (-174.87, 300_000),
    "a2c_pendulum": (-820.74, 300_000),
    "crossq_pendulum": (-145.66, 300_000),
    "ddqn_per_lunar": (265.90, 300_000),
    "ppo_lunar": (183.30, 300_000),
    "ppo_lunar_continuous": (132.58, 300_000),
    "sac_lunar_continuous": (125.00, 300_000),
}


def upstream(name: str) -> str:
    if name not in UPSTREAM:
        return "–"
    score, frames = UPSTREAM[name]
    return f"{score:.1f} ({frames // 1000}k frames)"


COMPARE = {
    "cartpole": [
        "ppo_cartpole",
        "a2c_cartpole",
        "reinforce_cartpole",
        "dqn_cartpole",
        "ddqn_per_cartpole",
        "dueling_dqn_cartpole",
        "sarsa_cartpole",
        "sac_cartpole",
        "random_cartpole",
    ],
    "lunar": ["ppo_lunar", "ddqn_per_lunar"],
}


def deal(configs: list[tuple[str, float]], lanes: int) -> list[list[str]]:
    """Configs into lanes in the order given (priority: what a deadline cuts comes last), each
    onto the lane expected to be free first."""
    loads = [0.0] * lanes
    out: list[list[str]] = [[] for _ in range(lanes)]
    for name, seconds in configs:
        lane = loads.index(min(loads))
        out[lane].append(name)
        loads[lane] += seconds + 6  # a session process starts in a few seconds
    return out


def at_upstream_frames(name: str, folder: Path, report: dict) -> str:
    """Our sessions' mean return MA at upstream's frame budget, where ours ran longer (read off
    the metrics rows, linearly interpolated), marked below or above upstream's score."""
    if name not in UPSTREAM:
        return ""
    score, frames = UPSTREAM[name]
    records = [read_run(folder / s["folder"]) for s in report["sessions"]]
    if any(r.frames.size == 0 or r.frames[-1] <= frames for r in records):
        ours = report["trial"]["final_return_ma_mean"]  # ours ran no longer: its final MA
        if ours is None:
            return ""
    else:
        ours = float(np.mean([np.interp(frames, r.frames, r.return_ma) for r in records]))
    return f"{ours:.1f} ({'below' if ours < score else 'above'})"


def fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")))
    parser.add_argument("--lanes", type=int, default=None, help="default: cores // 4")
    parser.add_argument("--deadline", type=float, default=3600.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument(
        "--report", action="store_true", help="run nothing: the table of the trials in --out"
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    lanes = args.lanes or max(1, len(cores) // args.sessions)
    per_lane = max(1, len(cores) // lanes)  # cores of one lane; a session runs on one
    workers = min(args.sessions, per_lane)
    expected = dict(CONFIGS)
    chosen = [(n, expected[n]) for n in args.only] if args.only else CONFIGS
    plan = [] if args.report else deal(chosen, lanes)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(cores)} cores, {lanes} lanes of {workers} sessions at once: {plan}", flush=True)

    start = time.monotonic()
    running: dict[int, tuple[str, subprocess.Popen]] = {}
    done: dict[str, float] = {}
    stopped = False
    while (any(plan) and not stopped) or running:
        for lane in range(lanes):
            if lane in running and running[lane][1].poll() is not None:
                name, _ = running.pop(lane)
                done[name] = time.monotonic() - start
                print(f"{done[name]:7.1f} s  {name} done", flush=True)
            if lane not in running and plan[lane] and not stopped:
                name = plan[lane].pop(0)
                command = [sys.executable, "-m", "slm_lightning.cli", "trial"]
                command += ["--config", str(ROOT / "configs" / f"{name}.yaml")]
                command += ["--sessions", str(args.sessions), "--workers", str(workers)]
                command += ["--dir", str(args.out / name), "--progress-every", "60"]
                log = (args.out / f"{name}.log").open("w")
                proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                share = cores[(lane * per_lane) % len(cores) :][:per_lane]
                os.sched_setaffinity(proc.pid, share)  # before the trial splits its cores
                running[lane] = (name, proc)
        if not stopped and time.monotonic() - start > args.deadline:
            stopped = True
            for name, proc in running.values():
                print(f"deadline: stopping {name}", flush=True)
                proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    not_run = [name for lane in plan for name in lane]

    print(
        "\n| config | env | sessions | final return MA mean ± std | IQM [95% CI] | solved "
        "| median frames to target | median fps | upstream SLM Lab | ours at upstream's frames |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _ in chosen:
        path = args.out / name / "trial.json"
        if not path.is_file():
            print(f"| {name} | | not run | | | | | | {upstream(name)} | |")
            continue
        report = json.loads(path.read_text())
        t = report["trial"]
        statuses = [s["status"] for s in report["sessions"]]
        fps = [s["summary"].get("fps") for s in report["sessions"] if s["summary"].get("fps")]
        frames = [s["summary"].get("frames") for s in report["sessions"]]
        note = "" if all(s == "finished" for s in statuses) else f" ({', '.join(statuses)})"
        print(
            f"| {name}{note} | {report['env']} | {t['sessions']} x {max(frames or [0])} frames "
            f"| {fmt(t['final_return_ma_mean'])} ± {fmt(t['final_return_ma_std'])} "
            f"| {fmt(t['final_return_ma_iqm'])} [{fmt(t['iqm_ci_low'])}, {fmt(t['iqm_ci_high'])}] "
            f"| {t['solved']}/{t['sessions']} | {fmt(t['frames_to_target_median'], 0)} "
            f"| {fmt(sorted(fps)[len(fps) // 2] if fps else None, 0)} "
            f"| {upstream(name)} | {at_upstream_frames(name, args.out / name, report)} |"
        )
    if not_run:
        print(f"\nnot run (deadline): {not_run}")
    for group, names in COMPARE.items():
        dirs = [str(args.out / n) for n in names if (args.out / n / "trial.json").is_file()]
        if len(dirs) > 1:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "slm_lightning.cli",
                    "compare",
                    *dirs,
                    "--out",
                    str(args.out / f"compare_{group}"),
                ],
                cwd=ROOT,
                check=False,
            )


if __name__ == "__main__":
    main()
