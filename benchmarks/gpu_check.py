"""The GPU check: PPO Pong at 64 envs eager / thunder / torch.compile / bf16-mixed with a
learning check, SAC Hopper eager vs compiled, DQN Pong, in one sitting on one GPU, printed as
one Markdown table under the GPU's name and the package versions.

Usage (``benchmarks/gpu_check.sh`` is the entry point; it passes its arguments on):
    bash benchmarks/gpu_check.sh [--deadline 450] [--only pong|sac|dqn] [--out DIR]
    bash benchmarks/gpu_check.sh --dry-run      # on a CPU: every row, tiny budgets, ~40 s

Each row is one ``slm-lab fit`` in its own process (so one compiler's caches and warm-up do
not leak into the next run), read back from its ``summary.json`` and ``metrics.csv``:

- ``fps``: the whole training loop from the first rollout, compilation included;
- ``2nd-half fps``: frames over seconds between the logged row nearest half the budget and
  the last one, after compilation and warm-up (the steady-state throughput);
- ``first loss``: ``train/loss`` of the first logged row. Same seed, same first rollout: a
  compiler that computes the same function gives the same loss up to rounding;
- ``return_ma`` after the same frame budget as the row it is compared with, and its
  difference. Pong's budget (12 rollouts, ~100 episodes of mostly random play) shows a
  broken compiled run, not a learning curve.

``--dry-run`` runs the same rows on the CPU with tiny budgets, in this process (imports are
paid once), each fit's output in its log file: every row's flags are parsed and
instantiated, every fit runs, and the table is built, so a typo fails here first.
"""

import argparse
import contextlib
import csv
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GPU_ARGS = ("--trainer.accelerator=gpu", "--trainer.devices=1")
CPU_ARGS = ("--trainer.accelerator=cpu",)

# PPO Pong at 64 envs x 128 steps: 8,192 frames a rollout; 12 rollouts give each env about
# 1,500 agent steps, so ~100 finished episodes (a random-play game lasts ~850 steps).
PONG_ROLLOUT = 64 * 128
# Float32 conv trunk in every Pong row: the shipped config's ``conv.precision: auto`` already
# runs it in bf16 on a GPU, which would leave the bf16-mixed row nothing to compare against.
PONG = (
    "--model.init_args.conv.precision=float32",
    "--model.init_args.env.num_envs=64",
    f"--model.init_args.max_frames={12 * PONG_ROLLOUT}",
    f"--metrics.log_frequency={PONG_ROLLOUT}",
)
PONG_DRY = (
    "--model.init_args.env.num_envs=4",
    "--model.init_args.time_horizon=16",
    "--model.init_args.max_frames=128",
    "--metrics.log_frequency=64",
)
# SAC Hopper: 1,000 random frames, then 5,000 frames at one update each.
# Off-policy fits log a row per Lightning epoch of ~1,000 frames at most.
SAC = (
    "--model.init_args.learning_starts=1000",
    "--model.init_args.max_frames=6000",
    "--metrics.log_frequency=1000",
)
SAC_DRY = (
    "--model.init_args.learning_starts=64",
    "--model.init_args.max_frames=128",
    "--model.init_args.batch_size=32",
)
# DQN Pong (4 envs, one update per vector step): 2,000 random frames, then 2,500 updates.
DQN = (
    "--model.init_args.learning_starts=2000",
    "--model.init_args.max_frames=12000",
    "--metrics.log_frequency=1000",
)
DQN_DRY = (
    "--model.init_args.learning_starts=64",
    "--model.init_args.max_frames=128",
    "--model.init_args.memory_size=1000",
)
# Measured on the 2-core dev CPU (dry-run budgets, one fit each): compiling took ~55 s for
# torch.compile of PPO's conv net, ~7 s for either backend on SAC's MLPs and for thunder on
# the conv net, against a whole eager dry run of ~25 s. tests/test_compile.py fits with both
# backends; here a compiled row's flags are parsed and instantiated, not fitted.
DRY_COMPILE_SKIP = "on CPU (dry run): compiling takes 7-55 s here; flags parsed and instantiated"


@dataclass(frozen=True)
class Row:
    """One fit of the check.

    Args:
        label: the table's name of the row (its first word is its ``--only`` group).
        config: the config under ``configs/``, without ``.yaml``.
        args: the flags measured (budget and variant), as typed after ``slm-lab fit``.
        dry_args: appended in ``--dry-run``: a tiny budget for the CPU.
        limit: seconds the row's process may run on the GPU (compilation included).
        baseline: the label of the row it is compared with (fps ratio, return_ma difference).
    """

    label: str
    config: str
    args: tuple[str, ...]
    dry_args: tuple[str, ...]
    limit: float
    baseline: str | None = None

    @property
    def compiles(self) -> bool:
        """Whether the row compiles its networks (``--torch-compile``)."""
        return any(arg.startswith("--torch-compile") for arg in self.args)


# In order of importance: rows that do not fit before the deadline are skipped from the end.
ROWS: tuple[Row, ...] = (
    Row("pong eager", "ppo_pong", PONG, PONG_DRY, 120),
    Row("pong thunder", "ppo_pong", (*PONG, "--torch-compile=thunder"), PONG_DRY, 180, "pong eager"),
    Row("pong torch.compile", "ppo_pong", (*PONG, "--torch-compile=torch"), PONG_DRY, 180, "pong eager"),
    Row("pong bf16-mixed", "ppo_pong", (*PONG, "--trainer.precision=bf16-mixed"), PONG_DRY, 120, "pong eager"),
    Row("sac eager", "sac_hopper", SAC, SAC_DRY, 90),
    Row("sac torch.compile", "sac_hopper", (*SAC, "--torch-compile=torch"), SAC_DRY, 150, "sac eager"),
    Row("dqn eager", "ddqn_per_pong", DQN, DQN_DRY, 90),
    Row("sac thunder", "sac_hopper", (*SAC, "--torch-compile=thunder"), SAC_DRY, 150, "sac eager"),
)  # fmt: skip

COLUMNS = (
    "run",
    "frames",
    "seconds",
    "fps",
    "2nd-half fps",
    "fps vs baseline",
    "first loss",
    "return_ma",
    "baseline return_ma",
    "return_ma diff",
    "process wall s",
)
# Packages whose versions head the table (distribution names).
PACKAGES = ("torch", "lightning", "lightning-thunder", "gymnasium", "ale-py", "mujoco", "numpy")


def fit_argv(row: Row, run_dir: Path, dry_run: bool) -> list[str]:
    """The command line after ``slm-lab`` for ``row``: the config, the run folder, the row's
    flags, then the device (and in a dry run the tiny budget, which overrides the row's).

    Args:
        row: the row.
        run_dir: its run folder (``--trainer.default_root_dir``).
        dry_run: on the CPU with ``row.dry_args`` instead of on the GPU.
    """
    device = (*CPU_ARGS, *row.dry_args) if dry_run else GPU_ARGS
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / f"{row.config}.yaml"),
        f"--trainer.default_root_dir={run_dir}",
        *row.args,
        *device,
    ]


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Within the block, this process's stdout and stderr (file descriptors 1 and 2, so
    loguru, Lightning and C extensions alike) go to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# The console log's ``HH:MM:SS LEVEL`` prefix (slm_lightning.process.configure_process).
LOG_PREFIX = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ +")


def last_line(text: str, fallback: str) -> str:
    """The last non-empty line of ``text`` (a log's error) without the log's time and
    level, at most 160 characters and no ``|`` (it would split a table cell)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = LOG_PREFIX.sub("", lines[-1]) if lines else fallback
    return line.replace("|", "/")[:160]


def check_args(argv: list[str], log: Path) -> str | None:
    """Parse ``slm-lab ARGV`` and instantiate its model, trainer and callbacks without
    fitting, in this process, its output in ``log``; None when that worked, else why not.

    Args:
        argv: the command line after ``slm-lab``, ``fit`` first.
        log: the file for its stdout and stderr.
    """
    from jsonargparse import ArgumentError

    from slm_lightning.algorithms import RLAlgorithm
    from slm_lightning.cli import TRAINER_DEFAULTS, SLMLabCLI
    from slm_lightning.errors import ConfigError

    try:
        with output_to(log):
            SLMLabCLI(
                RLAlgorithm,
                subclass_mode_model=True,
                trainer_defaults=TRAINER_DEFAULTS,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
                args=argv[1:],
                run=False,
            )
    except (ArgumentError, ConfigError, ValueError) as err:
        return f"{type(err).__name__}: {last_line(str(err), 'bad arguments')}"
    return None


def run_fit(argv: list[str], log: Path, limit: float, in_process: bool) -> str | None:
    """Run ``slm-lab ARGV``, its output in ``log``; None when it succeeded, else why not.

    Args:
        argv: the command line after ``slm-lab``.
        log: the file for its stdout and stderr.
        limit: seconds it may run (a process is killed after them; in-process runs are not
            limited).
        in_process: through ``slm_lightning.cli.main`` in this process (the dry run) instead
            of a process of its own.
    """
    if in_process:
        from slm_lightning.cli import main

        try:
            with output_to(log):
                main(argv)
        except SystemExit as err:
            if err.code not in (0, None):
                return last_line(log.read_text(), f"exit {err.code}")
        except Exception as err:  # reported in the row, like a failed process
            return f"{type(err).__name__}: {last_line(str(err), '')}"[:160]
        return None
    cmd = [sys.executable, "-m", "slm_lightning.cli", *argv]
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=limit
            )
        except subprocess.TimeoutExpired:
            return f"over {limit:.0f} s"
    if proc.returncode != 0:
        return last_line(log.read_text(), f"exit {proc.returncode}")
    return None


def read_metrics(path: Path) -> list[dict[str, float]]:
    """``metrics.csv`` as one dict per row, empty cells left out.

    Args:
        path: the file.
    """
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def second_half_fps(rows: Sequence[dict[str, float]]) -> float | None:
    """Frames per second between the logged row nearest half the last row's frames and the
    last row (``rollout/frames``, ``rollout/seconds``): the throughput after compilation and
    warm-up. None with fewer than two rows.

    Args:
        rows: ``metrics.csv`` rows in frame order (see :func:`read_metrics`).
    """
    timed = [r for r in rows if "rollout/frames" in r and "rollout/seconds" in r]
    if len(timed) < 2:
        return None
    last = timed[-1]
    half = last["rollout/frames"] / 2
    start = min(timed[:-1], key=lambda r: abs(r["rollout/frames"] - half))
    seconds = last["rollout/seconds"] - start["rollout/seconds"]
    if seconds <= 0:
        return None
    return (last["rollout/frames"] - start["rollout/frames"]) / seconds


# The loss a row's first logged update is compared on: PPO's and DQN's total, SAC's critic's.
LOSS_KEYS = ("train/loss", "train/critic_loss")


def first_loss(rows: Sequence[dict[str, float]]) -> float | None:
    """The first logged loss (the first of :data:`LOSS_KEYS` in the first row that has one),
    or None.

    Args:
        rows: ``metrics.csv`` rows in frame order.
    """
    for row in rows:
        for key in LOSS_KEYS:
            if key in row:
                return row[key]
    return None


def measure(row: Row, out: Path, limit: float, dry_run: bool) -> dict:
    """One row's fit and what it left: ``summary.json``'s figures plus ``second_half_fps``,
    ``first_loss`` and ``wall`` (the process's seconds), or ``{"error": why}``.

    Args:
        row: the row.
        out: the folder for every row's run folder and log.
        limit: seconds its process may run.
        dry_run: tiny budget on the CPU, in this process.
    """
    name = row.label.replace(" ", "_").replace(".", "")
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale summary.json must not pass for this run
    argv, log = fit_argv(row, run_dir, dry_run), out / f"{name}.log"
    if dry_run and row.compiles:
        error = check_args(argv, log)
        return {"skipped": DRY_COMPILE_SKIP} if error is None else {"error": error}
    start = time.perf_counter()
    error = run_fit(argv, log, limit, dry_run)
    wall = time.perf_counter() - start
    summary = run_dir / "summary.json"
    if error is None and not summary.is_file():
        error = "no summary.json"
    if error is not None:
        return {"error": error}
    metrics = read_metrics(run_dir / "metrics.csv")
    return {
        **json.loads(summary.read_text()),
        "second_half_fps": second_half_fps(metrics),
        "first_loss": first_loss(metrics),
        "wall": wall,
    }


def fmt(value: object, digits: int = 1) -> str:
    """A table cell: ``–`` for None, floats to ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_row(label: str, result: dict, baseline: dict | None) -> str:
    """One Markdown row (see :data:`COLUMNS`) of a result of :func:`measure`, or of a skip or
    failure (``{"error": ...}``, ``{"skipped": ...}``).

    Args:
        label: the row's label.
        result: its result.
        baseline: the result of the row it is compared with, or None.
    """
    blank = ["" for _ in COLUMNS[2:]]
    if "skipped" in result:
        return "| " + " | ".join([label, f"skipped: {result['skipped']}", *blank]) + " |"
    if "error" in result:
        return "| " + " | ".join([label, f"failed: {result['error']}", *blank]) + " |"
    speed = ma_base = ma_diff = None
    if baseline is not None and "fps" in baseline:
        if baseline["fps"]:
            speed = f"{result['fps'] / baseline['fps']:.2f}x"
        ma_base = baseline["return_ma"]
        if ma_base is not None and result["return_ma"] is not None:
            ma_diff = f"{result['return_ma'] - ma_base:+.2f}"
    cells = [
        label,
        fmt(result["frames"]),
        fmt(result["seconds"]),
        fmt(result["fps"]),
        fmt(None if result["second_half_fps"] is None else round(result["second_half_fps"])),
        fmt(speed),
        fmt(result["first_loss"], 4),
        fmt(result["return_ma"], 2),
        fmt(ma_base, 2),
        fmt(ma_diff),
        fmt(result["wall"]),
    ]
    return "| " + " | ".join(cells) + " |"


def gpu_line() -> str:
    """``GPU: name, driver, memory`` from ``nvidia-smi``, or a line saying there is none (and
    the CPU runs)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"GPU: none (no nvidia-smi), CPU only: {platform.processor() or platform.machine()}"
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        out = subprocess.run(
            [smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except subprocess.SubprocessError as err:
        return f"GPU: none (nvidia-smi failed: {type(err).__name__}), CPU only"
    names = out.stdout.strip()
    if out.returncode != 0 or not names:
        return (
            f"GPU: none (nvidia-smi: {last_line(out.stderr or out.stdout, 'no device')}), CPU only"
        )
    return "GPU: " + "; ".join(names.splitlines())


def versions_line() -> str:
    """``versions: python …, torch …, …`` for :data:`PACKAGES` (``missing`` where not
    installed), read from the installed distributions without importing them."""
    parts = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} missing")
    return f"versions: {', '.join(parts)}; {os.cpu_count()} CPU cores"


def main(argv: list[str] | None = None) -> None:
    """Run the rows and print the header lines and the table (also written to
    ``OUT/gpu_table.md``).

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--deadline", type=float, default=450.0, help="seconds for all rows (default 450)"
    )
    parser.add_argument("--only", choices=("pong", "sac", "dqn"), default=None)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="try the check on a CPU: every row in this process with a tiny budget",
    )
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(
                "no CUDA device: run gpu_check on a GPU machine, or --dry-run on a CPU",
                file=sys.stderr,
            )
            sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    # One small panel per metric costs ~0.3 s of matplotlib per run; the check reads numbers.
    os.environ["SLM_LAB_METRICS_PNG"] = "0"

    mode = "dry run on the CPU, tiny budgets" if args.dry_run else "on the GPU"
    header = [
        gpu_line(),
        versions_line(),
        f"mode: {mode}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    print("\n".join(header), flush=True)
    lines = list(header)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for row in ROWS:
        if args.only and not row.label.startswith(args.only):
            continue
        left = args.deadline - (time.perf_counter() - t0)
        if left < 20:
            result: dict = {"skipped": "deadline"}
        else:
            result = measure(row, args.out, min(row.limit, left), args.dry_run)
        results[row.label] = result
        line = table_row(row.label, result, results.get(row.baseline) if row.baseline else None)
        print(line, flush=True)
        lines.append(line)
    (args.out / "gpu_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
