"""ReplayMemory against hand-written numbers: circular order, masks, n-step windows, CER, resume.

Observations are small integers (the step or a marker), so every stored transition can be
read back and compared literally.
"""

import pickle

import numpy as np
import pytest

from slm_lightning.data.replay import ReplayLayout, ReplayMemory
from slm_lightning.errors import ConfigError

NAN = float("nan")


def step(memory: ReplayMemory, obs, rewards, next_obs, terminated=None, truncated=None, valid=None):
    """One ``add`` for 1-d observations given as plain lists, one entry per env."""
    n = memory.num_envs
    memory.add(
        np.asarray(obs, dtype=memory.obs.dtype).reshape(n, *memory.obs.shape[1:]),
        np.arange(n) + 10 * len(memory),
        np.asarray(rewards, dtype=np.float64),
        np.asarray(next_obs, dtype=memory.obs.dtype).reshape(n, *memory.obs.shape[1:]),
        np.zeros(n, bool) if terminated is None else np.asarray(terminated),
        np.zeros(n, bool) if truncated is None else np.asarray(truncated),
        np.ones(n, bool) if valid is None else np.asarray(valid),
    )


def test_circular_overwrite_order_and_uint8_kept():
    memory = ReplayMemory(ReplayLayout(5, 2, (2, 2), np.uint8, (), np.int64))
    for t in range(3):  # six transitions into five slots: the sixth overwrites slot 0
        obs = np.stack([np.full((2, 2), 2 * t + i, np.uint8) for i in range(2)])
        memory.add(obs, np.array([2 * t, 2 * t + 1]), np.array([1.0, 2.0]), obs + 100,
                   np.zeros(2, bool), np.zeros(2, bool), np.ones(2, bool))  # fmt: skip
    assert memory.obs.dtype == np.uint8 and memory.next_obs.dtype == np.uint8
    assert len(memory) == 5 and memory.cursor == 1
    np.testing.assert_array_equal(memory.obs[:, 0, 0], [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(memory.next_obs[:, 1, 1], [105, 101, 102, 103, 104])
    np.testing.assert_array_equal(memory.actions, [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(memory.last_indices, [4, 0])
    batch = memory.sample(7)
    assert batch.obs.dtype == np.uint8 and batch.terminated.dtype == np.float32
    np.testing.assert_allclose(batch.discounts, 0.99)


def test_float_obs_stored_float32_and_oversized_add_keeps_newest():
    memory = ReplayMemory(ReplayLayout(3, 4, (1,), np.float64, (), np.int64))
    assert memory.obs.dtype == np.float32
    step(memory, [0, 1, 2, 3], [0, 1, 2, 3], [10, 11, 12, 13])
    np.testing.assert_array_equal(memory.obs[:, 0], [1, 2, 3])
    assert len(memory) == 3 and memory.cursor == 0


def test_invalid_slots_skipped():
    memory = ReplayMemory(ReplayLayout(10, 3, (1,), np.float32, (), np.int64))
    step(memory, [1, 2, 3], [1.0, NAN, 3.0], [4, 5, 6], terminated=[False, False, True],
         valid=[True, False, True])  # fmt: skip
    assert len(memory) == 2
    np.testing.assert_array_equal(memory.obs[:2, 0], [1, 3])
    np.testing.assert_array_equal(memory.rewards[:2], [1.0, 3.0])
    np.testing.assert_array_equal(memory.next_obs[:2, 0], [4, 6])
    np.testing.assert_array_equal(memory.terminated[:2], [False, True])
    np.testing.assert_array_equal(memory.actions[:2], [0, 2])


# n = 3, gamma = 0.9. Env 0: steps t0..t3 with rewards 1, 2, 3, 4, truncated after t3 (final
# obs 4); t4 is the masked autoreset step (reward NaN); a new episode from obs 10 with rewards
# 5, 6 terminates after t6. Env 1 never ends: obs 100 + t, reward 1 every step.
ENV0_OBS = [0, 1, 2, 3, 4, 10, 11]
ENV0_NEXT = [1, 2, 3, 4, 10, 11, 12]
ENV0_REWARDS = [1.0, 2.0, 3.0, 4.0, NAN, 5.0, 6.0]
# (obs, reward, next_obs, terminated, discount) in write order: per add, env-major, oldest
# window first.
NSTEP_EXPECTED = [
    (0, 1 + 0.9 * 2 + 0.81 * 3, 3, False, 0.729),  # t2: env 0's first window is full
    (100, 1 + 0.9 + 0.81, 103, False, 0.729),
    (1, 2 + 0.9 * 3 + 0.81 * 4, 4, False, 0.729),  # t3: truncation flushes t1, t2, t3 ...
    (2, 3 + 0.9 * 4, 4, False, 0.81),  # ... each bootstrapping from the final obs 4
    (3, 4.0, 4, False, 0.9),
    (101, 2.71, 104, False, 0.729),
    (102, 2.71, 105, False, 0.729),  # t4: env 0 masked, stores nothing
    (103, 2.71, 106, False, 0.729),  # t5: env 0 has one pending window
    (10, 5 + 0.9 * 6, 12, True, 0.81),  # t6: termination flushes t5, t6
    (11, 6.0, 12, True, 0.9),
    (104, 2.71, 107, False, 0.729),
]


def test_nstep_windows_with_truncation_and_termination():
    memory = ReplayMemory(
        ReplayLayout(100, 2, (1,), np.float32, (), np.int64, n_steps=3, gamma=0.9)
    )
    written = []
    for t in range(7):
        ended = {"terminated": [t == 6, False], "truncated": [t == 3, False]}
        step(memory, [ENV0_OBS[t], 100 + t], [ENV0_REWARDS[t], 1.0], [ENV0_NEXT[t], 101 + t],
             valid=[t != 4, True], **ended)  # fmt: skip
        written.append(len(memory.last_indices))
    assert written == [0, 0, 2, 4, 1, 1, 3]
    obs, rewards, next_obs, terminated, discounts = map(np.array, zip(*NSTEP_EXPECTED, strict=True))
    assert len(memory) == 11
    np.testing.assert_array_equal(memory.obs[:11, 0], obs)
    np.testing.assert_allclose(memory.rewards[:11], rewards, rtol=1e-6)
    np.testing.assert_array_equal(memory.next_obs[:11, 0], next_obs)
    np.testing.assert_array_equal(memory.terminated[:11], terminated)
    np.testing.assert_allclose(memory.discounts[:11], discounts, rtol=1e-6)
    # The action stored is the window's first action (step() writes 10 * len + env).
    np.testing.assert_array_equal(memory.actions[:2], [0, 1])
    np.testing.assert_array_equal(memory.pending_count, [0, 2])


def test_combined_replay_always_holds_newest():
    memory = ReplayMemory(
        ReplayLayout(50, 4, (1,), np.float32, (), np.int64, combined=True, seed=3)
    )
    for t in range(20):  # wraps: 80 transitions into 50 slots
        step(memory, [t] * 4, [0.0] * 4, [t + 1] * 4)
    newest = memory.last_indices
    np.testing.assert_array_equal(newest, [26, 27, 28, 29])
    for _ in range(20):
        batch = memory.sample(8)
        np.testing.assert_array_equal(batch.indices[:4], newest)
        np.testing.assert_array_equal(batch.obs[:4, 0], [19] * 4)
    np.testing.assert_array_equal(memory.sample(2).indices, [28, 29])  # newest first
    uniform = ReplayMemory(ReplayLayout(50, 4, (1,), np.float32, (), np.int64, seed=3))
    for t in range(20):
        step(uniform, [t] * 4, [0.0] * 4, [t + 1] * 4)
    hits = [set(newest) <= set(uniform.sample(8).indices) for _ in range(20)]
    assert not any(hits)


def test_state_dict_round_trip_same_next_samples_and_pending():
    def make() -> ReplayMemory:
        return ReplayMemory(
            ReplayLayout(8, 2, (1,), np.float32, (), np.int64, n_steps=3, gamma=0.9, seed=7)
        )

    memory = make()
    for t in range(7):  # 10 transitions wrap the 8 slots; two windows per env stay pending
        step(memory, [t, 50 + t], [1.0, 2.0], [t + 1, 51 + t])
    memory.sample(5)  # move the generator off its seed
    state = pickle.loads(pickle.dumps(memory.state_dict()))  # as a checkpoint would
    restored = make()
    restored.load_state_dict(state)
    assert len(restored) == 8 and restored.cursor == memory.cursor == 2
    for _ in range(3):
        a, b = memory.sample(6), restored.sample(6)
        for key, x, y in zip(a._fields, a, b, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=key)
    for m in (memory, restored):  # pending windows resume where they were
        step(m, [7, 57], [1.0, 2.0], [8, 58], terminated=[True, False])
    for name in ("obs", "rewards", "next_obs", "terminated", "discounts"):
        np.testing.assert_array_equal(getattr(memory, name), getattr(restored, name))
    with pytest.raises(ValueError, match="memory.n_steps"):
        ReplayMemory(ReplayLayout(8, 2, (1,), np.float32, (), np.int64)).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "^model.init_args.memory_size must be >= 1, got 0$"),
        ({"num_envs": 0}, "^model.init_args.env.num_envs must be >= 1, got 0$"),
        ({"n_steps": 0}, "^model.init_args.n_steps must be >= 1, got 0$"),
        ({"gamma": 1.5}, r"^model.init_args.gamma must be in \[0, 1\], got 1.5$"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"capacity": 4, "num_envs": 1, "obs_shape": (1,), "obs_dtype": np.float32,
            "action_shape": (), "action_dtype": np.int64} | kwargs  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        ReplayLayout(**args)


def test_sample_errors():
    memory = ReplayMemory(ReplayLayout(4, 1, (1,), np.float32, (), np.int64))
    with pytest.raises(RuntimeError, match="empty"):
        memory.sample(2)
    step(memory, [0], [1.0], [1])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        memory.sample(0)
