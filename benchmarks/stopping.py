"""How fast a run stops: seconds from a signal to the process's exit, per vectorization.

Usage:
    uv run python benchmarks/stopping.py [--config ppo_lunar] [--modes blocks async sync] [--after 15]

Each row starts ``slm-lab fit`` in its own process group, waits ``--after`` seconds (mid-fit),
sends the signal (SIGTERM to the trainer, a single SIGINT to it, two SIGINTs, or SIGINT to
the whole process group as a terminal's Ctrl-C does) and prints the exit status, the seconds
from the (first) signal to the exit, whether ``last.ckpt`` was written, and how many of the
trainer's child processes (env workers) were still alive after it exited.
"""

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (signal, send to the whole group, how many)
SIGNALS = {
    "SIGTERM": (signal.SIGTERM, False, 1),
    "SIGINT": (signal.SIGINT, False, 1),
    "SIGINT x2": (signal.SIGINT, False, 2),
    "Ctrl-C (group)": (signal.SIGINT, True, 1),
}


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def stop_once(config: str, mode: str, name: str, after: float) -> str:
    signum, group, count = SIGNALS[name]
    run_dir = Path(tempfile.mkdtemp(prefix="slm-stop-"))
    cmd = [
        sys.executable,
        "-m",
        "slm_lightning.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        f"--model.init_args.env.vectorization={mode}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(after)
    workers = children(proc.pid)
    start = time.perf_counter()
    for i in range(count):
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        if i + 1 < count:
            time.sleep(0.2)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return f"| {mode} | {name} | hung (killed after 120 s) | | | |"
    seconds = time.perf_counter() - start
    left = sum(alive(pid) for pid in workers)
    saved = (run_dir / "checkpoints" / "last.ckpt").is_file()
    return f"| {mode} | {name} | {code} | {seconds:.1f} | {saved} | {left} of {len(workers)} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ppo_lunar", help="a config name in configs/")
    parser.add_argument("--modes", nargs="+", default=["blocks", "async", "sync"])
    parser.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    parser.add_argument("--after", type=float, default=15.0, help="seconds of fit before it")
    args = parser.parse_args()
    print("| vectorization | signal | exit status | seconds to exit | last.ckpt | workers alive |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        for name in args.signals:
            print(stop_once(args.config, mode, name, args.after), flush=True)


if __name__ == "__main__":
    main()
