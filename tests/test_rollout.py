"""OnPolicyRollout on a counting env: exact transitions, masks, minibatches, resume state.

The counting env's observation is ``[marker, step_count]``, so every stored transition can be
checked exactly: within an episode the next observation is the same marker with the count
plus one, and an episode boundary shows up as the masked NEXT_STEP autoreset slot.
"""

import random
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers.vector import NormalizeObservation, RecordEpisodeStatistics

from slm_lightning.checkpoints import WarmStartNormalizers
from slm_lightning.data import vector_rollout as rollout_module
from slm_lightning.data.onpolicy_memory import OnPolicyBatch, OnPolicyMemory
from slm_lightning.data.onpolicy_rollout import OnPolicyRollout
from slm_lightning.data.returns import GAE
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.envs.normalization import normalizer_state

ENV_ID = "SlmTestCounting-v0"


class CountingEnv(gym.Env):
    """Observation ``[marker, count]``, constant reward; terminates at ``terminate_at`` if given.

    Truncation comes from gymnasium's TimeLimit (``max_episode_steps``). ``nan_at`` makes the
    observation at that count non-finite.
    """

    def __init__(self, marker=0.0, terminate_at=None, nan_at=None, reward=1.0):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.marker, self.terminate_at, self.nan_at = marker, terminate_at, nan_at
        self.reward = reward
        self.count = 0

    def _obs(self) -> np.ndarray:
        obs = np.array([self.marker, self.count], dtype=np.float32)
        if self.count == self.nan_at:
            obs[1] = np.nan
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.count = 0
        return self._obs(), {}

    def step(self, action):
        self.count += 1
        terminated = self.terminate_at is not None and self.count >= self.terminate_at
        return self._obs(), self.reward, terminated, False, {}


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=CountingEnv)

# Per sub-env: episode length and whether the episode ends by termination (else truncation).
LENGTHS = (3, 4, 5)
TERMINATES = (True, False, True)
# Rewards differ from 1 for one env so that returns and lengths cannot be confused.
REWARD = (1.0, 1.0, 0.5)
N = len(LENGTHS)
SEED = 11


def counting_vector_env(nan_at: int | None = None):
    def make(i: int):
        kwargs = {"marker": float(i), "reward": REWARD[i], "disable_env_checker": True}
        if TERMINATES[i]:
            kwargs["terminate_at"] = LENGTHS[i]
        else:
            kwargs["max_episode_steps"] = LENGTHS[i]
        if i == N - 1:
            kwargs["nan_at"] = nan_at
        return lambda: gym.make(ENV_ID, **kwargs)

    env = SyncVectorEnv([make(i) for i in range(N)], autoreset_mode=AutoresetMode.NEXT_STEP)
    return RecordEpisodeStatistics(env)


@pytest.fixture
def env_seeds(monkeypatch):
    """Route the rollout's make_vector_env to the 3-env counting env; record the seeds."""
    seeds = []

    def fake_make_vector_env(spec, seed=None, gamma=0.99):
        seeds.append(seed)
        env = counting_vector_env(nan_at=spec.kwargs.get("nan_at"))
        return NormalizeObservation(env) if spec.normalize_obs else env

    monkeypatch.setattr(rollout_module, "make_vector_env", fake_make_vector_env)
    return seeds


class CountingGAE:
    """GAE(0.99, 0.95) that counts how often the memory computes returns."""

    def __init__(self) -> None:
        self.calls = 0

    def estimate(self, rollout):
        self.calls += 1
        return GAE(0.99, 0.95).estimate(rollout)


class FakeAgent:
    """Action 0, value ``count / 2``; the log-prob slot carries the flat slot id ``t * N + i``."""

    def __init__(self, max_frames: int = 10**9):
        self.device = torch.device("cpu")
        self.max_frames = max_frames
        self.t = 0
        self.estimator = CountingGAE()

    @property
    def returns_calls(self) -> int:
        return self.estimator.calls

    def initial_state(self, num_envs):
        return None

    def act(self, obs, state, episode_starts):
        assert state is None and episode_starts is None  # feed-forward
        n = obs.shape[0]
        slot_ids = torch.arange(n, dtype=torch.float32) + self.t * n
        self.t += 1
        return torch.zeros(n, dtype=torch.int64), slot_ids, obs[:, 1] / 2, None

    def bootstrap_values(self, obs, state, episode_starts):
        self.t = 0  # the rollout's end: the next one numbers its slots from 0 again
        return obs[:, 1] / 2

    def env_actions(self, actions):
        return actions


def minibatches(ds: OnPolicyRollout) -> list:
    """Roll out once and draw every minibatch of the round it yields, as training does."""
    return [batch for round_ in ds for batch in round_]


def make_dataset(agent=None, time_horizon=7, epochs=2, minibatches=3, **spec_kwargs):
    agent = agent or FakeAgent()
    spec = EnvSpec(name=ENV_ID, num_envs=N, **spec_kwargs)
    memory = OnPolicyMemory(time_horizon, N, (2,), np.float32, (), np.int64, agent.estimator)
    return OnPolicyRollout(
        agent,
        spec,
        memory,
        seed=SEED,
        training_epochs=epochs,
        num_minibatches=minibatches,
    )


FIELDS = ("obs", "values", "rewards", "terminated", "truncated", "valid", "next_values")


def collect_rollouts(ds, count: int) -> dict[str, np.ndarray]:
    """Collect ``count`` rollouts; their memories concatenated along time, plus final obs."""
    snaps = {key: [] for key in FIELDS}
    for k in range(count):
        ds.collect()
        assert ds.frames == (k + 1) * ds.time_horizon * N
        assert ds.agent.returns_calls == k + 1
        for key in FIELDS:
            snaps[key].append(np.copy(getattr(ds.memory, key)))
    out = {key: np.concatenate(value) for key, value in snaps.items()}
    out["next_obs"] = np.concatenate([out["obs"][1:], ds.obs[None]])
    return out


def phase(g: int, i: int) -> int:
    """Count shown at global step ``g`` of sub-env ``i`` (``LENGTHS[i]`` = the masked slot)."""
    return g % (LENGTHS[i] + 1)


def test_transitions_never_cross_episode_boundaries(env_seeds):
    ds = make_dataset(time_horizon=7)
    run = collect_rollouts(ds, 4)
    assert env_seeds == [SEED]  # one env for the whole run
    steps = 4 * 7
    assert run["obs"].shape == (steps, N, 2)
    for i, (length, terminates) in enumerate(zip(LENGTHS, TERMINATES, strict=True)):
        for g in range(steps):
            obs, nxt = run["obs"][g, i], run["next_obs"][g, i]
            assert obs[0] == i and nxt[0] == i  # never another sub-env's observation
            assert obs[1] == phase(g, i)
            done = phase(g, i) == length - 1
            assert run["terminated"][g, i] == (done and terminates), (g, i)
            assert run["truncated"][g, i] == (done and not terminates), (g, i)
            assert run["valid"][g, i] == (phase(g, i) != length), (g, i)
            if run["valid"][g, i]:
                # Same episode: the successor, including the final obs after a done.
                np.testing.assert_array_equal(nxt, obs + [0, 1])
                assert run["rewards"][g, i] == REWARD[i]
            else:
                # The masked autoreset slot: final obs in, first obs of a new episode out.
                np.testing.assert_array_equal(obs, [i, length])
                np.testing.assert_array_equal(nxt, [i, 0])
            if run["truncated"][g, i]:
                # Truncation bootstraps from V(final_obs) = length / 2.
                assert run["next_values"][g, i] == length / 2
    # The chosen horizon puts env 0's done on a rollout's last slot: the next rollout's first
    # slot is masked, so the mask carries across rollouts.
    assert run["terminated"][6, 0] and not run["valid"][7, 0]
    assert run["valid"][0].all()


def test_episode_log_matches_env_lengths(env_seeds):
    ds = make_dataset(time_horizon=7)
    collect_rollouts(ds, 4)
    expected = [
        ((g + 1) * N, LENGTHS[i] * REWARD[i], LENGTHS[i])
        for g in range(4 * 7)
        for i in range(N)
        if phase(g, i) == LENGTHS[i] - 1
    ]
    frames, returns, lengths = ds.episodes.drain()
    assert list(zip(frames, returns, lengths, strict=True)) == expected
    assert ds.episodes.drain() == ([], [], [])


def test_minibatches_cover_valid_slots_once_per_epoch(env_seeds):
    ds = make_dataset(time_horizon=7, epochs=2, minibatches=3)
    assert len(ds) == 1  # one training step per rollout
    for rollout in range(2):
        (round_,) = list(ds)
        assert len(round_) == 6
        batches = list(round_)
        assert len(batches) == 6
        assert ds.frames == (rollout + 1) * 7 * N
        mem = ds.memory
        valid = np.flatnonzero(mem.valid.reshape(-1))
        assert len(valid) < 7 * N  # some slots are masked
        flat = {
            "obs": mem.obs.reshape(-1, 2),
            "values": mem.values.reshape(-1),
            "advantages": mem.advantages.reshape(-1),
            "returns": mem.returns.reshape(-1),
        }
        assert np.isfinite(flat["advantages"][valid]).all()
        orders = []
        for epoch in range(2):
            epoch_batches = batches[epoch * 3 : (epoch + 1) * 3]
            ids = [b.log_probs.numpy().astype(int) for b in epoch_batches]
            sizes = [len(x) for x in ids]
            assert max(sizes) - min(sizes) <= 1
            order = np.concatenate(ids)
            np.testing.assert_array_equal(np.sort(order), valid)
            orders.append(order)
            for batch, idx in zip(epoch_batches, ids, strict=True):
                assert isinstance(batch, OnPolicyBatch)
                for key, array in flat.items():
                    np.testing.assert_array_equal(getattr(batch, key).numpy(), array[idx])
        assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch


def test_a_round_stopped_early_shuffles_no_more_and_the_budget_ends_iteration(env_seeds):
    """Training that stops a round after two minibatches (PPO's target KL) leaves the second
    pass unshuffled: the shuffling generator stands where a round of one pass leaves it.
    Catches a round that draws its permutations up front."""
    agent = FakeAgent(max_frames=2 * 7 * N)
    ds = make_dataset(agent, time_horizon=7, epochs=2, minibatches=3)
    one_pass = make_dataset(FakeAgent(max_frames=2 * 7 * N), time_horizon=7, epochs=1)
    (round_,) = list(ds)
    taken = [batch for batch, _ in zip(round_, range(2), strict=False)]
    assert len(taken) == 2
    assert len(minibatches(one_pass)) == 3
    assert ds.rng.bit_generator.state == one_pass.rng.bit_generator.state
    assert len(minibatches(ds)) == 6  # the next rollout's round is whole
    assert ds.frames == agent.max_frames
    assert list(ds) == []  # frame budget spent: no further rollout
    assert ds.frames == agent.max_frames


def test_state_dict_round_trip(env_seeds):
    ds = make_dataset(time_horizon=7)
    minibatches(ds)
    state = ds.state_dict()
    assert state["frames"] == 7 * N and state["rollouts"] == 1
    assert state["normalizers"] == {}

    # Global RNGs (action sampling) are restored too.
    drawn = torch.rand(3), np.random.rand(3), random.random()
    ds.load_state_dict(state)
    assert ds.env is None  # envs restart from a fresh reset at the restored clock
    torch.testing.assert_close(torch.rand(3), drawn[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), drawn[1])
    assert random.random() == drawn[2]

    resumed = make_dataset(time_horizon=7)
    resumed.load_state_dict(state)
    assert (resumed.frames, resumed.rollouts) == (7 * N, 1)
    not_restored = make_dataset(time_horizon=7)

    runs = [minibatches(d) for d in (ds, resumed, not_restored)]
    assert env_seeds == [SEED, SEED + 7 * N, SEED + 7 * N, SEED]

    def slot_order(batches):
        return [b.log_probs.numpy().astype(int).tolist() for b in batches]

    assert slot_order(runs[1]) == slot_order(runs[0])
    for a, b in zip(runs[1], runs[0], strict=True):
        for field_a, field_b in zip(a, b, strict=True):
            torch.testing.assert_close(field_a, field_b, rtol=0, atol=0)
    assert resumed.frames == ds.frames == 2 * 7 * N
    # Same observations (fresh reset either way), but the minibatch RNG was not restored.
    assert slot_order(runs[2]) != slot_order(runs[0])


def test_state_dict_restores_normalizer_statistics(env_seeds):
    ds = make_dataset(time_horizon=7, normalize_obs=True)
    ds.collect()
    state = ds.state_dict()
    saved = state["normalizers"]["obs_rms"]
    assert saved["count"] > N  # statistics from reset + 7 steps, not a fresh tracker

    resumed = make_dataset(time_horizon=7, normalize_obs=True)
    resumed.load_state_dict(state)
    not_restored = make_dataset(time_horizon=7, normalize_obs=True)
    for d in (resumed, not_restored):
        d.collect()
    restored = normalizer_state(resumed.env)["obs_rms"]
    fresh = normalizer_state(not_restored.env)["obs_rms"]
    # The restored tracker continued from the saved one: one reset and 7 steps of N envs more.
    assert restored["count"] == pytest.approx(saved["count"] + 8 * N)
    assert fresh["count"] == pytest.approx(saved["count"])


def test_state_dict_before_first_rollout_resumes_with_normalizers(env_seeds):
    """A checkpoint written before the env existed holds no statistics: start fresh."""
    state = make_dataset(time_horizon=7, normalize_obs=True).state_dict()
    assert state["normalizers"] is None
    resumed = make_dataset(time_horizon=7, normalize_obs=True)
    resumed.load_state_dict(state)
    resumed.collect()
    assert resumed.frames == 7 * N


def test_normalizer_mismatch_on_resume_is_reported(env_seeds):
    plain = make_dataset(time_horizon=7)
    plain.collect()
    state = plain.state_dict()
    assert state["normalizers"] == {}
    resumed = make_dataset(time_horizon=7, normalize_obs=True)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="normalize_obs"):
        resumed.collect()


def test_non_finite_observation_names_sub_env(env_seeds):
    ds = make_dataset(time_horizon=7, kwargs={"nan_at": 4})
    with pytest.raises(FloatingPointError, match=rf"{ENV_ID} \(sub-env {N - 1}\)"):
        ds.collect()


def test_real_factory_with_truncation():
    """Through the real make_vector_env: kwargs and time limit reach the env, NEXT_STEP masks."""
    ds = make_dataset(
        time_horizon=6,
        vectorization="sync",
        max_episode_steps=2,
        kwargs={"marker": 5.0},
    )
    try:
        ds.collect()
        mem = ds.memory
        counts = [0, 1, 2, 0, 1, 2]
        for i in range(N):
            np.testing.assert_array_equal(mem.obs[:, i, 0], 5.0)
            np.testing.assert_array_equal(mem.obs[:, i, 1], counts)
        np.testing.assert_array_equal(mem.truncated[:, 0], [0, 1, 0, 0, 1, 0])
        assert not mem.terminated.any()
        np.testing.assert_array_equal(mem.valid[:, 0], [1, 1, 0, 1, 1, 0])
        assert mem.next_values[1, 0] == 1.0  # V(final_obs) with count 2
    finally:
        ds.close()
    assert ds.env is None


def test_warm_start_statistics_reach_the_new_envs(env_seeds):
    """A warm start hands the source run's normaliser statistics to the rollout before it
    builds its envs; the envs start from them. Catches statistics that are dropped (the new
    envs would start from a count of about N)."""
    source = make_dataset(time_horizon=7, normalize_obs=True)
    list(source)
    saved = normalizer_state(source.env)["obs_rms"]
    source.close()
    ds = make_dataset(time_horizon=7, normalize_obs=True)
    WarmStartNormalizers({"obs_rms": saved}).on_train_start(None, SimpleNamespace(rollout=ds))
    ds.start()
    restored = normalizer_state(ds.env)["obs_rms"]
    # The reset's observations (one per sub-env) are the only ones added since.
    assert restored["count"] == pytest.approx(saved["count"] + N)
    ds.close()


def test_the_rollout_acts_with_one_thread_and_gives_the_updates_their_threads(env_seeds):
    """With two torch threads set, the rollout's env steps run on one and the minibatches
    that follow get both back. Catches the thread count left at one for the updates, or
    acting with the run's threads (slow beside ale-py's env threads)."""
    ds = make_dataset(time_horizon=3, epochs=1, minibatches=1)
    seen = []
    act = ds.agent.act
    ds.agent.act = lambda *args, **kwargs: (
        seen.append(torch.get_num_threads()) or act(*args, **kwargs)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = iter(ds)
        next(batches)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
