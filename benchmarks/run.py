"""Benchmark configs: train each for several seeds and print one table.

Usage:
    uv run python benchmarks/run.py ppo_cartpole a2c_cartpole --seeds 0 1 2
    uv run python benchmarks/run.py ppo_cartpole --seeds 0 -- --model.init_args.lr=0.002

Runs ``slm-lab fit`` once per (config, seed), one at a time (timings need the whole
machine), reads each run's ``summary.json`` and prints a Markdown table: frames, seconds,
fps, final return MA, frames and seconds to the target, and per config the median seconds
to target over seeds ("never" counts as infinite). Runs go to ``runs/benchmarks/``.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(config: str, seed: int, extra: list[str], out_root: Path) -> dict:
    run_dir = out_root / config / f"seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "slm_lightning.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={run_dir}",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{config} seed {seed} failed:\n" + "\n".join(tail))
    return json.loads(summary_path.read_text())


def fmt(value: object) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("configs", nargs="+", help="config names in configs/, without .yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    print(
        "| config | seed | frames | seconds | fps | return_ma | target | frames_to_target | seconds_to_target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    medians = []
    for config in args.configs:
        to_target = []
        for seed in args.seeds:
            s = run_one(config, seed, extra, args.out)
            to_target.append(
                s["seconds_to_target"] if s["seconds_to_target"] is not None else math.inf
            )
            print(
                f"| {config} | {seed} | {s['frames']} | {fmt(s['seconds'])} | {s['fps']} | {fmt(s['return_ma'])} "
                f"| {fmt(s['target_return'])} | {fmt(s['frames_to_target'])} | {fmt(s['seconds_to_target'])} |",
                flush=True,
            )
        medians.append((config, statistics.median(to_target)))
    for config, median in medians:
        print(
            f"median seconds_to_target {config}: {'never' if math.isinf(median) else f'{median:.1f}'}"
        )


if __name__ == "__main__":
    main()
