"""BlockVectorEnv: the same transitions as gymnasium's SyncVectorEnv, NEXT_STEP autoresets,
gymnasium's vector wrappers on top, worker errors and shutdown, and a short training run."""

import os
import signal
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.error import ClosedEnvironmentError
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from slm_lightning.envs.blocks import BlockVectorEnv, WorkerError
from slm_lightning.envs.factory import EnvSpec, make_vector_env
from slm_lightning.envs.workers import usable_cores

CONFIGS = Path(__file__).parents[1] / "configs"
BOOM = 9  # CountingEnv raises on this action


class CountingEnv(gym.Env):
    """Observation = steps since reset; the episode terminates after ``length`` steps. Odd
    steps report an ``info`` (scalar, array and nested dict), so merging is exercised."""

    def __init__(self, length: int = 3) -> None:
        self.length = length
        self.observation_space = spaces.Box(0, 100, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(10)
        self.count = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        self.count = 0
        return self._obs(), {"reset_seed": -1 if seed is None else seed}

    def step(self, action: Any) -> tuple:
        if action == BOOM:
            raise ValueError("boom")
        self.count += 1
        info = {}
        if self.count % 2:
            info = {"count": self.count, "pair": np.full(2, action), "nested": {"x": 0.5}}
        return self._obs(), float(action), self.count >= self.length, False, info

    def _obs(self) -> np.ndarray:
        return np.array([self.count, self.np_random.uniform()], dtype=np.float32)


def assert_same(a: Any, b: Any) -> None:
    """Equal values and dtypes, through tuples and (nested) info dicts."""
    if isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def compare_with_sync(env_fns: list, actions: list, num_workers: int) -> np.ndarray:
    """Step a BlockVectorEnv and a SyncVectorEnv side by side; return the dones seen."""
    blocks, sync = BlockVectorEnv(env_fns, num_workers=num_workers), SyncVectorEnv(env_fns)
    dones = []
    try:
        assert blocks.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        assert blocks.single_observation_space == sync.single_observation_space
        assert blocks.observation_space == sync.observation_space
        assert blocks.action_space == sync.action_space
        assert_same(blocks.reset(seed=5), sync.reset(seed=5))
        for action in actions:
            expected = sync.step(action)
            assert_same(blocks.step(action), expected)
            dones.append(expected[2] | expected[3])
        # A seeded reset mid-episode, then a partial one (reset_mask), also match.
        mask = np.arange(len(env_fns)) % 2 == 0
        assert_same(blocks.reset(seed=11), sync.reset(seed=11))
        assert_same(
            blocks.reset(options={"reset_mask": mask}), sync.reset(options={"reset_mask": mask})
        )
        assert_same(blocks.step(actions[0]), sync.step(actions[0]))
    finally:
        blocks.close()
        sync.close()
    return np.array(dones)


@pytest.mark.parametrize(
    ("name", "kwargs", "steps"),
    [
        ("CartPole-v1", {"max_episode_steps": 12}, 300),
        ("LunarLander-v3", {"max_episode_steps": 60}, 200),
        ("LunarLander-v3", {"max_episode_steps": 60, "continuous": True}, 200),  # Box actions
    ],
)
def test_same_transitions_as_sync(name: str, kwargs: dict, steps: int) -> None:
    env_fns = [partial(gym.make, name, **kwargs)] * 5
    space = env_fns[0]().action_space
    rngs = [np.random.default_rng(t) for t in range(steps)]
    if isinstance(space, spaces.Discrete):
        actions = [rng.integers(0, space.n, size=5) for rng in rngs]
    else:
        actions = [rng.uniform(-1, 1, size=(5, *space.shape)).astype(space.dtype) for rng in rngs]
    dones = compare_with_sync(env_fns, actions, num_workers=2)  # blocks of 2 and 3 sub-envs
    assert dones.sum() >= 10  # many episode ends, so autoresets were compared


def test_same_infos_as_sync() -> None:
    env_fns = [partial(CountingEnv, length) for length in (2, 3, 4, 5)]
    actions = [np.full(4, t % 4) for t in range(30)]
    # compare_with_sync asserts equal observations, rewards, flags and merged infos each step.
    dones = compare_with_sync(env_fns, actions, num_workers=3)
    assert dones[:, 0].sum() >= 10  # the 2-step env ended many times: its infos were compared


def test_next_step_autoreset_ignores_the_action() -> None:
    env = BlockVectorEnv([partial(CountingEnv, 2)] * 4, num_workers=2)
    try:
        obs, info = env.reset(seed=0)
        np.testing.assert_array_equal(info["reset_seed"], [0, 1, 2, 3])  # seed + i
        np.testing.assert_array_equal(env.step(np.full(4, 1))[0][:, 0], 1)
        obs, reward, terminated, truncated, _ = env.step(np.full(4, 2))
        np.testing.assert_array_equal(obs[:, 0], 2)
        assert terminated.all() and reward.tolist() == [2.0] * 4
        # The next step resets: its action (here one that would raise) is never used.
        obs, reward, terminated, truncated, info = env.step(np.full(4, BOOM))
        np.testing.assert_array_equal(obs[:, 0], 0)
        assert not terminated.any() and not truncated.any() and not reward.any()
        np.testing.assert_array_equal(info["reset_seed"], -1)  # an unseeded reset's info
        np.testing.assert_array_equal(env.step(np.full(4, 1))[0][:, 0], 1)
    finally:
        env.close()


def test_gymnasium_wrappers_on_top_match_sync() -> None:
    """RecordEpisodeStatistics and the normalisers see the same stream through both modes."""
    outputs = []
    for mode in ("sync", "blocks"):
        spec = EnvSpec(
            name="CartPole-v1",
            num_envs=4,
            num_workers=2,
            vectorization=mode,
            max_episode_steps=20,
            normalize_obs=True,
            normalize_reward=True,
        )
        env = make_vector_env(spec, seed=3)
        try:
            assert isinstance(env.unwrapped, BlockVectorEnv if mode == "blocks" else SyncVectorEnv)
            stream = [env.reset(seed=3)]
            rng = np.random.default_rng(0)
            stream += [env.step(rng.integers(0, 2, size=4)) for _ in range(60)]
            for *_, info in stream:
                info.get("episode", {}).pop("t", None)  # wall-clock episode time
            outputs.append(stream)
        finally:
            env.close()
    assert_same(outputs[0], outputs[1])
    returns = [info["episode"]["r"][info["_episode"]] for *_, info in outputs[1] if info]
    assert len(np.concatenate(returns)) >= 4  # episode statistics were recorded and compared


def test_worker_exception_surfaces_and_closes() -> None:
    env = BlockVectorEnv([CountingEnv] * 4, num_workers=2)
    env.reset(seed=0)
    with pytest.raises(WorkerError, match=r"sub-env 3 raised ValueError: boom"):
        env.step(np.array([0, 0, 0, BOOM]))
    assert env.closed
    assert not any(process.is_alive() for process in env.processes)
    with pytest.raises(ClosedEnvironmentError):
        env.step(np.zeros(4, dtype=int))


def test_killed_worker_is_reported() -> None:
    env = BlockVectorEnv([CountingEnv] * 4, num_workers=2)
    env.reset(seed=0)
    os.kill(env.processes[1].pid, signal.SIGKILL)
    env.processes[1].join(5)
    with pytest.raises(WorkerError, match=r"worker 1 died"):
        env.step(np.zeros(4, dtype=int))
    assert env.closed


def fails_outside(parent_pid: int) -> CountingEnv:
    """A CountingEnv in this process (the spaces probe), an error in a worker."""
    if os.getpid() != parent_pid:
        raise RuntimeError("no display")
    return CountingEnv()


def test_worker_construction_error_surfaces() -> None:
    with pytest.raises(WorkerError, match=r"raised RuntimeError: no display"):
        BlockVectorEnv([partial(fails_outside, os.getpid())] * 2, num_workers=2)


def test_call_get_attr_set_attr_reach_every_sub_env() -> None:
    env = BlockVectorEnv([partial(CountingEnv, length) for length in (2, 3, 4)], num_workers=2)
    try:
        assert env.get_attr("length") == (2, 3, 4)
        env.set_attr("length", [7, 8, 9])
        assert env.get_attr("length") == (7, 8, 9)
        env.set_attr("length", 1)
        env.reset(seed=0)
        assert env.step(np.zeros(3, dtype=int))[2].all()  # every episode now lasts one step
    finally:
        env.close()


def test_close_terminates_workers() -> None:
    env = BlockVectorEnv([CountingEnv] * 3)
    assert env.num_workers == min(usable_cores(), 3)
    processes = list(env.processes)
    env.reset()
    env.close()
    assert not any(process.is_alive() for process in processes)
    env.close()  # idempotent


def test_fit_with_blocks_completes(run_fit) -> None:
    summary = run_fit(
        "--model.init_args.env.vectorization=blocks",
        "--model.init_args.env.num_envs=4",
        "--model.init_args.env.num_workers=2",
        "--model.init_args.max_frames=1024",
        "--metrics.log_frequency=256",
        config=CONFIGS / "ppo_cartpole.yaml",
    ).summary
    assert summary["frames"] >= 1024
