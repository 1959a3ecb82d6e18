"""``slm-lab SPEC_FILE SPEC_NAME MODE``: the command line dispatches to it, and each mode runs
what SLM Lab's mode does (a trial, a short fit, a search, an evaluation, a resume) on the
config the real importer makes of a spec file, written into the run's own folder.

The spec is our own v5 JSON spec of PPO on ``tests.envs_fixture:Corridor-v0`` (the corridor
config of test_trial.py), so that a trial's sessions take seconds.
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_lightning.cli import main
from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs import command as spec_command
from slm_lightning.lab.specs import importer

REPO = Path(__file__).resolve().parents[1]
SPEC_NAME = "ppo_corridor"


def write_spec(
    path: Path, meta: dict[str, Any] | None = None, search: dict | None = None, lr: Any = 0.001
) -> None:
    """Write the spec file: PPO on a 4-cell corridor, 2 envs, 1536 frames, nets of 8 units.

    Args:
        path: the spec file.
        meta: keys added to (or replacing) the spec's ``meta`` (``max_session`` 1).
        search: the spec's ``search`` section, if any.
        lr: ``agent.net.optim_spec.lr`` (``"${lr}"`` makes it a placeholder for ``-s lr=…``).
    """
    algorithm = {"name": "PPO", "gamma": 0.99, "lam": 0.95, "time_horizon": 16}
    # symlog has no equivalent here: the report's "no equivalent:" group is never empty.
    algorithm |= {"minibatch_size": 32, "training_epoch": 2, "symlog": False}
    net = {"type": "MLPNet", "shared": False, "hid_layers": [8], "hid_layers_activation": "tanh"}
    net["optim_spec"] = {"name": "Adam", "lr": lr}
    spec: dict[str, Any] = {
        "agent": {
            "name": "PPO",
            "algorithm": algorithm,
            "memory": {"name": "OnPolicyBatchReplay"},
            "net": net,
        },
        "env": {"name": "tests.envs_fixture:Corridor-v0", "num_envs": 2, "max_frame": 1536},
        "meta": {"max_session": 1, "log_frequency": 256, **(meta or {})},
    }
    if search is not None:
        spec["search"] = search
    path.write_text(json.dumps({SPEC_NAME: spec}, indent=2))


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The spec file (rewrite it with :func:`write_spec` in a test) and the calls of the real
    ``import_spec``, recorded on their way through; sessions import ``tests.envs_fixture``."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    path = tmp_path / "corridor.json"
    write_spec(path)
    calls: list[tuple] = []
    real = importer.import_spec

    def import_spec(
        source: Path, name: str, sets: dict[str, str] | None = None
    ) -> importer.SpecImport:
        calls.append((source, name, sets))
        return real(source, name, sets)

    monkeypatch.setattr(importer, "import_spec", import_spec)
    return {"path": path, "calls": calls}


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]


def exits_with_one_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    return lines[0]


def test_dispatch_positional_run_and_subcommands(spec, monkeypatch, capsys) -> None:
    seen: dict[str, list[str]] = {}
    monkeypatch.setattr(spec_command, "run_main", lambda argv: seen.setdefault("spec", argv))
    monkeypatch.setattr("slm_lightning.lab.trial.trial_main", lambda a: seen.setdefault("trial", a))
    path = str(spec["path"])
    main([path, SPEC_NAME, "train", "-s", "env=X"])
    assert seen.pop("spec") == [path, SPEC_NAME, "train", "-s", "env=X"]
    main(["run", path, SPEC_NAME, "dev"])
    assert seen.pop("spec") == [path, SPEC_NAME, "dev"]
    main(["trial", "--config", "c.yaml"])
    assert seen == {"trial": ["--config", "c.yaml"]}
    line = exits_with_one_line(["tria", "--config", "c.yaml"], capsys)
    assert "tria: unknown command" in line and "SPEC_FILE SPEC_NAME MODE" in line
    assert "trial" in line and "fit" in line
    line = exits_with_one_line(["missing.json", SPEC_NAME, "train"], capsys)
    assert "missing.json: no such spec file" in line
    # fit is still LightningCLI's (its own parser names the missing model).
    assert "model" in exits_with_one_line(["fit"], capsys)


def test_bad_mode_and_missing_name_are_one_line(spec, capsys) -> None:
    path = str(spec["path"])
    line = exits_with_one_line([path, SPEC_NAME, "trian"], capsys)
    assert "MODE must be one of train, dev, search, enjoy@RUN, eval@RUN" in line
    assert "'trian'" in line
    assert "SPEC_NAME MODE missing" in exits_with_one_line([path], capsys)
    assert "MODE missing" in exits_with_one_line(["run", path, SPEC_NAME], capsys)
    assert "enjoy@RUN" in exits_with_one_line([path, SPEC_NAME, "enjoy"], capsys)
    assert "KEY=VALUE" in exits_with_one_line([path, SPEC_NAME, "dev", "-s", "env"], capsys)
    assert spec["calls"] == [] and not Path("runs").exists()


def test_train_resume_and_enjoy_the_best_session(spec, tmp_path, capsys) -> None:
    write_spec(spec["path"], meta={"max_session": 2}, lr="${lr}")
    main([str(spec["path"]), SPEC_NAME, "train", "-s", "lr=0.01", "--workers", "2"])
    assert spec["calls"] == [(spec["path"], SPEC_NAME, {"lr": "0.01"})]
    (folder,) = (tmp_path / "runs" / SPEC_NAME).glob("train-*")
    assert (
        (folder / f"{SPEC_NAME}.yaml")
        .read_text()
        .startswith(
            f"# Imported by `slm-lab import` from {spec['path']} ({SPEC_NAME}, SLM Lab v5 spec)."
        )
    )
    # import.txt is the report, one line each: every group, the placeholder substituted.
    lines = (folder / "import.txt").read_text().splitlines()
    assert [line for line in lines if not line.startswith("  ")] == [
        "exact:",
        "converted:",
        "no equivalent:",
    ]
    assert "  agent.net.optim_spec.lr 0.01 -> model.init_args.lr" in lines
    assert "  meta.max_session 2 -> slm-lab trial with 2 sessions (seeds 0..1)" in lines
    assert lines[lines.index("no equivalent:") + 1 :] == [
        "  agent.algorithm.symlog: SLM Lab's symlog has no equivalent here"
    ]
    report = json.loads((folder / "trial.json").read_text())
    assert report["name"] == SPEC_NAME and report["seeds"] == [0, 1]
    used = yaml.safe_load((folder / "session-1" / "config.yaml").read_text())
    assert used["model"]["init_args"]["lr"] == 0.01
    assert [s["status"] for s in report["sessions"]] == ["finished", "finished"]

    # train@latest reruns the trial's command in its folder: finished sessions are kept.
    kept = {p: p.read_text() for p in folder.glob("session-*/*.*") if p.suffix != ".png"}
    main([str(spec["path"]), SPEC_NAME, "train@latest", "--workers", "2"])
    assert len(spec["calls"]) == 1  # resumed with the config saved in the folder
    assert "sessions [0, 1] finished before; kept" in capsys.readouterr().err
    assert {p: p.read_text() for p in kept} == kept
    report = json.loads((folder / "trial.json").read_text())
    assert [s["status"] for s in report["sessions"]] == ["finished", "finished"]
    # ... and with other options the trial refuses to mix its sessions.
    line = exits_with_one_line(
        [str(spec["path"]), SPEC_NAME, "train@latest", "--model.init_args.gamma=0.9"], capsys
    )
    assert "rerun it with the same options" in line

    # enjoy@TRIAL evaluates the best session's best checkpoint (session-1 made the best here).
    report["sessions"][1]["metrics"]["final_return_ma"] = 1.0
    report["sessions"][0]["metrics"]["final_return_ma"] = 0.5
    (folder / "trial.json").write_text(json.dumps(report))
    main([str(spec["path"]), SPEC_NAME, f"enjoy@{folder}"])
    assert {p: p.read_text() for p in kept} == kept  # the evaluation wrote elsewhere
    (evaluation,) = (tmp_path / "runs" / SPEC_NAME).glob("enjoy-*")
    used = yaml.safe_load((evaluation / "config.yaml").read_text())
    assert used["ckpt_path"] == str(folder / "session-1" / "checkpoints" / "best.ckpt")
    callbacks = [c["class_path"] for c in used["trainer"]["callbacks"] or []]
    assert callbacks == ["slm_lightning.callbacks.VideoRecorder"]
    assert re.search(r"eval: episodes=\d+", capsys.readouterr().err)


def test_evaluated_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    (run / "checkpoints" / "last.ckpt").write_text("")
    assert spec_command.evaluated_checkpoint(run) == (
        run / "config.yaml",
        run / "checkpoints/last.ckpt",
    )
    (run / "checkpoints" / "best.ckpt").write_text("")
    assert spec_command.evaluated_checkpoint(run)[1] == run / "checkpoints" / "best.ckpt"
    given = run / "checkpoints" / "last.ckpt"
    assert spec_command.evaluated_checkpoint(given) == (run / "config.yaml", given)
    trial = tmp_path / "trial"
    sessions = [
        {"folder": "../run", "metrics": {"final_return_ma": None}},
        {"folder": "nowhere", "metrics": {"final_return_ma": 2.0}},
    ]
    trial.mkdir()
    (trial / "trial.json").write_text(json.dumps({"sessions": sessions}))
    with pytest.raises(ConfigError, match="nowhere"):
        spec_command.evaluated_checkpoint(trial)
    sessions[1]["metrics"]["final_return_ma"] = None  # none logged one: the first session
    (trial / "trial.json").write_text(json.dumps({"sessions": sessions}))
    assert spec_command.evaluated_checkpoint(trial)[1] == (trial / "../run/checkpoints/best.ckpt")
    with pytest.raises(ConfigError, match="RUN must be a run folder"):
        spec_command.evaluated_checkpoint(tmp_path / "empty")


def test_dev_is_one_short_fit_with_the_dev_preset(spec, tmp_path, capsys) -> None:
    main([str(spec["path"]), SPEC_NAME, "dev", "--model.init_args.max_frames=256"])
    (folder,) = (tmp_path / "runs" / SPEC_NAME).glob("dev-*")
    assert (folder / f"{SPEC_NAME}.yaml").is_file() and (folder / "import.txt").is_file()
    used = yaml.safe_load((folder / "config.yaml").read_text())
    assert used["metrics"]["print_metrics"] is True  # the dev preset
    assert used["model"]["init_args"]["max_frames"] == 256  # the option after it wins
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and 256 <= summary["frames"] < 256 + 32


def test_search_runs_with_the_spec_meta(spec, tmp_path, monkeypatch, capsys) -> None:
    path = str(spec["path"])
    assert "no search section" in exits_with_one_line([path, SPEC_NAME, "search"], capsys)
    assert not Path("runs").exists()
    # A scheduler (ASHA, its settings) makes it the halving pruner and one session a trial.
    scheduler = {"grace_period": 256, "reduction_factor": 3}
    meta = {"max_trial": 1, "search_scheduler": scheduler, "max_session": 4}
    search = {"agent.net.optim_spec.lr__loguniform": [1e-4, 1e-2]}
    write_spec(spec["path"], meta=meta, search=search)
    main([path, SPEC_NAME, "search", "--model.init_args.max_frames=512"])
    (folder,) = (tmp_path / "runs" / SPEC_NAME).glob("search-*")
    space = {"model.init_args.lr": {"loguniform": [1e-4, 1e-2]}}
    assert yaml.safe_load((folder / "space.yaml").read_text()) == space
    assert "pruner halving" in capsys.readouterr().err
    rows = (folder / "study.csv").read_text().splitlines()
    assert len(rows) == 2 and ",COMPLETE," in rows[1]
    assert sorted(p.name for p in (folder / "trial-0").glob("session-*")) == ["session-0"]
    # Without a scheduler: the median pruner and the spec's max_session sessions per trial.
    seen: list[list[str]] = []
    monkeypatch.setattr("slm_lightning.lab.search.search_main", seen.append)
    write_spec(spec["path"], meta={"max_trial": 3, "max_session": 4}, search=search)
    main([path, SPEC_NAME, "search"])
    args = seen[0]
    assert args[args.index("--pruner") + 1] == "median"
    assert args[args.index("--sessions") + 1] == "4" and args[args.index("--trials") + 1] == "3"
