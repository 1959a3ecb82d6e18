"""benchmarks/env_fps.py: the env a config trains on, stepped alone."""

import yaml

from benchmarks.env_fps import CONFIGS, env_fps, env_spec
from slm_lightning.envs.atari import AtariSpec
from slm_lightning.envs.spec import EnvSpec


def test_env_spec_is_the_configs_env_section_with_its_atari_options() -> None:
    """Catches the ``atari`` mapping passed on as a dict (the ale-py options would be lost)
    and settings of the section dropped."""
    section = yaml.safe_load((CONFIGS / "ppo_pong.yaml").read_text())["model"]["init_args"]["env"]
    spec = env_spec("ppo_pong")
    assert (spec.name, spec.num_envs) == (section["name"], section["num_envs"])
    assert isinstance(spec.atari, AtariSpec)
    for key, value in section["atari"].items():
        assert getattr(spec.atari, key) == value, key
    walker = env_spec("ppo_bipedalwalker")
    assert walker.normalize_obs and walker.normalize_reward and walker.num_envs == 32


def test_env_fps_counts_every_sub_env_frame() -> None:
    frames, fps = env_fps(EnvSpec("CartPole-v1", num_envs=4), seconds=0.2)
    assert frames > 0 and frames % 4 == 0
    assert fps > 0
