"""The ``slm-lab`` command line: shipped configs, ``--help``, and one-line errors on bad input."""

import importlib
import inspect
import re
import sys
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml
from gymnasium import spaces

from slm_lightning.algorithms import A2C, PPO, Reinforce
from slm_lightning.callbacks import FrameCheckpoint, MetricsTracker, RunSummary
from slm_lightning.cli import main
from tests.cli_helpers import instantiate

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
PRESETS = ROOT / "callbacks"
PPO_CARTPOLE = CONFIGS / "ppo_cartpole.yaml"
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR\s+(.*)$", re.MULTILINE)


def plain(value):
    """A dataclass / Namespace / dict as nested plain dicts, for comparison with YAML."""
    if hasattr(value, "__dataclass_fields__"):
        value = vars(value)
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def assert_yaml_subset(expected, actual, where: str) -> None:
    """Every value the YAML sets reached the instantiated object (extra keys are defaults)."""
    if isinstance(expected, dict):
        actual = plain(actual)
        assert isinstance(actual, dict), f"{where}: expected a mapping, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            assert_yaml_subset(value, actual[key], f"{where}.{key}")
    else:
        assert actual == expected, f"{where}: YAML says {expected!r}, got {actual!r}"


# --- every shipped config parses and instantiates ----------------------------------------------


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_instantiates(config: Path, isolated_run: Path) -> None:
    raw = yaml.safe_load(config.read_text())
    model_cfg = raw["model"]
    module, _, name = model_cfg["class_path"].rpartition(".")
    expected_class = getattr(importlib.import_module(module), name)

    cli = instantiate(["--config", str(config)])

    assert type(cli.model) is expected_class
    init_args = model_cfg.get("init_args", {})
    env_cfg = init_args.get("env", {})
    assert cli.model.env_spec.name == env_cfg.get("name", "CartPole-v1")
    assert_yaml_subset(env_cfg, cli.model.env_spec, "model.init_args.env")
    assert cli.model.max_frames == init_args.get("max_frames", cli.model.max_frames)
    for key, value in init_args.items():
        if key != "env":
            assert_yaml_subset(value, cli.model.hparams[key], f"model.init_args.{key}")
    if "seed_everything" in raw:
        assert cli.config.seed_everything == raw["seed_everything"]

    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    assert {MetricsTracker, FrameCheckpoint, RunSummary} <= set(callbacks)
    assert_yaml_subset(raw.get("metrics", {}), vars(callbacks[MetricsTracker]), "metrics")
    assert_yaml_subset(raw.get("checkpoint", {}), vars(callbacks[FrameCheckpoint]), "checkpoint")

    # The default run folder is runs/<config stem>/<timestamp>/, and metrics.csv goes there.
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.parts[:2] == ("runs", config.stem)
    assert re.fullmatch(r"\d{4}_\d\d_\d\d_\d{6}", run_dir.parts[2])
    assert Path(cli.trainer.log_dir) == run_dir
    # Instantiating is not running: nothing is written yet.
    assert list(isolated_run.iterdir()) == []


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_applies_on_top_of_a_config(preset: Path) -> None:
    raw = yaml.safe_load(preset.read_text())
    cli = instantiate(["--config", str(PPO_CARTPOLE), "--config", str(preset)])

    assert type(cli.model) is PPO
    for key, value in raw.get("model", {}).get("init_args", {}).items():
        assert_yaml_subset(value, cli.model.hparams[key], f"model.init_args.{key}")
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    assert_yaml_subset(raw.get("metrics", {}), vars(callbacks[MetricsTracker]), "metrics")
    assert_yaml_subset(raw.get("checkpoint", {}), vars(callbacks[FrameCheckpoint]), "checkpoint")


# --- --help lists every hyperparameter with its doc ---------------------------------------------


def documented_args(cls: type) -> dict[str, str]:
    """``name -> doc`` from the Google-style ``Args:`` section of a class docstring."""
    docs: dict[str, str] = {}
    lines = inspect.getdoc(cls).splitlines()
    start = lines.index("Args:") + 1
    current = None
    for line in lines[start:]:
        if not line.strip():
            break
        if match := re.match(r"^    (\w+): (.*)$", line):
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] += " " + line.strip()
    return docs


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("cls", [PPO, A2C, Reinforce], ids=lambda c: c.__name__)
def test_model_help_lists_hyperparameters_with_docs(cls: type, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model.help", f"slm_lightning.algorithms.{cls.__name__}"])
    assert exc.value.code == 0
    out = squash(capsys.readouterr().out)

    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    docs = documented_args(cls)
    assert set(docs) == set(params), "the Args section and the signature disagree"
    for param in params:
        flag = "--model.env.name" if param == "env" else f"--model.{param} "
        assert flag in out, f"{flag} missing from --model.help"
        if param != "env":  # env is a group: its fields carry the docs
            assert squash(docs[param]) in out, f"doc of {param} missing: {docs[param]!r}"
    if cls is PPO:
        assert "--model.clip_eps CLIP_EPS surrogate clip range" in out
    assert "--model.env.num_envs" in out and "parallel copies per process" in out


def test_fit_help_lists_run_options(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = squash(capsys.readouterr().out)
    for flag, doc in [
        ("--metrics.log_frequency", "frames between two logged rows"),
        ("--checkpoint.every_n_frames", "frames between two checkpoints"),
        ("--ckpt_path", None),
        ("--model", None),
        ("--trainer.default_root_dir", None),
    ]:
        assert flag in out
        if doc:
            assert doc in out


# --- bad input: exit status 2, one line naming the key, nothing written -------------------------


class MultiBinaryActionEnv(gym.Env):
    """A Box-observation env whose actions no policy-gradient algorithm here supports."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.MultiBinary(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        return np.zeros(3, np.float32), 0.0, True, False, {}


@pytest.fixture
def multibinary_env():
    env_id = "SlmTestMultiBinaryAction-v0"
    gym.register(env_id, entry_point=MultiBinaryActionEnv, max_episode_steps=5)
    yield env_id
    gym.registry.pop(env_id, None)


def typo_config(tmp: Path) -> str:
    path = tmp / "inputs" / "typo.yaml"
    path.write_text(PPO_CARTPOLE.read_text().replace("gamma:", "gama:"))
    return str(path)


def corrupt_checkpoint(tmp: Path) -> str:
    path = tmp / "inputs" / "corrupt.ckpt"
    path.write_bytes(b"not a checkpoint\x00\xff" * 64)
    return str(path)


# (case id, extra arguments given the tmp dir, substrings the single error line must contain)
ERROR_CASES = [
    (
        "unknown-env-id",
        lambda t: ["--model.init_args.env.name=CartPol-v1"],
        ["env.name", "CartPole"],
    ),
    ("typo-key", lambda t: ["--model.init_args.gama=0.9"], ["model.init_args.gama", "gamma"]),
    ("typo-key-in-yaml", lambda t: ["--config", typo_config(t)], ["model.init_args.gama", "gamma"]),
    (
        "typo-nested-key",
        lambda t: ["--model.init_args.env.nm=CartPole-v1"],
        ["model.init_args.env.nm", "name"],
    ),
    ("max-frames-zero", lambda t: ["--model.init_args.max_frames=0"], ["max_frames", "> 0"]),
    (
        "max-frames-negative",
        lambda t: ["--model.init_args.max_frames=-1000"],
        ["max_frames", "> 0", "-1000"],
    ),
    ("torch-threads-zero", lambda t: ["--torch_threads=0"], ["torch_threads", ">= 1"]),
    (
        "missing-ckpt",
        lambda t: [f"--ckpt_path={t / 'inputs' / 'nope' / 'last.ckpt'}"],
        ["ckpt_path", "nope/last.ckpt"],
    ),
    (
        "corrupt-ckpt",
        lambda t: [f"--ckpt_path={corrupt_checkpoint(t)}"],
        ["ckpt_path", "corrupt.ckpt"],
    ),
    (
        "tuple-observations",
        lambda t: ["--model.init_args.env.name=Blackjack-v1"],
        ["PPO", "Blackjack-v1", "Box", "Tuple"],
    ),
    (
        "multibinary-actions",
        lambda t: ["--model.init_args.env.name=SlmTestMultiBinaryAction-v0"],
        ["PPO", "SlmTestMultiBinaryAction-v0", "MultiBinary", "Discrete", "Box"],
    ),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.usefixtures("multibinary_env")
@pytest.mark.parametrize(
    ("extra", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_bad_input_exits_with_one_line(extra, expected, isolated_run: Path, capsys) -> None:
    (isolated_run / "inputs").mkdir()
    # An earlier run already lives in the folder this command points at: it must stay intact.
    run_dir = isolated_run / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("earlier run\n")
    (run_dir / "metrics.csv").write_text("step\n1\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"earlier checkpoint")
    extra_args = extra(isolated_run)
    before = snapshot(isolated_run)

    args = ["fit", "--config", str(PPO_CARTPOLE), f"--trainer.default_root_dir={run_dir}"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--model.init_args.max_frames=256", *extra_args])

    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = ERROR_LINE.findall(captured.err)
    assert len(errors) == 1, captured.err
    line = errors[0]
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert snapshot(isolated_run) == before


@pytest.mark.parametrize(
    "extra",
    [["--model.init_args.gama=0.9"], ["--model.init_args.env.name=CartPol-v1"]],
    ids=["parse-error", "instantiate-error"],
)
def test_bad_input_creates_no_default_run_folder(extra, isolated_run: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(PPO_CARTPOLE), *extra])
    assert exc.value.code == 2
    assert list(isolated_run.iterdir()) == []


def test_torch_threads_option_sets_intra_op_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        instantiate(["--config", str(PPO_CARTPOLE), "--torch_threads=2"])
        assert torch.get_num_threads() == 2
        instantiate(["--config", str(PPO_CARTPOLE)])
        assert torch.get_num_threads() == 1  # the default: one thread for small policies
    finally:
        torch.set_num_threads(before)


def test_each_trainer_gets_its_own_run_summary(isolated_run: Path) -> None:
    # A RunSummary holds its run's summary: two trainers built in one process must not share.
    first, second = (instantiate(["--config", str(PPO_CARTPOLE)]) for _ in range(2))
    summaries = [
        [cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary)]
        for cli in (first, second)
    ]
    assert [len(found) for found in summaries] == [1, 1]
    assert summaries[0][0] is not summaries[1][0]


def test_extra_subcommands_are_dispatched_before_lightning(monkeypatch, capsys) -> None:
    from slm_lightning import cli as cli_module
    from slm_lightning.errors import ConfigError

    calls: list[list[str]] = []

    def trial(args: list[str]) -> None:
        calls.append(args)
        if "--sessions=0" in args:
            raise ConfigError("sessions must be >= 1, got 0")

    # The table names module:function; the module is imported only when the command runs.
    monkeypatch.setitem(sys.modules, "lab_commands", types.SimpleNamespace(trial=trial))
    monkeypatch.setitem(cli_module.EXTRA_SUBCOMMANDS, "trial", "lab_commands:trial")
    main(["trial", "--config", "configs/x.yaml"])
    assert calls == [["--config", "configs/x.yaml"]]
    with pytest.raises(SystemExit) as exc:
        main(["trial", "--sessions=0"])
    assert exc.value.code == 2
    assert ERROR_LINE.findall(capsys.readouterr().err) == ["sessions must be >= 1, got 0"]
    with pytest.raises(SystemExit) as exc:  # not in the table: LightningCLI's parser says no
        main(["trail"])
    assert exc.value.code == 2 and len(calls) == 2


def test_help_names_the_labs_commands(capsys) -> None:
    # LightningCLI lists its own subcommands only; the lab's are named under them.
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for command in ("trial (", "compare (", "search (", "import (", "slm-lab SPEC_FILE SPEC_NAME"):
        assert command in text, command
