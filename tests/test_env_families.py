"""One env of each family through our factory: gymnasium's env checker, and short training
runs on MuJoCo and Box2D that complete with the frame clock and raw returns reported."""

from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from slm_lightning.envs import CARTPOLE_NO_VELOCITY_ID
from slm_lightning.envs.factory import EnvSpec, make_single_env, probe_spaces
from slm_lightning.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "spec",
    [
        EnvSpec("CartPole-v0"),  # classic control, through the legacy-name migration
        EnvSpec("LunarLander-v3", frame_stack=4),  # Box2D, stacked as in ddqn_per_lunar
        EnvSpec("LunarLanderContinuous-v2"),  # legacy id: LunarLander-v3, continuous=True
        EnvSpec("BipedalWalker-v3", max_episode_steps=50),
        EnvSpec("RoboschoolHopper-v1"),  # MuJoCo v5 through the Roboschool migration
        EnvSpec(CARTPOLE_NO_VELOCITY_ID),  # our POMDP CartPole
    ],
    ids=lambda spec: spec.name,
)
def test_factory_env_passes_gymnasium_env_checker(spec: EnvSpec, isolated_run: Path) -> None:
    env = make_single_env(spec)
    try:
        check_env(env.unwrapped if spec.frame_stack == 1 else env, skip_render_check=True)
        assert (env.observation_space, env.action_space) == probe_spaces(spec)
        if spec.max_episode_steps is not None:
            env.reset(seed=0)
            steps = 0
            truncated = terminated = False
            while not (terminated or truncated):
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                steps += 1
            assert steps <= spec.max_episode_steps
    finally:
        env.close()
    # MuJoCo's compiler warnings go to the log, not a MUJOCO_LOG.TXT in the working directory.
    assert not list(isolated_run.glob("MUJOCO_LOG*"))


def test_continuous_lunar_migration_keeps_continuous_actions() -> None:
    _, action_space = probe_spaces(EnvSpec("LunarLanderContinuous-v2"))
    assert action_space.shape == (2,)
    assert np.all(action_space.high == 1.0)


def test_single_env_refuses_atari_ids() -> None:
    with pytest.raises(ConfigError, match="native vector env"):
        make_single_env(EnvSpec("ALE/Pong-v5"))


# (config, extra arguments making the run short); every run must finish its frame budget.
SHORT_RUNS = [
    ("ppo_hopper", ["--model.init_args.time_horizon=32", "--model.init_args.max_frames=512"]),
    (
        "sac_hopper",
        [
            "--model.init_args.learning_starts=64",
            "--model.init_args.batch_size=32",
            "--model.init_args.max_frames=160",
        ],
    ),
    (
        "crossq_hopper",
        [
            "--model.init_args.learning_starts=64",
            "--model.init_args.batch_size=32",
            "--model.init_args.max_frames=160",
        ],
    ),
    (
        "ppo_bipedalwalker",
        ["--model.init_args.time_horizon=16", "--model.init_args.max_frames=512"],
    ),
]


@pytest.mark.parametrize(("config", "extra"), SHORT_RUNS, ids=[run[0] for run in SHORT_RUNS])
def test_short_run_completes(config: str, extra: list[str], isolated_run: Path, run_fit) -> None:
    run = run_fit("--metrics.log_frequency=64", *extra, config=CONFIGS / f"{config}.yaml")
    run_dir, summary = run.run_dir, run.summary
    budget = int(next(arg for arg in extra if "max_frames" in arg).split("=")[1])
    assert budget <= summary["frames"] < budget + 16 * 32  # overshoot below one rollout
    assert summary["start_frames"] == 0
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "rollout/fps" in header
    assert any(key.startswith("train/") and key.endswith("loss") for key in header), header
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(isolated_run.glob("MUJOCO_LOG*"))
