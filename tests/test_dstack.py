"""The dstack tasks in ``.dstack/``: well-formed, and their ``slm-lab`` command is one we accept.

The command line is expanded by bash with the task's default ``env`` (as dstack's runner
would), then parsed by our CLI: ``--print_config`` runs the full ``fit`` parser (every key,
``--ckpt_path`` included) without training, and an instantiation with ``run=False`` builds the
model, trainer and callbacks it configures.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from slm_lightning.algorithms import RLAlgorithm
from slm_lightning.cli import main
from tests.cli_helpers import instantiate

ROOT = Path(__file__).parents[1]
# train.yml is SLM Lab's name for train.dstack.yml (a link to it), tested as that file.
TASKS = sorted(p for p in (ROOT / ".dstack").glob("train*.yml") if not p.is_symlink())
SLM_LAB = re.compile(r"\buv run (?:--extra \S+ )*slm-lab (.*)$", re.DOTALL)


def load(task: Path) -> dict:
    spec = yaml.safe_load(task.read_text())
    assert isinstance(spec, dict), f"{task.name}: not a mapping"
    return spec


def default_env(spec: dict) -> dict[str, str]:
    """The task's ``env`` entries with a default (``KEY=value``), as a dict."""
    return dict(entry.split("=", 1) for entry in spec.get("env", []) if "=" in entry)


def slm_lab_args(spec: dict, env: dict[str, str]) -> list[str]:
    """The arguments of the task's ``uv run slm-lab`` command, expanded by bash with ``env``."""
    lines = [match.group(1) for cmd in spec["commands"] if (match := SLM_LAB.search(cmd))]
    assert len(lines) == 1, "expected one `uv run slm-lab` command"
    out = subprocess.run(
        ["bash", "-c", f'printf "%s\\0" {lines[0]}'],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split("\0")[:-1]


def test_tasks_exist() -> None:
    assert [task.name for task in TASKS] == ["train-cpu.dstack.yml", "train.dstack.yml"]
    # `dstack apply -f` reads any path (only its default, ./.dstack.yml, is named by dstack);
    # SLM Lab's migration guide runs `dstack apply -f .dstack/train.yml`.
    link = ROOT / ".dstack" / "train.yml"
    assert link.is_symlink() and link.resolve() == ROOT / ".dstack" / "train.dstack.yml"
    assert (ROOT / ".dstack" / "search.dstack.yml").is_file()


def test_search_task_runs_workers_on_one_study(tmp_path) -> None:
    from slm_lightning.lab.search import build_parser
    from slm_lightning.lab.space import check_space_keys, load_space
    from slm_lightning.lab.trial import describe_config

    spec = load(ROOT / ".dstack" / "search.dstack.yml")
    assert spec["type"] == "task" and spec["nodes"] >= 2
    # The storage has no default: dstack asks for it, and every node gets the same one.
    assert "STORAGE" in spec["env"]
    assert any(shlex.split(cmd)[:3] == ["uv", "sync", "--frozen"] for cmd in spec["commands"])
    assert any("--extra postgres" in cmd for cmd in spec["commands"])  # the database driver
    url = "postgresql://user:secret@db.example:5432/optuna"
    env = {**default_env(spec), "STORAGE": url, "DSTACK_NODE_RANK": "3"}
    args = slm_lab_args(spec, env)
    assert args[0] == "search"
    options, overrides = build_parser().parse_known_args(args[1:])
    assert options.storage == url and options.study == env["STUDY"] and overrides == []
    assert options.trials == int(env["TRIALS"]) and options.sessions == int(env["SESSIONS"])
    # Each node writes its trials' folders on the volume, in a folder of its own.
    volume = spec["volumes"][0]["path"]
    assert str(options.dir).startswith(volume + "/") and str(options.dir).endswith("node-3")
    assert "interruption" in spec["retry"]["on_events"]
    # The default config and space exist and agree (the space's keys are the config's).
    config = str(ROOT / options.config[0])
    check_space_keys(load_space(ROOT / options.space), describe_config([config], []).values, config)


@pytest.mark.parametrize("task", TASKS, ids=lambda p: p.stem)
def test_task_is_well_formed(task: Path) -> None:
    spec = load(task)
    assert spec["type"] == "task"
    commands = spec["commands"]
    assert all(isinstance(cmd, str) for cmd in commands)
    assert any(shlex.split(cmd)[:2] == ["uv", "sync"] for cmd in commands)
    env = default_env(spec)
    config = ROOT / env["CONFIG"]
    assert config.is_file(), f"{task.name}: CONFIG default {env['CONFIG']} does not exist"
    # Runs and checkpoints on a volume, and the command resumes from the last checkpoint there.
    volume_paths = [v["path"] if isinstance(v, dict) else v.split(":")[-1] for v in spec["volumes"]]
    args = slm_lab_args(spec, env)
    assert args[0] == "fit"
    root_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir"))
    assert any(root_dir.startswith(path.rstrip("/") + "/") for path in volume_paths), root_dir
    assert args[args.index("--ckpt_path") + 1] == "last"
    # A preempted spot run is retried, and the retry resumes.
    assert "interruption" in spec["retry"]["on_events"]
    if task.name == "train.dstack.yml":
        assert "gpu" in spec["resources"]
        assert "--trainer.accelerator=gpu" in args
    else:
        assert "gpu" not in spec["resources"]
        assert "--trainer.accelerator=cpu" in args


@pytest.mark.parametrize("task", TASKS, ids=lambda p: p.stem)
def test_task_command_parses(task: Path, capsys) -> None:
    spec = load(task)
    args = slm_lab_args(spec, default_env(spec))
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    # The full fit parser, --ckpt_path included: unknown keys or bad values exit 2 here.
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ckpt_path"] == "last"
    assert printed["trainer"]["accelerator"] in ("gpu", "cpu")

    # And the classes it configures instantiate (the accelerator is checked for this machine's
    # hardware at instantiation, so the CPU stands in for the GPU here).
    model_args = []
    skip = False
    for arg in args[1:]:  # without the subcommand and --ckpt_path, which only fit knows
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        model_args.append(re.sub(r"^--trainer\.accelerator=gpu$", "--trainer.accelerator=cpu", arg))
    cli = instantiate(model_args)
    assert isinstance(cli.model, RLAlgorithm)
    config = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
    assert type(cli.model).__name__ == config["model"]["class_path"].rsplit(".", 1)[-1]
