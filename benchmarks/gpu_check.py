"""The GPU check: eager vs torch.compile vs thunder with a learning check, float32 vs bf16 on
Pong, in one sitting on one GPU, printed as one Markdown table.

Usage (on a machine with a CUDA GPU):
    uv run python benchmarks/gpu_check.py [--deadline 330] [--only cartpole|pong] [--out DIR]

Each row is one ``slm-lab fit`` in its own process (so one compiler's caches and warm-up do
not leak into the next run), read back from its ``summary.json``:

- ``ppo_cartpole`` on the GPU, eager / ``--torch-compile=torch`` / ``--torch-compile=thunder``,
  its whole 150k-frame budget: the learning check (did the 100-episode mean reach 475, and
  when) and the whole-loop fps, compilation included.
- ``ppo_pong`` on the GPU for a fixed number of frames: float32 conv trunk, ``bf16-mixed``,
  and bf16 with each compiler: the fps of the whole loop (env stepping in ale-py's threads,
  inference, PPO updates).

``seconds`` is training wall time from the first rollout (imports and compilation set-up
before fit are not counted; compilation on the first call is). Rows that do not finish
within their time limit, or start after ``--deadline`` seconds, say so instead of a figure.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1"]
PONG_FRAMES = 40960  # 40 rollouts of 8 envs x 128 steps

# (label, config, extra arguments, time limit in seconds)
RUNS: list[tuple[str, str, list[str], int]] = [
    ("cartpole eager", "ppo_cartpole", [], 100),
    ("cartpole torch.compile", "ppo_cartpole", ["--torch-compile=torch"], 150),
    ("cartpole thunder", "ppo_cartpole", ["--torch-compile=thunder"], 150),
    (
        "pong float32",
        "ppo_pong",
        ["--model.init_args.conv.precision=float32", f"--model.init_args.max_frames={PONG_FRAMES}"],
        150,
    ),
    (
        "pong bf16-mixed",
        "ppo_pong",
        ["--trainer.precision=bf16-mixed", f"--model.init_args.max_frames={PONG_FRAMES}"],
        150,
    ),
    (
        "pong bf16-mixed torch.compile",
        "ppo_pong",
        [
            "--trainer.precision=bf16-mixed",
            "--torch-compile=torch",
            f"--model.init_args.max_frames={PONG_FRAMES}",
        ],
        180,
    ),
    (
        "pong bf16-mixed thunder",
        "ppo_pong",
        [
            "--trainer.precision=bf16-mixed",
            "--torch-compile=thunder",
            f"--model.init_args.max_frames={PONG_FRAMES}",
        ],
        180,
    ),
]


def run_one(
    label: str, config: str, extra: list[str], limit: float, out: Path, device_args: list[str]
) -> dict:
    """One fit in its own process; its summary, or ``{"error": ...}``."""
    run_dir = out / label.replace(" ", "_").replace(".", "")
    cmd = [
        sys.executable,
        "-m",
        "slm_lightning.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        f"--trainer.default_root_dir={run_dir}",
        *extra,
        *device_args,
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"over {limit:.0f} s"}
    wall = time.perf_counter() - start
    (out / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    summary = run_dir / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:160]}
    result = json.loads(summary.read_text())
    result["wall"] = wall
    return result


def fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deadline", type=float, default=330.0, help="seconds for all runs")
    parser.add_argument("--only", choices=("cartpole", "pong"), default=None)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="try the script itself on a CPU: every run on the CPU for 4,096 frames",
    )
    args = parser.parse_args()
    device_args = (
        ["--trainer.accelerator=cpu", "--model.init_args.max_frames=4096"] if args.smoke else GPU
    )
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    try:
        import thunder

        thunder_version = thunder.__version__
    except Exception as err:  # reported in the header; the thunder rows then fail on their own
        thunder_version = f"not importable ({type(err).__name__})"
    header = [
        f"device: {device}; torch {torch.__version__}; lightning-thunder {thunder_version}; "
        f"{os.cpu_count()} CPU cores",
        "",
        "| run | frames | seconds | fps | return_ma | frames_to_target | seconds_to_target | process wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = list(header)
    t0 = time.perf_counter()
    for label, config, extra, limit in RUNS:
        if args.only and not label.startswith(args.only):
            continue
        left = args.deadline - (time.perf_counter() - t0)
        if left < 20:
            row = f"| {label} | skipped: deadline | | | | | | |"
        else:
            s = run_one(label, config, extra, min(limit, left), args.out, device_args)
            if "error" in s:
                row = f"| {label} | failed: {s['error']} | | | | | | |"
            else:
                row = (
                    f"| {label} | {s['frames']} | {fmt(s['seconds'])} | {s['fps']} "
                    f"| {fmt(s['return_ma'])} | {fmt(s['frames_to_target'])} "
                    f"| {fmt(s['seconds_to_target'])} | {fmt(s['wall'])} |"
                )
        print(row, flush=True)
        rows.append(row)
    (args.out / "gpu_table.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
