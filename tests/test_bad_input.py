"""Bad input: one line naming the key as the user typed it and what is allowed, exit status 2,
and no run folder; integer counts accept SLM Lab's ``1e7`` notation."""

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from slm_lightning.cli import TOP_LEVEL_OPTIONS, main
from tests.cli_helpers import instantiate

ROOT = Path(__file__).parents[1]
PPO_CARTPOLE = str(ROOT / "configs" / "ppo_cartpole.yaml")
WANDB_PRESET = str(ROOT / "callbacks" / "wandb.yaml")
FIT = ["fit", "--config", PPO_CARTPOLE, "--model.init_args.max_frames=256"]
# EnvSpec has more than 12 keys: with a close match the message leaves the list out.
ENV_SPEC_KEYS = "unknown key for EnvSpec; did you mean num_envs?"
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR\s+(.*)$", re.MULTILINE)


def write(tmp: Path, name: str, text: str) -> str:
    path = tmp / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def wandb_online_without_login(tmp: Path, monkeypatch) -> list[str]:
    """W&B set to log online on a machine with no API key anywhere (environment, netrc,
    settings file); the base URL is a closed local port, so a network attempt fails at once."""
    home = tmp / "home"
    home.mkdir()
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    return [*FIT, "--config", WANDB_PRESET]


def read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot write. Root ignores permission bits, so as root (as in
    some containers) use /proc/sys, where not even root creates files."""
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder if not os.access(folder, os.W_OK) else Path("/proc/sys")


def read_only_run_dir(tmp: Path, monkeypatch) -> list[str]:
    return [*FIT, f"--trainer.default_root_dir={read_only_dir(tmp) / 'run'}"]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

Args = Callable[[Path, pytest.MonkeyPatch], list[str]]


def case(name: str, args: Args, expected: str | re.Pattern, marks=()) -> object:
    """A bad input: the command line given the test's tmp dir and monkeypatch, and the error
    line expected (a string to match exactly, or a pattern)."""
    return pytest.param(args, expected, id=name, marks=marks)


CASES = [
    case(
        "int-given-a-word",
        lambda t, m: [*FIT, "--model.init_args.time_horizon", "sixteen"],
        "model.init_args.time_horizon: expected an integer, got 'sixteen'",
    ),
    case(
        "int-given-a-fraction",
        lambda t, m: [*FIT, "--model.init_args.env.num_envs", "8.5"],
        "model.init_args.env.num_envs: expected an integer, got 8.5",
    ),
    case(
        "count-given-a-fraction",
        lambda t, m: [*FIT, "--model.init_args.max_frames", "2.5e0"],
        "model.init_args.max_frames: expected an integer > 0 (1e6 notation allowed), got '2.5e0'",
    ),
    case(
        "bad-vectorization",
        lambda t, m: [*FIT, "--model.init_args.env.vectorization", "fast"],
        "model.init_args.env.vectorization: 'fast' is not allowed; "
        "choose one of auto, sync, async, blocks, vector_entry_point",
    ),
    case(
        "bad-recurrent-cell",
        lambda t, m: [*FIT, "--model.init_args.recurrent.cell", "rnn"],
        "model.init_args.recurrent.cell: 'rnn' is not allowed; choose one of gru, lstm",
    ),
    case(
        "unknown-class-path",
        lambda t, m: [*FIT, "--model", "slm_lightning.algorithms.PPOO"],
        re.compile(
            r"model: unknown class_path slm_lightning\.algorithms\.PPOO; did you mean "
            r"slm_lightning\.algorithms\.PPO\? choose one of A2C, (\w+, )*PPO(, \w+)* "
            r"\(in slm_lightning\.algorithms\)"
        ),
    ),
    case(
        "typo-in-yaml-env-section",
        lambda t, m: [
            *FIT,
            "--config",
            write(t, "env.yaml", "model:\n  init_args:\n    env:\n      num_env: 4\n"),
        ],
        f"model.init_args.env.num_env: {ENV_SPEC_KEYS}",
    ),
    case(
        "typo-in-nested-net-spec",
        lambda t, m: [*FIT, "--model.init_args.actor.activaton", "relu"],
        "model.init_args.actor.activaton: unknown key for MLPSpec; did you mean activation? "
        "accepted: hidden_sizes, activation",
    ),
    case(
        "mistyped-top-level-option",
        lambda t, m: [*FIT, "--ckpt", "last"],
        re.compile(
            r"--ckpt: unknown option; did you mean --ckpt_path\? options: --config, "
            r"(--\w+, )*--ckpt_path(, --\w+)*"
        ),
    ),
    # argparse would expand these prefixes to max_epochs / num_envs and run with them.
    case(
        "abbreviated-trainer-key",
        lambda t, m: [*FIT, "--trainer.max_epoch=3"],
        "trainer.max_epoch: unknown key for Trainer; did you mean max_epochs, min_epochs, "
        "max_steps?",
    ),
    case(
        "abbreviated-key-in-nested-dataclass",
        lambda t, m: [*FIT, "--model.init_args.env.num_env=4"],
        f"model.init_args.env.num_env: {ENV_SPEC_KEYS}",
    ),
    case(
        "abbreviated-key-in-validate",
        lambda t, m: [
            "validate",
            "--config",
            PPO_CARTPOLE,
            "--ckpt_path=last",
            "--model.init_args.env.num_env",
            "4",
        ],
        f"model.init_args.env.num_env: {ENV_SPEC_KEYS}",
    ),
    case(
        "abbreviated-key-in-test",
        lambda t, m: ["test", "--config", PPO_CARTPOLE, "--metrics.log_freq", "100"],
        re.compile(
            r"metrics\.log_freq: unknown key for MetricsTracker; did you mean log_frequency\?.*"
        ),
    ),
    case(
        "abbreviated-key-in-trial",
        lambda t, m: [
            "trial",
            "--config",
            PPO_CARTPOLE,
            "--seeds",
            "0",
            "--model.init_args.env.num_env=4",
        ],
        f"model.init_args.env.num_env: {ENV_SPEC_KEYS}",
    ),
    case(
        "abbreviated-key-in-search",
        lambda t, m: [
            "search",
            "--config",
            PPO_CARTPOLE,
            "--space",
            write(t, "space.yaml", "model.init_args.lr:\n  choice: [0.01, 0.001]\n"),
            "--trials",
            "2",
            "--model.init_args.env.num_env=4",
        ],
        f"model.init_args.env.num_env: {ENV_SPEC_KEYS}",
    ),
    case(
        "typo-in-init-arg",
        lambda t, m: [*FIT, "--model.init_args.lr_shedule=0.1"],
        re.compile(r"model\.init_args\.lr_shedule: unknown key for PPO; accepted: env, .*"),
    ),
    case(
        "zero-width-hidden-layer",
        lambda t, m: [*FIT, "--model.init_args.actor.hidden_sizes", "[64, 0]"],
        "model.init_args.actor.hidden_sizes must all be >= 1, got [64, 0]",
    ),
    case(
        "zero-width-recurrent-core",
        lambda t, m: [*FIT, "--model.init_args.recurrent.hidden_size", "0"],
        "model.init_args.recurrent.hidden_size must be >= 1, got 0",
    ),
    case(
        "more-minibatches-than-transitions",
        lambda t, m: [*FIT, "--model.init_args.num_minibatches", "100000"],
        "model.init_args.num_minibatches (100000) exceeds the rollout size "
        "time_horizon x model.init_args.env.num_envs = 1024",
    ),
    case(
        "typo-in-schedule",
        lambda t, m: [
            *FIT,
            "--config",
            write(t, "lr.yaml", "model:\n  init_args:\n    lr: {start: 0.001, ned: 0.0}\n"),
        ],
        "model.init_args.lr.ned: unknown key for Schedule; did you mean end? "
        "accepted: start, end, start_frame, end_frame, kind",
    ),
    case(
        "schedule-ending-before-it-starts",
        lambda t, m: [
            *FIT,
            "--model.init_args.lr={start: 0.001, end: 0.0, start_frame: 100, end_frame: 50}",
        ],
        "model.init_args.lr: schedule end_frame (50) must exceed start_frame (100)",
    ),
    case(
        "exponential-schedule-to-zero",
        lambda t, m: [
            *FIT,
            "--model.init_args.entropy_coef={start: 0.01, end: 0.0, kind: exponential}",
        ],
        "model.init_args.entropy_coef: an exponential schedule needs start and end > 0, "
        "got 0.01, 0.0",
    ),
    case(
        "negative-lr",
        lambda t, m: [*FIT, "--model.init_args.lr", "-1"],
        "model.init_args.lr: must be >= 0, got -1",
    ),
    case(
        "log-frequency-zero",
        lambda t, m: [*FIT, "--metrics.log_frequency", "0"],
        "metrics.log_frequency: must be > 0, got 0",
    ),
    case(
        "checkpoint-every-zero",
        lambda t, m: [*FIT, "--checkpoint.every_n_frames", "0"],
        "checkpoint.every_n_frames: must be > 0, got 0",
    ),
    case(
        "env-kwarg-the-env-lacks",
        lambda t, m: [*FIT, "--model.init_args.env.kwargs", "{foo: 1}"],
        "model.init_args.env.kwargs: CartPole-v1 does not take foo; its constructor takes "
        "max_episode_steps, render_mode, sutton_barto_reward",
    ),
    case(
        "gpu-without-a-gpu",
        lambda t, m: [*FIT, "--trainer.accelerator", "gpu"],
        "trainer.accelerator=gpu: torch sees no such device on this machine; "
        "use --trainer.accelerator cpu (or auto, which takes a GPU where there is one)",
        marks=NO_GPU,
    ),
    case(
        "wandb-online-without-login",
        wandb_online_without_login,
        "trainer.logger: W&B logs online but this machine is not logged in: run "
        "`uv run wandb login` once, or set WANDB_MODE=offline to log locally "
        "(`wandb sync` uploads later)",
    ),
    case(
        "read-only-run-folder",
        read_only_run_dir,
        re.compile(
            r"trainer\.default_root_dir: cannot write the run folder (/\S+)/run: \1 is not "
            r"writable; pass a writable folder with --trainer\.default_root_dir"
        ),
    ),
    case(
        "empty-yaml",
        lambda t, m: ["fit", "--config", write(t, "empty.yaml", "")],
        re.compile(
            r"--config /\S+/inputs/empty\.yaml: the file is empty; "
            r"a config is a YAML mapping \(model:, trainer:, …\)"
        ),
    ),
    case(
        "preset-without-config",
        lambda t, m: ["fit", "--config", WANDB_PRESET],
        f"model: no algorithm is set; {WANDB_PRESET} is a preset that adds to a config: give "
        f"the config first, e.g. slm-lab fit --config configs/ppo_cartpole.yaml "
        f"--config {WANDB_PRESET}",
    ),
]


@pytest.mark.parametrize(("args", "expected"), CASES)
def test_bad_input_gets_one_line_and_status_2(
    args: Args, expected: str | re.Pattern, isolated_run: Path, monkeypatch, capsys
) -> None:
    argv = args(isolated_run, monkeypatch)
    before = sorted(p.relative_to(isolated_run) for p in isolated_run.rglob("*"))

    with pytest.raises(SystemExit) as exc:
        main(argv)

    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = ERROR_LINE.findall(captured.err)
    assert len(errors) == 1, captured.err
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(errors[0]), errors[0]
    else:
        assert errors[0] == expected
    assert not (isolated_run / "runs").exists()
    assert sorted(p.relative_to(isolated_run) for p in isolated_run.rglob("*")) == before


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_the_options_listed_for_a_typo_are_the_subcommands_own(subcommand: str, capsys) -> None:
    """TOP_LEVEL_OPTIONS against ``slm-lab SUBCOMMAND --help``. Catches the list drifting from
    the parser: an option added to the CLI but not listed, or one listed that is gone."""
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    shown = set(re.findall(r"^\s+(?:-\w \w+, )?--(\w+)", capsys.readouterr().out, re.MULTILINE))
    listed = set(TOP_LEVEL_OPTIONS)
    # help and verbose (validate / test) are not run settings; data is Lightning's datamodule
    # slot, which no algorithm uses.
    assert listed - shown == set()
    assert shown - listed <= {"help", "data", "verbose"}


def test_full_keys_set_what_they_name(isolated_run: Path) -> None:
    # The keys whose prefixes the abbreviation cases above type, given in full.
    cli = instantiate(
        [
            "--config",
            PPO_CARTPOLE,
            "--trainer.max_epochs=3",
            "--model.init_args.env.num_envs=4",
            "--metrics.log_frequency",
            "100",
        ]
    )

    assert cli.trainer.max_epochs == 3
    assert cli.model.env_spec.num_envs == 4
    callbacks = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    assert callbacks["MetricsTracker"].log_frequency == 100


def test_counts_accept_integral_scientific_notation(isolated_run: Path) -> None:
    config = write(
        isolated_run,
        "counts.yaml",
        "model:\n  init_args:\n    max_frames: 1e7\n"
        "    lr: {start: 1.0e-3, end: 0.0, end_frame: 5.0e+6}\n"
        "checkpoint:\n  every_n_frames: 2.5e4\n",
    )
    cli = instantiate(
        ["--config", PPO_CARTPOLE, "--config", config, "--metrics.log_frequency", "2e4"]
    )

    assert cli.model.max_frames == 10_000_000 and type(cli.model.max_frames) is int
    assert cli.model.hparams.lr["end_frame"] == 5_000_000  # a schedule arrives as a dict
    assert type(cli.model.hparams.lr["end_frame"]) is int
    callbacks = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    assert callbacks["MetricsTracker"].log_frequency == 20_000
    assert type(callbacks["MetricsTracker"].log_frequency) is int
    assert callbacks["FrameCheckpoint"].every_n_frames == 25_000
    # The saved config holds plain integers (not 1e7, not a float).
    dumped = yaml.safe_load(cli.parser.dump(cli.config))
    assert dumped["model"]["init_args"]["max_frames"] == 10_000_000
    assert dumped["metrics"]["log_frequency"] == 20_000


def test_count_types_show_in_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "slm_lightning.algorithms.PPO"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.max_frames MAX_FRAMES training budget" in out
    assert "(type: PositiveCount, default: 1000000)" in out
    assert "(type: NonNegativeFloat | Schedule, default: 0.0003)" in out
