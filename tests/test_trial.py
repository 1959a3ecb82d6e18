"""``slm-lab trial``: sessions as processes, each a run folder; trial.json agrees with the
sessions' own summaries; a crash is reported and a rerun resumes; SIGTERM stops every
session at a checkpoint; bad input is one line before anything is written."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from slm_lightning.cli import main
from slm_lightning.errors import ConfigError
from slm_lightning.lab.runs import read_run
from slm_lightning.lab.sessions import core_slots, last_error_line
from slm_lightning.lab.trial import resolve_seeds

REPO = Path(__file__).resolve().parents[1]

# PPO on a 4-cell corridor: a session is a few seconds, most of it the process start.
CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu"},
    "model": {
        "class_path": "slm_lightning.algorithms.PPO",
        "init_args": {
            "env": {
                "name": "tests.envs_fixture:FaultyCorridor-v0",
                "num_envs": 2,
                "vectorization": "sync",
            },
            "max_frames": 1536,
            "time_horizon": 16,
            "training_epochs": 2,
            "num_minibatches": 1,
            "actor": {"hidden_sizes": [8]},
            "critic": {"hidden_sizes": [8]},
        },
    },
    "metrics": {"log_frequency": 256, "window": 10, "target_return": 0.9},
    "checkpoint": {"every_n_frames": 128},
    "progress": {"interval": 60.0},
}


@pytest.fixture
def trial_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The config file; sessions import ``tests.envs_fixture`` from the repository root."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("SLM_LAB_METRICS_PNG", "1")  # every session folder as a user gets it
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "corridor.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def trial_lines(err: str) -> list[str]:
    return re.findall(r"INFO\s+(trial: .*)", err)


def session_pid(folder: Path) -> int | None:
    """The pid of the fit process writing into ``folder`` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--trainer.default_root_dir={folder}".encode() in cmdline:
            return int(proc.name)
    return None


def test_trial_reports_a_crash_and_a_rerun_resumes_it(trial_config, tmp_path, capsys) -> None:
    crash_file = tmp_path / "sensor_broken"
    crash_file.touch()
    args = [
        "trial",
        "--config",
        str(trial_config),
        "--seeds",
        "0",
        "2",
        "--workers",
        "2",
        "--dir",
        "exp",
        "--progress-every",
        "0",
        # Session 0's sub-envs are seeded 0 and 1: the one seeded 1 fails at frame ~600.
        f"--model.init_args.env.kwargs={{crash_seed: 1, crash_file: {crash_file}}}",
        "--torch_threads=64",  # more than a session's share of the cores
    ]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "session-0 crashed: RuntimeError: corridor sensor failed at step 301" in err
    trial = Path("exp")
    report = json.loads((trial / "trial.json").read_text())
    by_seed = {s["seed"]: s for s in report["sessions"]}
    assert by_seed[0]["status"] == "crashed" and "sensor failed" in by_seed[0]["error"]
    assert by_seed[2]["status"] == "finished" and by_seed[2]["exit_code"] == 0
    # The crashed session wrote its last state: a checkpoint and a summary that says so.
    crashed = json.loads((trial / "session-0" / "summary.json").read_text())
    assert crashed["status"] == "crashed" and 0 < crashed["frames"] < 1536
    assert (trial / "session-0" / "checkpoints" / "last.ckpt").is_file()
    finished_summary = (trial / "session-2" / "summary.json").read_text()
    finished_mtime = (trial / "session-2" / "summary.json").stat().st_mtime_ns

    # The sensor is fixed: the same command keeps session 2 and resumes session 0.
    crash_file.unlink()
    main(args)
    err = capsys.readouterr().err
    assert "sessions [2] finished before; kept" in err
    assert (trial / "session-2" / "summary.json").read_text() == finished_summary
    assert (trial / "session-2" / "summary.json").stat().st_mtime_ns == finished_mtime
    log = (trial / "session-0" / "session.log").read_text()
    assert log.count("$ ") == 2 and "resuming from" in log
    share = len(core_slots(2)[0])  # each of the 2 sessions at once gets half the cores
    if share:
        command = log.splitlines()[0]
        assert command.endswith(f"--ckpt_path=last --torch_threads={share}"), command
    summaries = {
        seed: json.loads((trial / f"session-{seed}" / "summary.json").read_text())
        for seed in (0, 2)
    }
    assert summaries[0]["status"] == "finished" and summaries[0]["frames"] >= 1536
    assert summaries[0]["start_frames"] >= crashed["frames"] - 128  # from its last checkpoint
    rows = read_run(trial / "session-0")
    assert list(rows.frames) == sorted(set(rows.frames))  # the rows continue, none repeated

    # Every session is a normal run folder with its own seed.
    for seed in (0, 2):
        folder = trial / f"session-{seed}"
        for name in ("config.yaml", "metrics.csv", "summary.json", "returns.png", "metrics.png"):
            assert (folder / name).is_file(), (seed, name)
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"] == seed

    # trial.json agrees with the sessions' own summaries.
    report = json.loads((trial / "trial.json").read_text())
    assert [s["seed"] for s in report["sessions"]] == [0, 2]
    for entry in report["sessions"]:
        assert entry["summary"] == summaries[entry["seed"]]
        assert entry["status"] == "finished"
        assert entry["metrics"]["final_return_ma"] == pytest.approx(
            summaries[entry["seed"]]["return_ma"], abs=1e-3
        )
        assert entry["metrics"]["frames_to_target"] == summaries[entry["seed"]]["frames_to_target"]
    finals = [summaries[s]["return_ma"] for s in (0, 2)]
    assert report["trial"]["final_return_ma_mean"] == pytest.approx(np.mean(finals), abs=1e-3)
    solved = sum(summaries[s]["frames_to_target"] is not None for s in (0, 2))
    assert report["trial"]["solved"] == solved and report["trial"]["sessions"] == 2
    assert report["algorithm"] == "PPO" and report["target_return"] == 0.9
    assert trial_lines(err) == [report["line"]]
    assert report["line"].startswith(f"trial: sessions=2 solved={solved}/2 ")
    assert (trial / "trial.png").is_file()


def test_sigterm_stops_every_session_at_a_checkpoint(trial_config, tmp_path, capsys) -> None:
    long = {**CONFIG, "model": {**CONFIG["model"]}}
    long["model"]["init_args"] = {**CONFIG["model"]["init_args"], "max_frames": 10_000_000}
    trial_config.write_text(yaml.safe_dump(long))
    checkpoints = [Path("exp", f"session-{s}", "checkpoints", "last.ckpt") for s in (0, 1)]

    def terminate_when_training() -> None:  # as a scheduler preempting the trial would
        deadline = time.monotonic() + 90
        while not all(c.is_file() for c in checkpoints) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # a progress line first
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_training)
    killer.start()
    with pytest.raises(SystemExit) as exc:
        main(["trial", "--config", str(trial_config), "--sessions", "2", "--workers", "2",
              "--dir", "exp", "--progress-every", "1"])  # fmt: skip
    killer.join()
    err = capsys.readouterr().err
    assert exc.value.code == 128 + signal.SIGTERM, err
    assert re.search(r"session-1: frames=\d+/10000000 fps=\d+ return_ma=", err)  # progress
    for seed in (0, 1):
        summary = json.loads(Path("exp", f"session-{seed}", "summary.json").read_text())
        assert summary["status"] == "stopped", summary
        assert session_pid(Path("exp", f"session-{seed}")) is None  # no session left behind
    report = json.loads(Path("exp", "trial.json").read_text())
    assert [s["status"] for s in report["sessions"]] == ["stopped", "stopped"]
    assert [s["exit_code"] for s in report["sessions"]] == [143, 143]
    assert "rerun the same command with --dir exp to resume it" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.default_root_dir=x"], "trial: --trainer.default_root_dir is set by the trial"),
        (["--ckpt_path", "last"], "trial: --ckpt_path is set by the trial"),
        (["--seeds", "3", "3"], "--seeds must be distinct, got [3, 3]"),
        (["--sessions", "0"], "--sessions must be >= 1, got 0"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--model.init_args.gama=0.9"], "model.init_args.gama"),
        (["--sesions", "2"], "trial: unknown option --sesions; did you mean --sessions?"),
    ],
)
def test_bad_input_is_one_line_before_any_folder(
    trial_config, tmp_path, capsys, extra, message
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["trial", "--config", str(trial_config), "--dir", "exp", *extra])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(err) == 1 and message in err[0], err
    assert not Path("exp").exists() and not Path("runs").exists()


def test_a_folder_of_another_trial_is_not_resumed(trial_config, tmp_path, capsys) -> None:
    folder = tmp_path / "exp"
    folder.mkdir()
    command = {"configs": [str(trial_config)], "overrides": [], "seeds": [0, 1]}
    (folder / "trial_command.json").write_text(json.dumps(command))
    with pytest.raises(SystemExit) as exc:
        main(["trial", "--config", str(trial_config), "--seeds", "5", "--dir", "exp"])
    assert exc.value.code == 2
    assert "holds a trial with seeds=[0, 1], not [5]" in capsys.readouterr().err
    assert json.loads((folder / "trial_command.json").read_text()) == command
    (folder / "notes.txt").write_text("mine")
    (folder / "trial_command.json").unlink()
    with pytest.raises(SystemExit):
        main(["trial", "--config", str(trial_config), "--dir", "exp"])
    assert "is not empty and holds no trial" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_seeds_cores_and_error_lines(tmp_path) -> None:
    assert resolve_seeds(None, 3, 7) == [7, 8, 9]
    assert resolve_seeds([3, 11], 4, 7) == [3, 11]
    with pytest.raises(ConfigError, match="integer seed_everything"):
        resolve_seeds(None, 2, None)
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        slots = core_slots(len(cores))
        assert [s for slot in slots for s in slot] == cores  # disjoint, one core each
        assert core_slots(1) == [cores]
    log = tmp_path / "session.log"
    log.write_text("INFO start\nTraceback\n  File x\nValueError: bad thing\nINFO saved last.ckpt\n")
    assert last_error_line(log) == "ValueError: bad thing"
    log.write_text("INFO start\nKilled\n")
    assert last_error_line(log) == "Killed"
