"""``slm-lab search``: Optuna trials that are multi-seed trials; study.csv and best.yaml agree
with the trials' folders; the pruner stops a hopeless configuration at a checkpoint; several
processes share one study to exactly ``--trials`` trials; a killed search resumes; bad input
is one line before anything is written."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from slm_lightning.cli import main
from slm_lightning.lab.runs import FRAMES, RETURN_MA
from slm_lightning.lab.search import grid_values
from slm_lightning.lab.search_results import best_config, override_pairs
from slm_lightning.lab.study import (
    COMMAND_ATTR,
    admitted,
    is_dead,
    make_pruner,
    make_sampler,
    may_ask,
    process_record,
    reap_dead_trials,
    requeue,
)

REPO = Path(__file__).resolve().parents[1]

# PPO on an 8-cell corridor (a random walk seldom reaches the end within 32 steps; PPO learns
# to walk right in a few hundred frames). A session is ~5 s, most of it the process start.
CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu"},
    "model": {
        "class_path": "slm_lightning.algorithms.PPO",
        "init_args": {
            "env": {
                "name": "tests.envs_fixture:Corridor-v0",
                "num_envs": 4,
                "vectorization": "sync",
                "kwargs": {"length": 8},
            },
            "max_frames": 2048,
            "time_horizon": 16,
            "training_epochs": 2,
            "num_minibatches": 1,
            "lr": 0.01,
            "actor": {"hidden_sizes": [8]},
            "critic": {"hidden_sizes": [8]},
        },
    },
    "metrics": {"log_frequency": 128, "window": 10, "target_return": 0.9},
    "checkpoint": {"every_n_frames": 256},
    "progress": {"interval": 60.0},
}
SPACE = {
    "model.init_args.lr": {"loguniform": [1.0e-3, 3.0e-2]},
    "model.init_args.gamma": {"uniform": [0.9, 0.99]},
    "model.init_args.actor.hidden_sizes": {"choice": [[8], [16, 16]]},
}


@pytest.fixture
def search_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The config and space files; sessions import ``tests.envs_fixture`` from the repo."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    config, space = tmp_path / "corridor.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    space.write_text(yaml.safe_dump(SPACE))
    return config, space


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def journal_study(path: Path, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def search_command(config: Path, space: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "slm_lightning.cli", "search", "--config", str(config),
        "--space", str(space), "--progress-every", "0", *extra,
    ]  # fmt: skip


def test_search_runs_multi_seed_trials_and_writes_its_results(
    search_files, tmp_path, capsys, run_fit
) -> None:
    config, space = search_files
    main(["search", "--config", str(config), "--space", str(space), "--trials", "2",
          "--sessions", "2", "--workers", "2", "--dir", "exp", "--sampler", "random",
          "--pruner", "none", "--progress-every", "0"])  # fmt: skip
    err = capsys.readouterr().err
    folder = tmp_path / "exp"
    rows = read_csv(folder / "study.csv")
    assert [r["number"] for r in rows] == ["0", "1"]
    assert {r["state"] for r in rows} == {"COMPLETE"}
    for row in rows:
        trial = json.loads((folder / f"trial-{row['number']}" / "trial.json").read_text())
        assert trial["seeds"] == [0, 1] and len(trial["sessions"]) == 2
        # The sampled values reached every session's fit.
        for session in trial["sessions"]:
            ran = yaml.safe_load(
                (folder / f"trial-{row['number']}" / session["folder"] / "config.yaml").read_text()
            )
            assert ran["model"]["init_args"]["lr"] == float(row["model.init_args.lr"])
            assert ran["model"]["init_args"]["gamma"] == float(row["model.init_args.gamma"])
            assert str(ran["model"]["init_args"]["actor"]["hidden_sizes"]).replace(" ", "") == (
                row["model.init_args.actor.hidden_sizes"].replace(" ", "")
            )
        # The objective is the mean over sessions of their final return MA.
        finals = [s["summary"]["return_ma"] for s in trial["sessions"]]
        assert [float(row["return_ma_seed0"]), float(row["return_ma_seed1"])] == pytest.approx(
            finals, abs=1e-3
        )
        assert float(row["objective"]) == pytest.approx(sum(finals) / 2, abs=1e-3)
        assert int(row["frames"]) == sum(s["summary"]["frames"] for s in trial["sessions"])

    best = max(rows, key=lambda r: float(r["objective"]))
    lines = re.findall(r"INFO\s+(search: .*)", err)
    assert lines and lines[-1].startswith("search: trials=2 complete=2 pruned=0 failed=0 ")
    assert f"(trial {best['number']})" in lines[-1]
    assert (folder / "search.png").stat().st_size > 10_000

    # best.yaml is the config with the best values, and fit runs it as it is.
    text = (folder / "best.yaml").read_text()
    assert text.startswith(
        f"# The best of the search in exp (study corridor): trial {best['number']}"
    )
    written = yaml.safe_load(text)
    assert written["model"]["init_args"]["lr"] == float(best["model.init_args.lr"])
    assert written["model"]["init_args"]["env"] == CONFIG["model"]["init_args"]["env"]
    run = run_fit(config=folder / "best.yaml")
    assert run.summary["frames"] == 2048
    assert run.cli.model.gamma == float(best["model.init_args.gamma"])


def test_the_pruner_stops_a_hopeless_trial_at_a_checkpoint(search_files, tmp_path, capsys) -> None:
    config, space = search_files
    # Optuna's GridSampler, seeded with the config's seed 1, runs lr 0.01 first, then 0.0
    # (asserted below): the hopeless trial meets a complete one to be compared with.
    long = {**CONFIG, "seed_everything": 1, "model": {**CONFIG["model"]}}
    long["model"]["init_args"] = {**CONFIG["model"]["init_args"], "max_frames": 8192}
    config.write_text(yaml.safe_dump(long))
    space.write_text(yaml.safe_dump({"model.init_args.lr": {"choice": [0.01, 0.0]}}))
    main(["search", "--config", str(config), "--space", str(space), "--trials", "2",
          "--sessions", "1", "--workers", "1", "--dir", "exp", "--sampler", "grid",
          "--startup-trials", "1", "--warmup-frames", "1024", "--progress-every", "0"])  # fmt: skip
    err = capsys.readouterr().err
    rows = read_csv(tmp_path / "exp" / "study.csv")
    assert [(r["model.init_args.lr"], r["state"]) for r in rows] == [
        ("0.01", "COMPLETE"),
        ("0.0", "PRUNED"),
    ]
    pruned = tmp_path / "exp" / "trial-1" / "session-1"
    summary = json.loads((pruned / "summary.json").read_text())
    assert summary["status"] == "stopped" and 1024 <= summary["frames"] < 8192
    assert int(rows[1]["frames"]) == summary["frames"]
    assert (pruned / "checkpoints" / "last.ckpt").is_file()  # it can still be resumed
    assert re.search(r"trial-1: pruned at \d+ frames", err)
    study = journal_study(tmp_path / "exp" / "study.journal", "corridor")
    # The intermediate values are the session's return MA on the 128-frame grid.
    steps = study.trials[1].intermediate_values
    assert steps and all(step % 128 == 0 for step in steps) and max(steps) <= summary["frames"]


@pytest.mark.parametrize("storage", ["journal", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_two_processes_share_one_study_to_exactly_the_budget(
    search_files, tmp_path, storage
) -> None:
    config, space = search_files
    url = (
        str(tmp_path / "shared.journal")
        if storage == "journal"
        else (f"sqlite:///{tmp_path / 'shared.db'}")
    )
    common = ["--trials", "4", "--sessions", "1", "--workers", "1", "--storage", url,
              "--study", "shared", "--sampler", "random", "--pruner", "none",
              "--model.init_args.max_frames=512"]  # fmt: skip
    processes = [
        subprocess.Popen(
            search_command(config, space, *common, "--dir", str(tmp_path / name)),
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"{name}.log").open("w"),
        )
        for name in ("a", "b")
    ]
    for process in processes:
        assert process.wait(timeout=110) == 0, (tmp_path / "a.log").read_text()[-2000:]
    if storage == "journal":
        study = journal_study(tmp_path / "shared.journal", "shared")
    else:
        study = optuna.load_study(study_name="shared", storage=url)
    counted = [t for t in study.trials if not t.user_attrs.get("over_budget")]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    # Each trial ran in exactly one of the two folders, and both processes ran some.
    ran = {
        name: {int(p.name.split("-")[1]) for p in (tmp_path / name).glob("trial-*")}
        for name in ("a", "b")
    }
    assert not ran["a"] & ran["b"] and ran["a"] and ran["b"]
    assert ran["a"] | ran["b"] == {t.number for t in counted}
    # Each process's study.csv lists every trial of the study.
    for name in ("a", "b"):
        rows = read_csv(tmp_path / name / "study.csv")
        assert sorted(int(r["number"]) for r in rows) == sorted(ran["a"] | ran["b"])


@pytest.mark.slow  # ~30 s: two searches and a session that resumes
def test_a_killed_search_resumes_its_trial_from_the_checkpoints(search_files, tmp_path) -> None:
    config, space = search_files
    # A slow simulator (2 ms a step, ~500 frames/s): the search is killed mid-trial.
    slow = "--model.init_args.env.kwargs={length: 8, step_seconds: 0.002}"
    args = search_command(
        config, space, "--trials", "1", "--sessions", "1", "--workers", "1", "--dir", "exp",
        "--sampler", "random", "--pruner", "none", "--model.init_args.max_frames=1536", slow,
    )  # fmt: skip
    search = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = tmp_path / "exp" / "trial-0" / "session-0"
    deadline = time.monotonic() + 60
    while not (session / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    search.kill()  # as a lost machine or the OOM killer would
    search.wait()
    # The same command at once: the session learns that its parent died (the kernel sends it
    # SIGTERM) and stops at a checkpoint; then the dead trial is failed and queued again
    # once, and the retry takes over its folder and resumes the session from its checkpoint.
    result = subprocess.run(args, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trial-0: its search process" in result.stderr
    study = journal_study(tmp_path / "exp" / "study.journal", "corridor")
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0 and retry.params == first.params
    assert not (tmp_path / "exp" / "trial-0").exists()
    session = tmp_path / "exp" / "trial-1" / "session-0"
    log = (session / "session.log").read_text()
    assert log.count("$ ") == 2 and "resuming from" in log
    resumed = json.loads((session / "summary.json").read_text())
    assert resumed["status"] == "finished" and resumed["frames"] >= 1536
    assert 0 < resumed["start_frames"] < 1536  # from the checkpoint it stopped at
    assert "search: trials=1 complete=1 pruned=0 failed=0" in result.stderr
    rows = read_csv(tmp_path / "exp" / "study.csv")
    assert [(r["number"], r["state"], r["retry_of"]) for r in rows] == [
        ("0", "FAIL", ""),
        ("1", "COMPLETE", "0"),
    ]


def test_sigterm_stops_the_sessions_and_queues_the_running_trial_again(
    search_files, tmp_path, capsys
) -> None:
    config, space = search_files
    checkpoint = Path("exp", "trial-0", "session-0", "checkpoints", "last.ckpt")

    def terminate_when_training() -> None:  # as a scheduler preempting the search would
        deadline = time.monotonic() + 60
        while not checkpoint.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_training)
    killer.start()
    with pytest.raises(SystemExit) as exc:
        main(["search", "--config", str(config), "--space", str(space), "--trials", "1",
              "--sessions", "1", "--workers", "1", "--dir", "exp", "--progress-every", "0",
              "--model.init_args.max_frames=100000",
              "--model.init_args.env.kwargs={length: 8, step_seconds: 0.002}"])  # fmt: skip
    killer.join()
    err = capsys.readouterr().err
    assert exc.value.code == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads(Path("exp", "trial-0", "session-0", "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["frames"] < 100000
    study = journal_study(tmp_path / "exp" / "study.journal", "corridor")
    first, queued = study.trials
    assert first.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.params == first.params and queued.user_attrs["deaths"] == 0
    assert "rerun the same command with --dir exp to continue it" in err
    assert "search: trials=1 complete=0 pruned=0 failed=0 queued=1" in err


@pytest.mark.parametrize(
    ("extra", "space", "message"),
    [
        (["--sampler", "bayes"], SPACE, "--sampler must be one of tpe, random, cmaes, grid"),
        (["--pruner", "asha"], SPACE, "--pruner must be one of none, median, halving"),
        (["--objective", "reward"], SPACE, "--objective must be one of return_ma, strength"),
        (["--trails", "3"], SPACE, "unknown option --trails; did you mean --trials?"),
        (["--ckpt_path", "x"], SPACE, "--ckpt_path is set by the trial for each session"),
        ([], {"model.init_args.lrr": {"uniform": [0.1, 0.2]}}, "did you mean model.init_args.lr"),
        (
            ["--sampler", "grid"],
            {"model.init_args.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
            "model.init_args.lr is a continuous range",
        ),
        (
            [],
            {"model.init_args.clip_eps": {"uniform": [0.1, 1.5]}},
            "model.init_args.clip_eps=1.5",
        ),
    ],
)
def test_bad_input_is_one_line_before_anything_is_written(
    search_files, tmp_path, capsys, extra, space, message
) -> None:
    config, space_file = search_files
    space_file.write_text(yaml.safe_dump(space))
    with pytest.raises(SystemExit) as exc:
        main(["search", "--config", str(config), "--space", str(space_file), "--trials", "2",
              "--dir", "exp", *extra])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "ERROR" in line]) == 1
    assert message in err[-1], err[-1]
    assert not (tmp_path / "exp").exists()


def test_a_study_of_another_space_is_refused(search_files, tmp_path, capsys) -> None:
    config, space = search_files
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    (tmp_path / "exp").mkdir()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "exp" / "study.journal")))
    other = optuna.create_study(study_name="corridor", storage=storage)
    other.set_user_attr(COMMAND_ATTR, {"configs": [str(config)], "space": {}})
    with pytest.raises(SystemExit) as exc:
        main(["search", "--config", str(config), "--space", str(space), "--trials", "2",
              "--dir", "exp"])  # fmt: skip
    assert exc.value.code == 2
    assert "--study corridor: the study searches other" in capsys.readouterr().err
    assert not list((tmp_path / "exp").glob("trial-*"))


# --- the pieces, against hand-made studies and metrics ------------------------------------


def _study(states: list[TrialState], attrs: dict[int, dict] | None = None) -> optuna.Study:
    study = optuna.create_study()
    dist = {"x": FloatDistribution(0, 1)}
    for i, state in enumerate(states):
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                params={"x": 0.5},
                distributions=dist,
                value=1.0 if state == TrialState.COMPLETE else None,
                user_attrs=(attrs or {}).get(i, {}),
            )
        )
    return study


def test_the_budget_counts_retries_once_and_skips_strays() -> None:
    done, fail, wait = TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING
    trials = _study([done, done, fail]).trials
    assert may_ask(trials, 4) and not may_ask(trials, 3)  # a failed trial counts
    assert admitted(trials, 3, 4) and not admitted(trials, 3, 3)
    # Trial 2 died and was queued again as 3: 2 no longer counts, 3 does, and it may run.
    trials = _study([done, done, fail, wait], {3: {"retry_of": 2}}).trials
    assert may_ask(trials, 3)  # 3 counted trials, but one of them waits to be run
    assert admitted(trials, 3, 3)  # only 0 and 1 come before it
    trials = _study([done, done, fail, done], {3: {"retry_of": 2}}).trials
    assert not may_ask(trials, 3) and may_ask(trials, 4)
    # Two processes asked at once for the last place: 4 is one too many, and is not counted.
    trials = _study([done, done, done, done, fail], {4: {"over_budget": True}}).trials
    assert not admitted(trials, 4, 4) and not may_ask(trials, 4) and may_ask(trials, 5)
    assert admitted(trials, 5, 5)  # the stray does not take a place


def test_requeue_retries_a_dead_trial_once_and_a_stopped_one_always() -> None:
    study = _study([TrialState.FAIL])
    requeue(study, study.trials[0], died=True)
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.params == {"x": 0.5}
    assert retry.user_attrs == {"retry_of": 0, "deaths": 1, "first_number": 0}
    requeue(study, retry, died=False)  # its user stopped it: queued again, deaths unchanged
    assert study.trials[2].user_attrs == {"retry_of": 1, "deaths": 1, "first_number": 0}
    requeue(study, study.trials[2], died=True)  # died a second time: not again
    assert len(study.trials) == 3


def test_grid_values_average_sessions_at_the_first_row_past_each_step() -> None:
    nan = float("nan")
    a = {FRAMES: [100, 200, 300, 400], RETURN_MA: [nan, 1.0, 2.0, 3.0]}
    b = {FRAMES: [120, 240, 360], RETURN_MA: [0.5, 1.5, 2.5]}
    # step 100: a has no MA yet (left out); 200: a 1.0, b 1.5 (row 240); 300: a 2.0, b 2.5
    # (row 360); 400: b has not reached it.
    assert grid_values([a, b], 100, 1000) == [(200, 1.25), (300, 2.25)]
    assert grid_values([a], 100, 250) == [(200, 1.0)]  # never past the budget
    assert grid_values([a, {}], 100, 1000) == []  # a session that has logged nothing


def test_best_config_applies_overrides_and_values_over_the_files(tmp_path) -> None:
    base, extra = tmp_path / "base.yaml", tmp_path / "extra.yaml"
    base.write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.1, "gamma": 0.9}}}))
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"gamma": 0.95}}}))
    assert override_pairs(["--a.b=1", "--c", "x y", "--d=[1, 2]"]) == [
        ("a.b", "1"),
        ("c", "x y"),
        ("d", "[1, 2]"),
    ]
    tree = best_config(
        [str(base), str(extra)],
        [
            "--model.init_args.max_frames",
            "500",
            "--metrics.window=10",
            "--model.init_args.tau=1e-3",
        ],
        {"model.init_args.lr": 0.003, "model.init_args.actor.hidden_sizes": [64, 64]},
    )
    assert tree == {
        "model": {
            "init_args": {
                "lr": 0.003,
                "gamma": 0.95,
                "max_frames": 500,
                "tau": 0.001,  # a float, not the text "1e-3" plain YAML 1.1 would read
                "actor": {"hidden_sizes": [64, 64]},
            }
        },
        "metrics": {"window": 10},
    }


def test_a_trial_whose_process_died_is_failed_and_queued_once_its_sessions_are_gone(
    tmp_path,
) -> None:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.journal")))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    trial.set_user_attr("owner", process_record(owner.pid))
    trial.set_user_attr("sessions", [process_record(session.pid)])
    owner.wait()
    # Its session is still stopping at a checkpoint: wait for it.
    assert reap_dead_trials(study) == [0]
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    session.kill()
    session.wait()
    assert reap_dead_trials(study) == []
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == first.params and retry.user_attrs["retry_of"] == 0
    reap_dead_trials(study)  # nothing more to do: no second retry
    assert len(study.trials) == 2
    # A trial run by a live process (this one) is left alone.
    live = study.ask({"x": FloatDistribution(0, 1)})
    live.set_user_attr("owner", process_record(os.getpid()))
    reap_dead_trials(study)
    assert study.trials[live.number].state == TrialState.RUNNING


def test_a_process_is_dead_once_it_exited_or_its_pid_was_reused() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = process_record(child.pid)
    assert is_dead(record) is False
    child.wait()
    assert is_dead(record) is True
    assert is_dead(process_record(os.getpid())) is False
    assert is_dead({**process_record(os.getpid()), "start": -1}) is True  # another process now
    assert is_dead({**process_record(os.getpid()), "host": "elsewhere"}) is None


def test_pruners_and_samplers_count_in_frames() -> None:
    from slm_lightning.lab.space import parse_space

    median = make_pruner("median", 300_000, startup=5, warmup=60_000)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert median._n_startup_trials == 5 and median._n_warmup_steps == 60_000
    # Successive halving's first rung at a 27th of the budget (rungs 1/27, 1/9, 1/3), or at
    # the warm-up if later.
    halving = make_pruner("halving", 270_000, startup=5, warmup=0)
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert halving._min_resource == 10_000
    assert make_pruner("halving", 270_000, startup=5, warmup=54_000)._min_resource == 54_000
    hyperband = make_pruner("hyperband", 270_000, startup=5, warmup=0)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource) == (10_000, 270_000)
    assert isinstance(make_pruner("none", 1000, 5, 0), optuna.pruners.NopPruner)
    space = parse_space({"a": {"choice": [1, 2]}, "b": {"int": [0, 4], "step": 2}}, "s.yaml")
    grid = make_sampler("grid", space, seed=0, startup=5)
    assert isinstance(grid, optuna.samplers.GridSampler)
    assert sorted(grid._search_space["b"]) == [0, 2, 4]
    tpe = make_sampler("tpe", space, seed=3, startup=7)
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._n_startup_trials == 7
    assert isinstance(make_sampler("cmaes", space, 0, 5), optuna.samplers.CmaEsSampler)
