"""The six runs of SLM Lab's migration guide, through SLM Lab's own command line on our
fixture specs, beside the figures the guide reports.

Usage:
    uv run python benchmarks/migration.py [--out DIR] [--only NAME ...] [--report]

Each run is ``slm-lab tests/fixtures/specs/<file> <SPEC_NAME> train`` (a trial of the spec's
``meta.max_session`` sessions, as many at once as the cores allow) with the frame budget
below where the spec's own would not fit on a laptop CPU, from ``--out`` (its ``runs/``
folder). The script prints one Markdown table: sessions, frames per session, median fps,
final return MA mean ± std, and the guide's figures. ``--report`` prints the table from the
trials already in ``--out``.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "tests" / "fixtures" / "specs"

# (fixture file, spec name, frame budget or None for the spec's own, the guide's figures)
RUNS: list[tuple[str, str, int | None, str]] = [
    ("v4_classic.json", "dqn_cartpole", None, "~213-222 fps, MA ~75-78"),
    ("v4_classic.json", "reinforce_cartpole", None, "~11-12k fps, MA ~140-195"),
    ("v4_classic.json", "ddqn_per_concat_lunar", 30_000, "MA ~85.6"),
    ("v4_ppo.json", "ppo_shared_cartpole", None, "~2.7-3k fps"),
    ("v4_ppo.json", "ppo_bipedalwalker", 100_000, "~2.2k fps, MA ~27.8"),
    ("v4_ppo.json", "ppo_pong", 10_240, "145 fps"),
]


def run(out: Path, file: str, name: str, frames: int | None) -> None:
    command = [sys.executable, "-m", "slm_lightning.cli", str(SPECS / file), name, "train"]
    if frames is not None:
        command.append(f"--model.init_args.max_frames={frames}")
    command += ["--progress-every", "60"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=out, check=False)


def row(out: Path, name: str, guide: str) -> str:
    trials = sorted((out / "runs" / name).glob("train-*/trial.json"))
    if not trials:
        return f"| {name} | not run | | | | {guide} |"
    report = json.loads(trials[-1].read_text())
    sessions = report["sessions"]
    frames = [s["summary"].get("frames") or 0 for s in sessions]
    fps = [s["summary"].get("fps") or 0.0 for s in sessions]
    finals = [s["summary"].get("return_ma") for s in sessions]
    finals = [f for f in finals if f is not None]
    mean = statistics.mean(finals) if finals else float("nan")
    std = statistics.stdev(finals) if len(finals) > 1 else float("nan")
    return (
        f"| {name} | {len(sessions)} | {max(frames)} | {statistics.median(fps):.0f} | "
        f"{mean:.1f} ± {std:.1f} | {guide} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-migration")
    parser.add_argument("--only", nargs="+", help="spec names, in this order")
    parser.add_argument("--report", action="store_true", help="only print the table")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if not args.only or r[1] in args.only]
    if not args.report:
        for file, name, frames, _ in runs:
            run(args.out, file, name, frames)
    print("\n| spec | sessions | frames | median fps | final return MA | migration guide |")
    print("|---|---|---|---|---|---|")
    for _, name, _, guide in runs:
        print(row(args.out, name, guide))


if __name__ == "__main__":
    main()
