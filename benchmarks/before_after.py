"""Frames per second of this tree against an earlier revision, same machine, one sitting.

Usage:
    uv run python benchmarks/before_after.py --before 5894802
    uv run python benchmarks/before_after.py --before 5894802 --cases sac_pendulum_64 sac_hopper

The earlier revision is checked out into a git worktree under ``runs/before-<rev>/`` (its
own ``uv sync``). Each case is one short ``slm-lab fit`` per tree, the two trees one after
the other (alternating which goes first per case, so a drift of the machine's speed does
not favour one). A case's fps is measured from the metrics rows after its warm-up (random
actions before ``learning_starts``, compile or env start-up): ``(frames_end - frames_w) /
(seconds_end - seconds_w)`` with ``w`` the first row at or past ``measure_from``. ``whole``
is the run's own fps (summary.json), warm-up included. Runs go to ``runs/before_after/``.
"""

import argparse
import csv
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    """One benchmark run: a config with overrides, and where its steady state starts.

    Args:
        config: file under ``configs/``.
        args: fit options (the budget, the metrics row frequency …).
        measure_from: frames after which the fps is measured.
        note: what the case is, for the table.
    """

    config: str
    args: list[str] = field(default_factory=list)
    measure_from: int = 0
    note: str = ""


def sac_nets(width: int) -> list[str]:
    return [
        f"--model.init_args.actor.hidden_sizes=[{width},{width}]",
        f"--model.init_args.critic.hidden_sizes=[{width},{width}]",
    ]


# RL Zoo's DQN CartPole-v1 schedule (one env, 128 updates of 64 every 256 frames).
ZOO_DQN = [
    "--model.init_args.env.num_envs=1",
    "--model.init_args.net.hidden_sizes=[256,256]",
    "--model.init_args.batch_size=64",
    "--model.init_args.training_frequency=256",
    "--model.init_args.updates_per_step=128",
    "--model.init_args.lr=0.0023",
    "--model.init_args.n_steps=1",
    "--model.init_args.tau=null",
    "--model.init_args.target_update_frequency=10",
    "--model.init_args.learning_starts=1000",
    "--model.init_args.memory_size=100000",
    "--model.init_args.epsilon={start: 1.0, end: 0.04, end_frame: 8000}",
    "--model.init_args.max_grad_norm=10.0",
    "--model.init_args.loss=huber",
]

CASES: dict[str, Case] = {
    "sac_pendulum_256": Case(
        "sac_pendulum.yaml",
        [*sac_nets(256), "--model.init_args.max_frames=4000", "--metrics.log_frequency=500"],
        1500,
        "1 env, one update of 256 per frame, [256, 256]",
    ),
    "sac_pendulum_64": Case(
        "sac_pendulum.yaml",
        [*sac_nets(64), "--model.init_args.max_frames=6000", "--metrics.log_frequency=500"],
        1500,
        "1 env, one update of 256 per frame, [64, 64]",
    ),
    "crossq_pendulum": Case(
        "crossq_pendulum.yaml",
        ["--model.init_args.max_frames=3000", "--metrics.log_frequency=500"],
        1500,
        "1 env, one update per frame, 2048-wide critics",
    ),
    "sac_hopper": Case(
        "sac_hopper.yaml",
        [
            "--model.init_args.max_frames=3500",
            "--model.init_args.learning_starts=1000",
            "--metrics.log_frequency=500",
        ],
        1500,
        "1 env, one update of 256 per frame, [256, 256]",
    ),
    "dqn_cartpole_zoo": Case(
        "dqn_cartpole.yaml",
        [*ZOO_DQN, "--model.init_args.max_frames=12000", "--metrics.log_frequency=1000"],
        2000,
        "RL Zoo's DQN settings: 128 updates of 64 per 256 frames, [256, 256]",
    ),
    "ddqn_per_cartpole": Case(
        "ddqn_per_cartpole.yaml",
        ["--model.init_args.max_frames=40000", "--metrics.log_frequency=5000"],
        5000,
        "12 envs, one PER update of 256 per vector step",
    ),
    "ppo_cartpole": Case(
        "ppo_cartpole.yaml",
        ["--model.init_args.max_frames=100000", "--metrics.log_frequency=10000"],
        20000,
        "64 envs, 12 minibatch updates of 512 per 1024 frames",
    ),
    "a2c_cartpole": Case(
        "a2c_cartpole.yaml",
        ["--model.init_args.max_frames=100000", "--metrics.log_frequency=10000"],
        20000,
        "32 envs, one update per 256 frames",
    ),
    "ppo_pong": Case(
        "ppo_pong.yaml",
        ["--model.init_args.max_frames=30720", "--metrics.log_frequency=4096"],
        4096,
        "8 envs, Nature CNN",
    ),
    "ppo_bipedalwalker": Case(
        "ppo_bipedalwalker.yaml",
        ["--model.init_args.max_frames=98304", "--metrics.log_frequency=16384"],
        16384,
        "PPO, Box2D",
    ),
}


def steady_fps(metrics_csv: Path, measure_from: int) -> float | None:
    """Frames per second between the first row at or past ``measure_from`` frames and the
    last row; None with fewer than two such rows."""
    rows = []
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("rollout/frames") and row.get("rollout/seconds"):
                rows.append((float(row["rollout/frames"]), float(row["rollout/seconds"])))
    rows = sorted(set(rows))
    start = next((r for r in rows if r[0] >= measure_from), None)
    if start is None or rows[-1][1] <= start[1]:
        return None
    return (rows[-1][0] - start[0]) / (rows[-1][1] - start[1])


def ensure_tree(revision: str) -> Path:
    """A worktree of ``revision`` with its environment synced."""
    tree = ROOT / "runs" / f"before-{revision}"
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True
        )
    subprocess.run(["uv", "sync", "--quiet"], cwd=tree, check=True)
    return tree


def run_case(tree: Path, name: str, case: Case, out: Path) -> dict:
    """Fit ``case`` with ``tree``'s code; its summary and steady fps."""
    run_dir = out / name
    cmd = [
        str(tree / ".venv" / "bin" / "python"),
        "-m",
        "slm_lightning.cli",
        "fit",
        "--config",
        str(tree / "configs" / case.config),
        f"--trainer.default_root_dir={run_dir}",
        *case.args,
    ]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    summary = run_dir / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)}
    result = json.loads(summary.read_text())
    result["steady_fps"] = steady_fps(run_dir / "metrics.csv", case.measure_from)
    return result


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="the earlier git revision")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    before_tree = ensure_tree(args.before)
    out = ROOT / "runs" / "before_after"
    print(f"before: {args.before}; after: this tree ({ROOT})")
    print("| case | settings | before fps | after fps | speedup | before whole | after whole |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for i, name in enumerate(args.cases):
        case = CASES[name]
        trees = [("before", before_tree), ("after", ROOT)]
        results = {}
        for label, tree in trees if i % 2 == 0 else trees[::-1]:
            results[label] = run_case(tree, name, case, out / label)
        before, after = results["before"], results["after"]
        if "error" in before or "error" in after:
            print(
                f"| {name} | {case.note} | {before.get('error', '')} | {after.get('error', '')} |"
            )
            continue
        b, a = before["steady_fps"], after["steady_fps"]
        speedup = f"{a / b:.2f}x" if a and b else "–"
        print(
            f"| {name} | {case.note} | {fmt(b)} | {fmt(a)} | {speedup} | "
            f"{fmt(before['fps'])} | {fmt(after['fps'])} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
