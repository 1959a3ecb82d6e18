"""The random baseline: its key, the shipped table, the user's cache, and the measurement
against hand-played episodes."""

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from slm_lightning.envs.spec import AtariSpec, EnvSpec
from slm_lightning.lab import baseline
from slm_lightning.lab.baseline import (
    baseline_key,
    measure_random_return,
    random_return,
    shipped_baselines,
)

STEPS_ID = "BaselineSteps-v0"


class StepsEnv(gym.Env):
    """Episodes of ``1 + 3 * (s % 10)`` steps paying 1 each, where ``s`` is the seed of the
    first reset, so in a vector env the return depends on the sub-env index (sub-env ``i`` is
    seeded ``seed + i``) and short episodes finish first."""

    observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self) -> None:
        self.length: int | None = None
        self.t = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.length = 1 + 3 * (seed % 10)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t >= self.length, False, {}


if STEPS_ID not in gym.registry:
    gym.register(STEPS_ID, entry_point=StepsEnv)


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's cache file, under tmp_path."""
    monkeypatch.setenv("SLM_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "random_baselines.json"


@pytest.fixture
def measurements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the measurement by one returning 12.5 and recording the env measured."""
    calls: list[str] = []

    def measure(spec: EnvSpec, episodes: int = 100, seed: int = 0) -> float:
        calls.append(spec.env_id)
        return 12.5

    monkeypatch.setattr(baseline, "measure_random_return", measure)
    return calls


def test_key_ignores_what_leaves_returns_alone_and_follows_what_changes_them() -> None:
    plain = baseline_key(EnvSpec("CartPole-v1"))
    assert plain == baseline_key(
        EnvSpec(
            "CartPole-v1",
            num_envs=64,
            vectorization="sync",
            num_workers=2,
            normalize_obs=True,
            normalize_reward=True,
            frame_stack=4,
        )
    )
    assert plain == baseline_key(EnvSpec("CartPole-v0"))  # migrated to v1
    assert plain == baseline_key(EnvSpec("CartPole-v1", max_episode_steps=500))  # registered
    assert plain != baseline_key(EnvSpec("CartPole-v1", max_episode_steps=100))
    assert plain != baseline_key(EnvSpec("CartPole-v1", kwargs={"sutton_barto_reward": True}))
    assert baseline_key(EnvSpec("LunarLanderContinuous-v2")) == baseline_key(
        EnvSpec("LunarLander-v3", kwargs={"continuous": True})
    )
    assert baseline_key(EnvSpec("LunarLander-v3")) != baseline_key(
        EnvSpec("LunarLander-v3", kwargs={"continuous": True})
    )


def test_atari_key_holds_the_game_settings_only() -> None:
    pong = baseline_key(EnvSpec("ALE/Pong-v5"))
    same_game = AtariSpec(stack_num=2, episodic_life=True, reward_clipping=False, num_threads=3)
    assert pong == baseline_key(EnvSpec("ALE/Pong-v5", num_envs=3, atari=same_game))
    for changed in ({"repeat_action_probability": 0.0}, {"full_action_space": True},
                    {"frameskip": 2}, {"noop_max": 0}):  # fmt: skip
        assert pong != baseline_key(EnvSpec("ALE/Pong-v5", atari=AtariSpec(**changed)))
    # The legacy id plays v5 without sticky actions, whatever env.atari says.
    assert baseline_key(EnvSpec("PongNoFrameskip-v4")) == baseline_key(
        EnvSpec("ALE/Pong-v5", atari=AtariSpec(repeat_action_probability=0.0))
    )


def test_shipped_values_cover_the_configs_and_are_used_without_measuring(
    monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    def measure(*args: object, **kwargs: object) -> float:
        raise AssertionError("a shipped baseline was measured")

    monkeypatch.setattr(baseline, "measure_random_return", measure)
    shipped = shipped_baselines()
    cartpole = shipped[baseline_key(EnvSpec("CartPole-v1"))]
    assert cartpole["env"] == "CartPole-v1" and 15 < cartpole["return"] < 30
    assert random_return(EnvSpec("CartPole-v1", num_envs=64)) == cartpole["return"]
    pong = EnvSpec("ALE/Pong-v5", num_envs=8, atari=AtariSpec(episodic_life=True))
    assert random_return(pong) == shipped[baseline_key(pong)]["return"]
    assert not user_cache.exists()


def test_an_unshipped_env_is_measured_once_then_read_from_the_cache(
    measurements: list[str], user_cache: Path
) -> None:
    spec = EnvSpec("CartPole-v1", max_episode_steps=50)
    other = EnvSpec("CartPole-v1", max_episode_steps=60)
    assert math.isnan(random_return(spec, measure=False))
    assert measurements == []
    assert random_return(spec) == 12.5
    assert random_return(EnvSpec("CartPole-v1", max_episode_steps=50, num_envs=3)) == 12.5
    assert random_return(spec, measure=False) == 12.5
    assert measurements == ["CartPole-v1"]
    entry = json.loads(user_cache.read_text())[baseline_key(spec)]
    assert entry["env"] == "CartPole-v1" and entry["return"] == 12.5
    assert entry["episodes"] == 100 and len(entry["measured"]) == len("2026-01-31")
    assert math.isnan(random_return(other, measure=False))


def test_a_value_cached_by_another_process_while_measuring_is_kept(
    monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    mine, theirs = (
        EnvSpec("CartPole-v1", max_episode_steps=50),
        EnvSpec("Pendulum-v1", kwargs={"g": 9.0}),
    )

    def measure(spec: EnvSpec, episodes: int = 100, seed: int = 0) -> float:
        # Another trial finishes its own measurement and writes the cache meanwhile.
        baseline.write_baselines(
            user_cache, {baseline_key(theirs): {"env": "Pendulum-v1", "return": -3.0}}
        )
        return 12.5

    monkeypatch.setattr(baseline, "measure_random_return", measure)
    assert random_return(mine) == 12.5
    assert random_return(theirs, measure=False) == -3.0
    assert random_return(mine, measure=False) == 12.5


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_corrupt_cache_is_a_warning_and_a_measurement(
    content: str, measurements: list[str], user_cache: Path, warnings_logged: list[str]
) -> None:
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text(content)
    spec = EnvSpec("CartPole-v1", max_episode_steps=50)
    assert random_return(spec) == 12.5
    assert measurements == ["CartPole-v1"]
    assert len(warnings_logged) == 1 and str(user_cache) in warnings_logged[0]
    assert json.loads(user_cache.read_text())[baseline_key(spec)]["return"] == 12.5


def hand_played_returns(
    env_id: str, max_episode_steps: int, num_envs: int, per_env: int, seed: int
) -> list[float]:
    """``per_env`` episodes of each of ``num_envs`` plain envs, played as gymnasium's sync
    vector env with NEXT_STEP autoreset plays them: sub-env ``i`` seeded ``seed + i``, one batch
    of actions drawn per step from the batched action space seeded ``seed``, and the step after
    an episode's end a reset whose action is ignored."""
    envs = [gym.make(env_id, max_episode_steps=max_episode_steps) for _ in range(num_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
    single = envs[0].action_space
    actions_space = spaces.Box(
        np.repeat(single.low[None], num_envs, 0), np.repeat(single.high[None], num_envs, 0)
    )
    actions_space.seed(seed)
    finished: list[list[float]] = [[] for _ in envs]
    running, resetting = [0.0] * num_envs, [False] * num_envs
    while any(len(f) < per_env for f in finished):
        actions = actions_space.sample()
        for i, env in enumerate(envs):
            if resetting[i]:
                env.reset()
                running[i], resetting[i] = 0.0, False
                continue
            _, reward, terminated, truncated, _ = env.step(actions[i])
            running[i] += float(reward)
            if terminated or truncated:
                finished[i].append(running[i])
                resetting[i] = True
    return [r for f in finished for r in f[:per_env]]


def test_measurement_equals_hand_played_episodes() -> None:
    spec = EnvSpec("Pendulum-v1", num_envs=16, max_episode_steps=7, normalize_reward=True)
    expected = hand_played_returns("Pendulum-v1", 7, num_envs=3, per_env=2, seed=5)
    measured = measure_random_return(spec, episodes=6, seed=5, num_envs=3)
    assert measured == pytest.approx(np.mean(expected), rel=1e-12)


@pytest.mark.parametrize(
    ("episodes", "lengths"),
    [(10, [1, 1, 4, 4, 7, 7, 10, 10, 13, 13]), (7, [1, 1, 4, 4, 7, 10, 13])],
)
def test_every_sub_env_contributes_its_share_of_episodes(episodes: int, lengths: list[int]) -> None:
    # Sub-env i plays episodes of 1 + 3i steps; taking the first episodes to finish would
    # average mostly sub-env 0's single steps.
    measured = measure_random_return(EnvSpec(STEPS_ID), episodes=episodes, seed=0, num_envs=5)
    assert measured == pytest.approx(np.mean(lengths))


def test_cartpole_measurement_is_in_the_random_range_and_seeded() -> None:
    first = measure_random_return(EnvSpec("CartPole-v1"), episodes=20, seed=1)
    assert 15 < first < 32  # 100-episode mean ~22, standard deviation of one episode ~12
    assert measure_random_return(EnvSpec("CartPole-v1", num_envs=3), episodes=20, seed=1) == first
    assert measure_random_return(EnvSpec("CartPole-v1"), episodes=20, seed=2) != first
