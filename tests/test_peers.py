"""``benchmarks/peers.py``: one settings dict reaches both sides, the episode statistics and
the table are right by hand, and ``configs/dqn_cartpole_zoo.yaml`` holds RL Zoo's values."""

import json
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers
from benchmarks.peers import CASES, PARAMS, Result, ours_overrides, sb3_kwargs
from tests.cli_helpers import instantiate

ROOT = Path(__file__).parents[1]
OFF_POLICY = [name for name, case in CASES.items() if case.settings]

# rl_zoo3 2.9.2 hyperparams/dqn.yml, CartPole-v1, copied by hand.
ZOO_DQN_CARTPOLE = {
    "n_timesteps": 50_000,
    "learning_rate": 2.3e-3,
    "batch_size": 64,
    "buffer_size": 100_000,
    "learning_starts": 1000,
    "gamma": 0.99,
    "target_update_interval": 10,
    "train_freq": 256,
    "gradient_steps": 128,
    "exploration_fraction": 0.16,
    "exploration_final_eps": 0.04,
    "net_arch": [256, 256],
}


def hparam(hparams: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        hparams = hparams[key]
    return hparams


# --- identical settings, by construction ---------------------------------------------------------


@pytest.mark.parametrize("name", OFF_POLICY)
def test_every_setting_reaches_our_module(name: str, isolated_run: Path) -> None:
    """Our config plus the case's overrides instantiates with every shared setting in place."""
    case = CASES[name]
    cli = instantiate(["--config", str(ROOT / case.config), *ours_overrides(case, 5000)])
    model = cli.model
    assert model.max_frames == 5000
    for key, value in case.settings.items():
        param = PARAMS[case.algo][key]
        expected = param.to_ours(value) if param.to_ours else value
        for ours in param.ours:
            actual = hparam(model.hparams, ours)
            if isinstance(expected, dict):
                actual = {k: actual[k] for k in expected}
            assert actual == expected, f"{name}: {ours}"
    metrics = next(cb for cb in cli.trainer.callbacks if hasattr(cb, "target_return"))
    assert metrics.target_return == case.target


def test_sac_case_gives_sb3_the_same_values() -> None:
    kwargs = sb3_kwargs(CASES["sac_pendulum_256"])
    assert kwargs == {
        "policy_kwargs": {"net_arch": [256, 256], "activation_fn": "relu"},
        "learning_rate": 1e-3,
        "batch_size": 256,
        "buffer_size": 100_000,
        "learning_starts": 1000,
        "train_freq": 1,
        "gradient_steps": 1,
        "tau": 0.005,
        "gamma": 0.99,
        "ent_coef": "auto_1.0",
    }
    assert sb3_kwargs(CASES["sac_pendulum_64"])["policy_kwargs"]["net_arch"] == [64, 64]


def test_dqn_case_gives_sb3_the_zoo_values() -> None:
    zoo = ZOO_DQN_CARTPOLE
    case = CASES["dqn_cartpole_zoo"]
    assert case.frames == zoo["n_timesteps"]
    kwargs = sb3_kwargs(case)
    assert kwargs["policy_kwargs"]["net_arch"] == zoo["net_arch"]
    for key in ZOO_DQN_CARTPOLE.keys() - {"n_timesteps", "net_arch"}:
        assert kwargs[key] == pytest.approx(zoo[key]), key
    assert kwargs["max_grad_norm"] == 10.0 and kwargs["n_steps"] == 1
    # A shorter run keeps the zoo's anneal in frames: 0.16 of 50k frames is twice 4k frames.
    assert sb3_kwargs(case, 4000)["exploration_fraction"] == pytest.approx(2.0)


def test_one_setting_changes_both_sides() -> None:
    case = CASES["sac_pendulum_64"]
    changed = replace(case, settings=case.settings | {"lr": 5e-4, "batch_size": 32})
    assert sb3_kwargs(changed)["learning_rate"] == 5e-4
    assert sb3_kwargs(changed)["batch_size"] == 32
    overrides = ours_overrides(changed)
    for key in ("actor_lr", "critic_lr", "alpha_lr"):
        assert f"--model.init_args.{key}=0.0005" in overrides
    assert "--model.init_args.batch_size=32" in overrides


def test_a_setting_without_a_row_or_beyond_sb3_is_refused() -> None:
    case = CASES["dqn_cartpole_zoo"]
    unknown = replace(case, settings=case.settings | {"dueling": True})
    with pytest.raises(KeyError, match="dueling"):
        ours_overrides(unknown)
    with pytest.raises(KeyError, match="dueling"):
        sb3_kwargs(unknown)
    with pytest.raises(ValueError, match="double"):
        sb3_kwargs(replace(case, settings=case.settings | {"double": True}))


def test_dqn_zoo_config_holds_the_zoo_values(isolated_run: Path) -> None:
    """The shipped config alone, without peers.py's overrides, is RL Zoo's DQN."""
    cli = instantiate(["--config", str(ROOT / "configs/dqn_cartpole_zoo.yaml")])
    model, zoo = cli.model, ZOO_DQN_CARTPOLE
    assert model.env_spec.name == "CartPole-v1" and model.env_spec.num_envs == 1
    assert model.max_frames == zoo["n_timesteps"]
    assert model.hparams["net"]["hidden_sizes"] == zoo["net_arch"]
    assert model.hparams["net"]["activation"] == "relu"
    assert model.hparams["lr"] == zoo["learning_rate"]
    assert model.batch_size == zoo["batch_size"]
    assert model.hparams["memory_size"] == zoo["buffer_size"]
    assert model.learning_starts == zoo["learning_starts"]
    assert model.gamma == zoo["gamma"]
    assert model.target_update_frequency == zoo["target_update_interval"]
    assert model.tau is None  # hard copies, as SB3's tau=1.0
    assert model.training_frequency == zoo["train_freq"]
    assert model.updates_per_step == zoo["gradient_steps"]
    epsilon = model.epsilon
    assert (epsilon.start, epsilon.end) == (1.0, zoo["exploration_final_eps"])
    assert epsilon.end_frame == zoo["exploration_fraction"] * zoo["n_timesteps"]
    assert (model.loss, model.max_grad_norm, model.n_steps) == ("huber", 10.0, 1)
    assert model.double_q is False
    # and the case's overrides add nothing to it
    for key, value in CASES["dqn_cartpole_zoo"].settings.items():
        param = PARAMS["dqn"][key]
        expected = param.to_ours(value) if param.to_ours else value
        actual = hparam(model.hparams, param.ours[0])
        if isinstance(expected, dict):
            actual = {k: actual[k] for k in expected}
        assert actual == expected, key


# --- episode statistics and the result line ------------------------------------------------------


def test_episode_stats_by_hand() -> None:
    episodes = [(10, 1.0, 1.0), (20, 2.0, 5.0), (30, 3.0, 3.0), (40, 4.0, 7.0), (50, 5.0, 2.0)]
    # windows of 3: MAs 3.0 (frame 30), 5.0 (40), 4.0 (50); a partial window never counts
    # although its mean (3.0 at frame 20) passes 3.
    stats = peers.episode_stats(episodes, target=3.0, window=3)
    assert stats == {
        "episodes": 5,
        "frames_to_target": 30,
        "seconds_to_target": 3.0,
        "return_ma": 4.0,
    }
    assert peers.episode_stats(episodes, target=4.5, window=3)["frames_to_target"] == 40
    assert peers.episode_stats(episodes, target=6.0, window=3)["frames_to_target"] is None
    short = peers.episode_stats(episodes[:2], target=None, window=3)
    assert short["return_ma"] == 3.0 and short["frames_to_target"] is None
    assert peers.episode_stats([], target=1.0)["return_ma"] is None


def test_result_line_round_trip() -> None:
    line = "peer=sb3 algo=sac frames=3000 seconds=12.5 return_ma=-1210.3 frames_to_target=never"
    fields = peers.parse_result_line(line)
    assert fields == {
        "peer": "sb3",
        "algo": "sac",
        "frames": 3000,
        "seconds": 12.5,
        "return_ma": -1210.3,
        "frames_to_target": None,
    }
    assert isinstance(fields["frames"], int)
    assert peers.parse_result_line(peers.result_line(fields)) == fields
    with pytest.raises(ValueError, match="key=value"):
        peers.parse_result_line("peer=sb3 net=[256, 256]")


def run(frames: int, seconds: float, ma: float | None, to: int | None, to_s: float | None):
    return Result(frames, seconds, ma, to, to_s)


def test_table_row_by_hand() -> None:
    case = CASES["sac_pendulum_256"]
    ours = [run(3000, 10.0, -150.0, 2000, 5.0), run(3000, 12.0, -180.0, None, None)]
    ours.append(run(3000, 15.0, -160.5, 2500, 9.0))
    sb3 = [run(3000, 30.0, -170.0, None, None), run(3000, 25.0, -300.0, None, None)]
    sb3.append(run(3000, 20.0, -190.0, 2800, 20.0))
    cells = [c.strip() for c in peers.table_row(case, ours, sb3).strip("|").split("|")]
    # fps medians 250 (ours: 300, 250, 200) and 120 (SB3: 100, 120, 150), ratio 2.08
    assert cells[2:5] == ["250", "120", "2.08x"]
    assert cells[5:8] == ["-150.0 / -180.0 / -160.5", "-170.0 / -300.0 / -190.0", "-200"]
    # medians with never as infinite: ours 2500 frames and 9.0 s; SB3's never
    assert cells[8:] == ["2500 f, 9.0 s", "never"]
    assert len(cells) == peers.TABLE_HEADER.splitlines()[0].count("|") - 1


def test_run_sb3_passes_the_kwargs_and_reads_the_last_line(tmp_path: Path) -> None:
    """A stand-in interpreter records its arguments and prints a result line."""
    argv_file = tmp_path / "argv.json"
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\n"
        "print('noise')\n"
        "print('peer=sb3 frames=4096 seconds=2.0 return_ma=-900.5 frames_to_target=never "
        "seconds_to_target=never')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    case = CASES["dqn_cartpole_zoo"]
    result = peers.run_sb3(case, seed=3, frames=4000, python=fake)
    assert result == Result(4096, 2.0, -900.5, None, None) and result.fps == 2048
    argv = json.loads(argv_file.read_text())
    assert argv[0] == str(peers.SB3_SCRIPT)
    assert argv[argv.index("--seed") + 1] == "3" and argv[argv.index("--frames") + 1] == "4000"
    assert json.loads(argv[argv.index("--kwargs") + 1]) == sb3_kwargs(case, 4000)
    ppo = peers.run_sb3(CASES["ppo_cartpole"], seed=0, frames=None, python=fake)
    assert ppo.frames == 4096
    argv = json.loads(argv_file.read_text())
    assert "--zoo" in argv and "--kwargs" not in argv


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "0"], "--frames must be >= 1, got 0"),
        (["--sb3-python", "/nonexistent/python"], "--sb3-python: /nonexistent/python is not"),
        (["--case", "sac_pendulum"], "invalid choice: 'sac_pendulum'"),
    ],
)
def test_bad_input_exits_2(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/peers.py"), *args],
        capture_output=True,
        text=True,
        env={"PEERS": "/nonexistent", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert message in proc.stderr
