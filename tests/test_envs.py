"""Env factory: legacy ids, bad ids, vectorization choice, seeding, normalisation state."""

import os

import gymnasium as gym
import numpy as np
import pytest

from slm_lightning.envs import factory
from slm_lightning.envs.factory import (
    ConfigError,
    EnvSpec,
    block_workers,
    make_vector_env,
    probe_spaces,
    resolve_vectorization,
)
from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.normalization import (
    freeze_normalizers,
    load_normalizer_state,
    normalizer_state,
)


@pytest.mark.parametrize(
    ("legacy", "current"),
    [
        ("CartPole-v0", "CartPole-v1"),
        ("LunarLander-v2", "LunarLander-v3"),
        ("Pendulum-v0", "Pendulum-v1"),
        ("Acrobot-v0", "Acrobot-v1"),
        ("BipedalWalker-v2", "BipedalWalker-v3"),
        ("BipedalWalkerHardcore-v2", "BipedalWalkerHardcore-v3"),
        ("PongNoFrameskip-v4", "ALE/Pong-v5"),
        ("BreakoutNoFrameskip-v4", "ALE/Breakout-v5"),
        ("SpaceInvadersNoFrameskip-v4", "ALE/SpaceInvaders-v5"),
        ("RoboschoolHopper-v1", "Hopper-v5"),
        ("RoboschoolHalfCheetah-v1", "HalfCheetah-v5"),
        ("RoboschoolWalker2d-v1", "Walker2d-v5"),
        ("RoboschoolAnt-v1", "Ant-v5"),
        ("RoboschoolHumanoid-v1", "Humanoid-v5"),
    ],
)
def test_legacy_ids_migrate(legacy, current):
    # NoFrameskip-v4 had no sticky actions and the minimal action set; v5 has sticky actions.
    v4 = {"repeat_action_probability": 0.0, "full_action_space": False}
    assert migrate_env_id(legacy) == (current, v4 if current.startswith("ALE/") else {})
    assert EnvSpec(name=legacy).env_id == current


def test_lunar_lander_continuous_migrates_with_kwarg():
    assert migrate_env_id("LunarLanderContinuous-v2") == ("LunarLander-v3", {"continuous": True})


@pytest.mark.parametrize("name", ["CartPole-v1", "ALE/Pong-v5", "Hopper-v5", "MyCustomEnv-v0"])
def test_current_ids_are_unchanged(name):
    assert migrate_env_id(name) == (name, {})


def test_legacy_id_builds_the_new_env():
    env = make_vector_env(EnvSpec(name="CartPole-v0", num_envs=2), seed=0)
    try:
        assert env.unwrapped.spec.id == "CartPole-v1"
    finally:
        env.close()


@pytest.mark.parametrize(
    ("name", "suggestion"), [("CartPol-v1", "CartPole"), ("Pendulm-v1", "Pendulum")]
)
def test_unknown_id_is_a_config_error_with_suggestion(name, suggestion):
    with pytest.raises(ConfigError) as info:
        make_vector_env(EnvSpec(name=name, num_envs=1))
    message = str(info.value)
    assert message.startswith("model.init_args.env.name")
    assert f"Did you mean: `{suggestion}`" in message
    assert "\n" not in message


def test_unknown_version_is_a_config_error():
    with pytest.raises(ConfigError, match=r"env\.name.*v9"):
        EnvSpec(name="CartPole-v9").registry_spec()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_envs", 0),
        ("max_episode_steps", 0),
        ("num_envs", -3),
        ("num_workers", 0),
    ],
)
def test_bad_spec_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=rf"env\.{field}"):
        EnvSpec(**{field: value})


def test_vectorization_auto():
    cartpole = EnvSpec(name="CartPole-v1", num_envs=4)
    pendulum = EnvSpec(name="Pendulum-v1", num_envs=4)
    assert resolve_vectorization(cartpole, cartpole.registry_spec()) == "vector_entry_point"
    assert resolve_vectorization(pendulum, pendulum.registry_spec()) == "sync"


def test_vectorization_auto_blocks_only_for_costly_envs_with_cores(monkeypatch):
    costly = EnvSpec(name="BipedalWalker-v3", num_envs=16)
    cheap = EnvSpec(name="Pendulum-v1", num_envs=16)
    monkeypatch.setattr(factory, "usable_cores", lambda: 2)
    assert resolve_vectorization(costly, costly.registry_spec()) == "blocks"
    assert block_workers(costly) == 2
    assert resolve_vectorization(cheap, cheap.registry_spec()) == "sync"
    few = EnvSpec(name="BipedalWalker-v3", num_envs=3)
    assert resolve_vectorization(few, few.registry_spec()) == "sync"
    monkeypatch.setattr(factory, "usable_cores", lambda: 16)
    assert block_workers(costly) == 8  # at least two sub-envs per worker
    assert block_workers(EnvSpec(name="BipedalWalker-v3", num_envs=16, num_workers=3)) == 3
    assert block_workers(EnvSpec(name="BipedalWalker-v3", num_envs=2, num_workers=3)) == 2
    monkeypatch.setattr(factory, "usable_cores", lambda: 1)
    assert resolve_vectorization(costly, costly.registry_spec()) == "sync"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_auto_vectorization_follows_the_cores_this_process_may_use():
    """A trial pins each session to its share of the cores: a session on one core steps its
    envs in-process, even on a machine with many."""
    costly = EnvSpec(name="BipedalWalker-v3", num_envs=16)
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert factory.usable_cores() == 1
        assert resolve_vectorization(costly, costly.registry_spec()) == "sync"
    finally:
        os.sched_setaffinity(0, cores)
    assert factory.usable_cores() == len(cores)


@pytest.mark.parametrize("mode", ["sync", "async", "blocks", "vector_entry_point"])
def test_explicit_vectorization_is_kept(mode):
    spec = EnvSpec(name="CartPole-v1", vectorization=mode)
    assert resolve_vectorization(spec, spec.registry_spec()) == mode


@pytest.mark.parametrize(
    ("name", "frame_stack", "why"),
    [("Pendulum-v1", 1, "no vector_entry_point"), ("CartPole-v1", 2, "frame_stack > 1")],
)
def test_vector_entry_point_the_env_lacks_falls_back_to_auto(
    name, frame_stack, why, warnings_logged
):
    spec = EnvSpec(
        name=name, num_envs=2, vectorization="vector_entry_point", frame_stack=frame_stack
    )
    env = make_vector_env(spec, seed=0)
    try:
        assert isinstance(env.unwrapped, gym.vector.SyncVectorEnv)  # auto's choice for both
        assert env.observation_space.shape[0] == 2
    finally:
        env.close()
    assert warnings_logged == [
        f"model.init_args.env.vectorization=vector_entry_point: {name} has {why}; "
        "using sync (auto's choice)"
    ]


def test_probe_spaces():
    obs_space, act_space = probe_spaces(EnvSpec(name="CartPole-v1"))
    assert obs_space.shape == (4,)
    assert act_space == gym.spaces.Discrete(2)
    obs_space, act_space = probe_spaces(EnvSpec(name="Pendulum-v1"))
    assert obs_space.shape == (3,)
    assert act_space.shape == (1,)


def rollout(env, actions) -> tuple[np.ndarray, ...]:
    obs0, _ = env.reset(seed=123)
    observations, rewards, terminated, truncated = [obs0], [], [], []
    for action in actions:
        obs, reward, term, trunc, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        terminated.append(term)
        truncated.append(trunc)
    return tuple(np.array(x) for x in (observations, rewards, terminated, truncated))


@pytest.mark.parametrize(
    ("name", "max_steps"),
    [("Pendulum-v1", 20), ("CartPole-v1", None)],
)
def test_sync_and_async_agree(name, max_steps):
    runs = []
    for mode in ("sync", "async"):
        spec = EnvSpec(name=name, num_envs=3, vectorization=mode, max_episode_steps=max_steps)
        env = make_vector_env(spec, seed=7)
        try:
            expected = gym.vector.AsyncVectorEnv if mode == "async" else gym.vector.SyncVectorEnv
            assert isinstance(env.unwrapped, expected)
            env.action_space.seed(0)
            actions = [env.action_space.sample() for _ in range(50)]
            runs.append(rollout(env, actions))
        finally:
            env.close()
    sync, async_ = runs
    for a, b in zip(sync, async_, strict=True):
        np.testing.assert_array_equal(a, b)
    # The 50 steps crossed an episode boundary (so autoreset was compared too).
    assert (sync[2] | sync[3]).any()


def first_obs(seed: int, name: str = "Pendulum-v1") -> np.ndarray:
    env = make_vector_env(EnvSpec(name=name, num_envs=3), seed=seed)
    try:
        return env.reset()[0]  # unseeded: continues from the seeding done by the factory
    finally:
        env.close()


@pytest.mark.parametrize("name", ["Pendulum-v1", "CartPole-v1"])
def test_seeding(name):
    a, b, c = first_obs(1, name), first_obs(1, name), first_obs(2, name)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Sub-envs are seeded differently from each other.
    assert not np.array_equal(a[0], a[1])


def pendulum(normalize: bool = True):
    spec = EnvSpec(
        name="Pendulum-v1",
        num_envs=2,
        vectorization="sync",
        normalize_obs=normalize,
        normalize_reward=normalize,
    )
    return make_vector_env(spec, seed=0)


def step_n(env, n: int) -> None:
    for _ in range(n):
        env.step(env.action_space.sample())


def assert_states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) == {"obs_rms", "return_rms"}
    for key in a:
        np.testing.assert_array_equal(a[key]["mean"], b[key]["mean"])
        np.testing.assert_array_equal(a[key]["var"], b[key]["var"])
        assert a[key]["count"] == b[key]["count"]


def test_normalizer_state_round_trip():
    env, fresh = pendulum(), pendulum()
    try:
        step_n(env, 30)
        state = normalizer_state(env)
        # Statistics really moved away from a fresh env's.
        assert state["obs_rms"]["count"] > normalizer_state(fresh)["obs_rms"]["count"]
        assert not np.allclose(state["obs_rms"]["mean"], 0.0)
        assert state["return_rms"]["var"] != pytest.approx(1.0)
        load_normalizer_state(fresh, state)
        assert_states_equal(normalizer_state(fresh), state)
        # The saved state is a copy: stepping the source env does not change it.
        step_n(env, 5)
        assert_states_equal(normalizer_state(fresh), state)
        # Frozen, both envs normalise the same raw observation identically.
        freeze_normalizers(env)
        freeze_normalizers(fresh)
        load_normalizer_state(env, state)
        np.testing.assert_array_equal(env.reset(seed=3)[0], fresh.reset(seed=3)[0])
    finally:
        env.close()
        fresh.close()


def test_normalizer_state_mismatch_raises():
    plain, normalized = pendulum(normalize=False), pendulum()
    try:
        assert normalizer_state(plain) == {}
        with pytest.raises(ValueError, match="normalize_obs"):
            load_normalizer_state(plain, normalizer_state(normalized))
    finally:
        plain.close()
        normalized.close()


def test_freeze_normalizers():
    env = pendulum()
    try:
        step_n(env, 5)
        freeze_normalizers(env)
        before = normalizer_state(env)
        step_n(env, 10)
        assert_states_equal(normalizer_state(env), before)
        freeze_normalizers(env, frozen=False)
        step_n(env, 10)
        after = normalizer_state(env)
        assert after["obs_rms"]["count"] > before["obs_rms"]["count"]
        assert after["return_rms"]["count"] > before["return_rms"]["count"]
    finally:
        env.close()


@pytest.mark.parametrize("vectorization", ["auto", "sync"])
def test_episode_returns_are_raw_under_reward_normalization(vectorization):
    spec = EnvSpec(
        name="CartPole-v1",
        num_envs=4,
        vectorization=vectorization,
        normalize_obs=True,
        normalize_reward=True,
    )
    env = make_vector_env(spec, seed=0)
    try:
        env.action_space.seed(0)
        returns, lengths, scaled = [], [], []
        for _ in range(200):
            _, reward, _, _, info = env.step(env.action_space.sample())
            scaled.append(reward)
            if "_episode" in info:
                done = info["_episode"]
                returns.extend(info["episode"]["r"][done])
                lengths.extend(info["episode"]["l"][done])
        # The rewards the agent sees are normalised (not all 1) ...
        assert not np.allclose(np.concatenate(scaled), 1.0)
        # ... but every CartPole reward is 1, so the raw return equals the length.
        assert len(returns) >= 4
        np.testing.assert_array_equal(returns, np.asarray(lengths, dtype=float))
        assert min(lengths) > 0
    finally:
        env.close()


# --- clip_obs / clip_reward ----------------------------------------------------------------------

HUGE_ID = "SlmTestHugeValues-v0"


class HugeValuesEnv(gym.Env):
    """Observation ``[x, -x, 0.5]`` and reward ``+-x`` (sign alternating by step), where ``x`` is
    0 for the first 20 steps of an episode and 1e6 after: values far outside any clip range,
    and, once normalised, a jump of several standard deviations."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _x(self) -> float:
        return 0.0 if self.t < 20 else 1e6

    def _obs(self) -> np.ndarray:
        return np.array([self._x(), -self._x(), 0.5])

    def step(self, action):
        self.t += 1
        reward = self._x() if self.t % 2 else -self._x()
        return self._obs(), reward, self.t >= 30, False, {}


@pytest.fixture
def huge_env_id():
    gym.register(HUGE_ID, entry_point=HugeValuesEnv)
    yield HUGE_ID
    gym.registry.pop(HUGE_ID, None)


def huge_rollout(spec: EnvSpec, steps: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Observations ``(steps, num_envs, 3)`` and rewards ``(steps, num_envs)`` of ``spec``."""
    env = make_vector_env(spec, seed=0)
    try:
        observations, rewards = [], []
        for _ in range(steps):
            obs, reward, *_ = env.step(np.zeros(spec.num_envs, np.int64))
            observations.append(obs)
            rewards.append(reward)
        return np.array(observations), np.array(rewards)
    finally:
        env.close()


def test_clip_raw_observations_and_rewards_to_the_bounds_exactly(huge_env_id):
    spec = EnvSpec(huge_env_id, num_envs=2, vectorization="sync", clip_obs=5.0,
                   clip_reward=(-1.0, 2.0))  # fmt: skip
    obs, rewards = huge_rollout(spec)
    # Steps 20-25: x = 1e6 -> [5, -5, 0.5]; rewards +1e6 (odd steps) -> 2, -1e6 -> -1.
    np.testing.assert_array_equal(obs[19:], np.broadcast_to([5.0, -5.0, 0.5], (6, 2, 3)))
    np.testing.assert_array_equal(obs[:19], np.broadcast_to([0.0, -0.0, 0.5], (19, 2, 3)))
    np.testing.assert_array_equal(rewards[19:, 0], [-1.0, 2.0, -1.0, 2.0, -1.0, 2.0])
    assert obs.dtype == np.float64


def test_clipping_comes_after_normalisation(huge_env_id):
    plain = EnvSpec(huge_env_id, num_envs=2, vectorization="sync", normalize_obs=True,
                    normalize_reward=True)  # fmt: skip
    clipped = EnvSpec(huge_env_id, num_envs=2, vectorization="sync", normalize_obs=True,
                      normalize_reward=True, clip_obs=3.0, clip_reward=2.0)  # fmt: skip
    (obs, rewards), (clipped_obs, clipped_rewards) = huge_rollout(plain), huge_rollout(clipped)
    # The jump to 1e6 is more than 3 (2) running standard deviations: clipping bites ...
    assert np.abs(obs).max() > 3.0 and np.abs(rewards).max() > 2.0
    # ... on the normalised values, whose statistics saw the raw ones (clipping the raw
    # values first would leave nothing near the bounds after normalisation).
    np.testing.assert_array_equal(clipped_obs, np.clip(obs, -3.0, 3.0))
    np.testing.assert_array_equal(clipped_rewards, np.clip(rewards, -2.0, 2.0))
    assert clipped_obs.max() == 3.0 and clipped_rewards.max() == 2.0


def test_no_clipping_by_default(huge_env_id):
    spec = EnvSpec(huge_env_id, num_envs=2, vectorization="sync")
    assert spec.clip_obs is None and spec.clip_reward is None
    obs, rewards = huge_rollout(spec)
    np.testing.assert_array_equal(obs[19:, :, 0], 1e6)
    np.testing.assert_array_equal(np.abs(rewards[19:]), 1e6)
    env = make_vector_env(spec, seed=0)
    wrappers = []
    while env is not None:
        wrappers.append(type(env).__name__)
        env = getattr(env, "env", None)
    assert wrappers[:2] == ["RecordEpisodeStatistics", "SyncVectorEnv"]


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("clip_obs", 0.0, "a number > 0 or a pair [lo, hi], got 0.0"),
        ("clip_obs", -10.0, "a number > 0 or a pair [lo, hi], got -10.0"),
        ("clip_reward", (1.0, -1.0), "a number > 0 or a pair [lo, hi] with lo < hi, got [1.0, -1.0]"),
        ("clip_reward", (1.0, 1.0), "a number > 0 or a pair [lo, hi] with lo < hi, got [1.0, 1.0]"),
    ],
)  # fmt: skip
def test_bad_clip_bounds_are_config_errors(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        EnvSpec(**{field: value})
    assert str(err.value) == f"model.init_args.env.{field} must be {allowed}"
