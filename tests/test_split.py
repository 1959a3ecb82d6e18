"""Split envs (``env.num_splits``): groups stepped in turn give the data of the unsplit env.

A :class:`SplitVectorEnv` must step exactly as the vector env it splits (same seeds, same
actions, same observations, rewards, dones and episode statistics), whether its groups are
stepped together or one by one with ``send`` / ``recv``; and a rollout over a split env,
with a policy that does not sample, must store what the unsplit rollout stores.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from slm_lightning.data.evaluation import evaluation_env_spec
from slm_lightning.data.onpolicy_memory import OnPolicyMemory
from slm_lightning.data.onpolicy_rollout import OnPolicyRollout
from slm_lightning.data.returns import GAE
from slm_lightning.envs.blocks import BlockVectorEnv
from slm_lightning.envs.factory import make_vector_env
from slm_lightning.envs.spec import EnvSpec
from slm_lightning.envs.split import BackgroundStep, SplitVectorEnv, merge_infos
from slm_lightning.errors import ConfigError

SEED = 5
CONFIGS = Path(__file__).parents[1] / "configs"


def step_both(whole, split, actions: np.ndarray, one_by_one: bool) -> tuple[tuple, tuple]:
    """Step ``whole`` and ``split`` with ``actions``; the split env group by group or at once."""
    expected = whole.step(actions)
    if not one_by_one:
        return expected, split.step(actions)
    for group, part in enumerate(split.slices):
        split.send(group, actions[part])
    results = [split.recv(group) for group in range(len(split.slices))]
    merged = tuple(np.concatenate([result[k] for result in results]) for k in range(4))
    infos = merge_infos([result[4] for result in results], split.slices, split.num_envs)
    return expected, (*merged, infos)


@pytest.mark.parametrize(
    ("spec", "steps"),
    [
        # Games cut at 100 steps, so that truncations and resets happen.
        (EnvSpec(name="ALE/Pong-v5", num_envs=4, max_episode_steps=100), 300),
        (EnvSpec(name="CartPole-v1", num_envs=6, vectorization="blocks"), 300),
        (EnvSpec(name="CartPole-v1", num_envs=4, vectorization="async"), 200),
    ],
    ids=["ale", "blocks", "async"],
)
def test_split_env_steps_exactly_as_the_unsplit_env(spec: EnvSpec, steps: int) -> None:
    """Catches groups seeded alike (or not at their first sub-env's offset), results put in
    the wrong slice, a step started twice or never awaited, and lost episode statistics."""
    whole = make_vector_env(spec, seed=SEED)
    split = make_vector_env(EnvSpec(**{**vars(spec), "num_splits": 2}), seed=SEED)
    try:
        assert isinstance(split, SplitVectorEnv) and split.num_envs == spec.num_envs
        half = spec.num_envs // 2
        assert split.slices == [slice(0, half), slice(half, spec.num_envs)]
        rng = np.random.default_rng(0)
        episodes = 0
        for t in range(steps):
            actions = rng.integers(0, whole.single_action_space.n, spec.num_envs)
            expected, got = step_both(whole, split, actions, one_by_one=t % 3 != 0)
            for k, what in enumerate(("obs", "rewards", "terminated", "truncated")):
                np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{what} at {t}")
            if "_episode" in expected[4]:
                done = expected[4]["_episode"]
                episodes += int(done.sum())
                np.testing.assert_array_equal(got[4]["_episode"], done)
                for key in ("r", "l"):
                    np.testing.assert_array_equal(
                        got[4]["episode"][key][done], expected[4]["episode"][key][done]
                    )
            else:
                assert "_episode" not in got[4]
        assert episodes >= spec.num_envs  # every sub-env finished an episode at least once
    finally:
        whole.close()
        split.close()


def test_merge_infos_puts_each_group_in_its_slice() -> None:
    slices = [slice(0, 2), slice(2, 5)]
    infos = [
        {"lives": np.array([3, 2]), "episode": {"r": np.array([1.5, 0.0])},
         "_episode": np.array([True, False])},
        {"lives": np.array([1, 1, 0])},
    ]  # fmt: skip
    merged = merge_infos(infos, slices, 5)
    np.testing.assert_array_equal(merged["lives"], [3, 2, 1, 1, 0])
    np.testing.assert_array_equal(merged["_episode"], [True, False, False, False, False])
    np.testing.assert_array_equal(merged["episode"]["r"], [1.5, 0.0, 0.0, 0.0, 0.0])


def test_block_env_step_async_then_wait_is_a_step() -> None:
    fns = [lambda: __import__("gymnasium").make("CartPole-v1")] * 4
    a, b = BlockVectorEnv(fns, num_workers=2), BlockVectorEnv(fns, num_workers=2)
    try:
        np.testing.assert_array_equal(a.reset(seed=1)[0], b.reset(seed=1)[0])
        for t in range(50):
            actions = np.array([t % 2, 1, 0, (t // 3) % 2])
            expected = a.step(actions)
            b.step_async(actions)
            got = b.step_wait()
            for k in range(4):
                np.testing.assert_array_equal(got[k], expected[k])
    finally:
        a.close()
        b.close()


def test_background_step_refuses_a_second_start() -> None:
    env = make_vector_env(EnvSpec(name="CartPole-v1", num_envs=4, num_splits=2,
                                  vectorization="blocks"), seed=0)  # fmt: skip
    try:
        starter = env.starters[0]
        assert isinstance(starter, BackgroundStep)
        env.send(0, np.zeros(2, dtype=np.int64))
        with pytest.raises(RuntimeError, match="already under way"):
            starter.start(np.zeros(2, dtype=np.int64))
        env.recv(0)
    finally:
        env.close()


class DeterministicAgent:
    """A policy that does not sample: actions, log-probs, values and (recurrent) states are
    functions of the observations and of each env's own past, so a split rollout must store
    exactly what an unsplit one stores. It pushes the cart the way it already goes, so
    episodes end within tens of steps. The recurrent state is a decaying sum of the cart's
    position, zeroed where an episode starts."""

    def __init__(self, recurrent: bool) -> None:
        self.device = torch.device("cpu")
        self.max_frames = 10**9
        self.recurrent = recurrent

    def initial_state(self, num_envs: int) -> torch.Tensor | None:
        return torch.zeros(num_envs, 1) if self.recurrent else None

    def act(self, obs, state, episode_starts):
        if state is None:
            signal = obs[:, 0] + 0.5 * obs[:, 1]
            next_state = None
        else:
            state = torch.where(episode_starts[:, None], 0.0, state)
            next_state = 0.5 * state + obs[:, 0:1]
            signal = next_state[:, 0] + 0.5 * obs[:, 1]
        actions = (signal > 0).long()
        return actions, signal, obs[:, 0], next_state

    def bootstrap_values(self, obs, state, episode_starts):
        return obs[:, 0]

    def env_actions(self, actions):
        return actions


MEMORY_FIELDS = ("obs", "actions", "log_probs", "values", "rewards", "terminated", "truncated",
                 "valid", "advantages", "returns", "states", "episode_starts")  # fmt: skip


@pytest.mark.parametrize("recurrent", [False, True], ids=["feed-forward", "recurrent"])
def test_split_rollout_stores_what_the_unsplit_rollout_stores(recurrent: bool) -> None:
    """Catches a group's step stored in another group's columns or at the wrong time, a
    group's hidden state or episode starts taken from another group, and a frame clock
    that counts a group's step as a whole vector step."""
    n, horizon = 6, 16
    runs = []
    for splits in (1, 2):
        spec = EnvSpec(name="CartPole-v1", num_envs=n, vectorization="blocks", num_splits=splits)
        memory = OnPolicyMemory(
            horizon, n, (4,), np.float32, (), np.int64, GAE(0.99, 0.95), state_size=int(recurrent)
        )
        ds = OnPolicyRollout(
            DeterministicAgent(recurrent), spec, memory, seed=SEED, training_epochs=1,
            num_minibatches=1, sequence_length=4 if recurrent else None,
        )  # fmt: skip
        snaps = []
        try:
            for _ in range(5):  # 80 steps: CartPole episodes end and reset mid-rollout
                ds.collect()
                snaps.append({key: getattr(ds.memory, key).copy() for key in MEMORY_FIELDS})
            episodes = ds.episodes.drain()
            runs.append(
                (snaps, ds.frames, sorted(zip(episodes.returns, episodes.lengths, strict=True)))
            )
            assert isinstance(ds.env, SplitVectorEnv) == (splits == 2)
        finally:
            ds.close()
    (whole, whole_frames, whole_episodes), (split, split_frames, split_episodes) = runs
    assert split_frames == whole_frames == 5 * horizon * n
    assert whole_episodes and split_episodes == whole_episodes
    for rollout, (expected, got) in enumerate(zip(whole, split, strict=True)):
        for key in MEMORY_FIELDS:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key}, {rollout}")
    assert not all(expected["valid"].all() for expected in whole)  # resets happened


@pytest.mark.parametrize(
    ("spec_kwargs", "match"),
    [
        ({"num_envs": 6, "num_splits": 4}, r"env\.num_splits must divide num_envs 6"),
        ({"num_splits": 0}, r"env\.num_splits must be >= 1"),
        (
            {"num_envs": 4, "num_splits": 2},
            r"env\.num_splits: 2 needs envs that step in the background .* vector_entry_point",
        ),
        (
            {"num_envs": 4, "num_splits": 2, "vectorization": "blocks", "normalize_obs": True},
            r"env\.num_splits: 2 steps the groups one by one, and normalize_obs need",
        ),
    ],  # fmt: skip
    ids=["indivisible", "zero", "not-in-background", "normalised"],
)
def test_bad_num_splits_is_a_config_error(spec_kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_vector_env(EnvSpec(name="CartPole-v1", **spec_kwargs), seed=0)


def test_evaluation_and_baselines_step_unsplit() -> None:
    """Evaluation plays fewer envs than training (8 envs in 2 groups, 3 episodes: 3 envs),
    which no split could divide; it steps them unsplit."""
    spec = EnvSpec(name="ALE/Pong-v5", num_envs=8, num_splits=2)
    evaluation = evaluation_env_spec(spec, num_episodes=3)
    assert (evaluation.num_envs, evaluation.num_splits) == (3, 1)
    env = make_vector_env(evaluation, seed=0)
    try:
        assert not isinstance(env, SplitVectorEnv) and env.num_envs == 3
    finally:
        env.close()


def test_ppo_pong_fit_with_split_envs_counts_every_frame(run_fit, monkeypatch) -> None:
    received = []
    recv = SplitVectorEnv.recv
    monkeypatch.setattr(SplitVectorEnv, "recv", lambda env, g: received.append(g) or recv(env, g))
    run = run_fit(
        "--model.init_args.env.num_envs=4",
        "--model.init_args.env.num_splits=2",
        "--model.init_args.time_horizon=32",
        "--model.init_args.num_minibatches=2",
        "--model.init_args.training_epochs=1",
        "--model.init_args.max_frames=256",
        config=CONFIGS / "ppo_pong.yaml",
    )
    assert run.summary["frames"] == 256  # 2 rollouts of 2 groups x 2 envs x 32 steps
    assert received == [0, 1] * 64  # each group's steps received in turn
