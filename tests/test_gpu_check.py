"""``benchmarks/gpu_check.sh``: its dry run on the CPU prints every row of the GPU table, and
the helpers that read a run back and build the table give hand-computed cells."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

LABELS = [
    "pong eager",
    "pong thunder",
    "pong torch.compile",
    "pong bf16-mixed",
    "sac eager",
    "sac torch.compile",
    "dqn eager",
    "sac thunder",
]


def cells(line: str) -> list[str]:
    """The cells of one Markdown table row."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_dry_run_prints_every_row(tmp_path: Path) -> None:
    # The whole script as a GPU machine runs it, but --dry-run: ~25 s on 2 idle cores.
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    gpu = next(line for line in lines if line.startswith("GPU:"))
    assert "none" in gpu and "CPU" in gpu
    versions = next(line for line in lines if line.startswith("versions:"))
    assert "torch 2." in versions and "lightning-thunder" in versions
    rows = {cells(line)[0]: cells(line) for line in lines if line.startswith("| ")}
    assert list(rows)[1:] == LABELS  # the header row first
    assert rows["run"] == list(gpu_check.COLUMNS)
    col = {name: i for i, name in enumerate(gpu_check.COLUMNS)}
    for label in LABELS:
        row = rows[label]
        assert len(row) == len(gpu_check.COLUMNS), row
        if "thunder" in label or "torch.compile" in label:
            assert row[1] == f"skipped: {gpu_check.DRY_COMPILE_SKIP}"
            continue
        assert int(row[col["frames"]]) == 128  # the dry-run budget, not the GPU's
        assert float(row[col["fps"]]) > 0
        assert row[col["first loss"]] != "–"
    # Pong logs two rows in 128 frames: the second half has a throughput; bf16 is compared.
    assert float(rows["pong eager"][col["2nd-half fps"]]) > 0
    assert rows["pong bf16-mixed"][col["fps vs baseline"]].endswith("x")
    assert rows["sac eager"][col["return_ma"]] != "–"  # Hopper episodes end within 128 frames
    # The fits' own output went to their logs: stdout is the table file, line for line.
    assert proc.stdout == (tmp_path / "gpu_table.md").read_text()
    assert "summary: frames=128" in (tmp_path / "pong_eager.log").read_text()
    assert "summary:" not in proc.stderr


def test_fit_argv_overrides_the_budget_only_in_a_dry_run(tmp_path: Path) -> None:
    row = gpu_check.ROWS[1]  # pong thunder
    gpu = gpu_check.fit_argv(row, tmp_path, dry_run=False)
    assert gpu[-2:] == list(gpu_check.GPU_ARGS)
    assert "--torch-compile=thunder" in gpu and "--model.init_args.env.num_envs=64" in gpu
    dry = gpu_check.fit_argv(row, tmp_path, dry_run=True)
    assert "--trainer.accelerator=gpu" not in dry
    # jsonargparse keeps the last value: the tiny budget comes after the measured one.
    assert dry.index("--model.init_args.env.num_envs=4") > dry.index(
        "--model.init_args.env.num_envs=64"
    )


def test_second_half_fps_and_first_loss_by_hand() -> None:
    rows = [
        {"rollout/frames": 100.0, "rollout/seconds": 5.0, "train/loss": 0.5},  # compiling
        {"rollout/frames": 200.0, "rollout/seconds": 6.0, "train/loss": 0.4},
        {"rollout/frames": 300.0, "rollout/seconds": 6.5},
        {"rollout/frames": 400.0, "rollout/seconds": 7.0},
    ]
    # Half of 400 frames is the row at 200: (400 - 200) / (7 - 6).
    assert gpu_check.second_half_fps(rows) == pytest.approx(200.0)
    assert gpu_check.second_half_fps(rows[:1]) is None
    assert gpu_check.first_loss(rows) == 0.5
    assert gpu_check.first_loss([{"rollout/frames": 1.0}, {"train/critic_loss": 2.5}]) == 2.5
    assert gpu_check.first_loss([]) is None


def test_read_metrics_leaves_empty_cells_out(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("rollout/frames,train/loss\n100,\n200,0.25\n")
    assert gpu_check.read_metrics(path) == [
        {"rollout/frames": 100.0},
        {"rollout/frames": 200.0, "train/loss": 0.25},
    ]
    assert gpu_check.read_metrics(tmp_path / "missing.csv") == []


def test_table_row_compares_with_its_baseline() -> None:
    base = {
        "frames": 1000,
        "seconds": 10.0,
        "fps": 100,
        "second_half_fps": 120.0,
        "first_loss": 0.5,
        "return_ma": -20.4,
        "wall": 20.0,
    }
    fast = {**base, "fps": 125, "return_ma": -20.1, "first_loss": 0.50004}
    row = cells(gpu_check.table_row("pong thunder", fast, base))
    assert row == [
        "pong thunder",
        "1000",
        "10.0",
        "125",
        "120",
        "1.25x",
        "0.5000",
        "-20.10",
        "-20.40",
        "+0.30",
        "20.0",
    ]
    alone = cells(gpu_check.table_row("dqn eager", {**base, "return_ma": None}, None))
    assert alone[5:10] == ["–", "0.5000", "–", "–", "–"]
    for result, text in (
        ({"skipped": "deadline"}, "skipped: deadline"),
        ({"error": "boom"}, "failed: boom"),
    ):
        row = cells(gpu_check.table_row("sac eager", result, base))
        assert row[:2] == ["sac eager", text] and len(row) == len(gpu_check.COLUMNS)
    # A failed baseline leaves the comparison out rather than failing the table.
    assert cells(gpu_check.table_row("pong thunder", fast, {"error": "boom"}))[5] == "–"


def test_last_line_is_one_table_cell() -> None:
    log = "GPU available: False\n03:09:58 ERROR   model.init_args.x: unknown key | y\n\n"
    assert gpu_check.last_line(log, "exit 2") == "model.init_args.x: unknown key / y"
    assert gpu_check.last_line("  \n", "exit 2") == "exit 2"


def test_check_args_names_a_typo(tmp_path: Path) -> None:
    row = gpu_check.ROWS[5]  # sac torch.compile
    assert gpu_check.check_args(gpu_check.fit_argv(row, tmp_path, True), tmp_path / "a.log") is None
    typo = [*gpu_check.fit_argv(row, tmp_path, True), "--torch-compile=toch"]
    error = gpu_check.check_args(typo, tmp_path / "b.log")
    assert error is not None and "toch" in error
    key = [*gpu_check.fit_argv(row, tmp_path, True), "--model.init_args.learning_start=5"]
    error = gpu_check.check_args(key, tmp_path / "c.log")
    assert error is not None and "learning_start" in error


def test_deadline_skips_every_row(tmp_path: Path, capsys) -> None:
    gpu_check.main(["--dry-run", "--deadline", "0", "--out", str(tmp_path)])
    rows = [cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0] for row in rows[1:]] == LABELS
    assert all(row[1] == "skipped: deadline" for row in rows[1:])
    assert not list(tmp_path.glob("*.log"))  # no fit started
