"""FrameReplay against the naive ReplayMemory fed the same stacked-frame stream.

The stream imitates ale-py's ``AtariVectorEnv`` (NEXT_STEP autoreset, zero-padded stacks
after a reset) or gymnasium's ``FrameStackObservation`` (reset frame repeated), with episodes
ending at different times in each sub-env by termination or truncation, and frames drawn
partly from a tiny pool so that repeats, all-zero frames and reset stacks equal to the final
one all occur. Both memories must then hold the same transitions in the same slots.
"""

import pickle

import lightning as L
import numpy as np
import pytest

from slm_lightning.algorithms import DQN
from slm_lightning.data.frame_replay import FrameReplay, PrioritizedFrameReplay
from slm_lightning.data.prioritized import PrioritizedReplay
from slm_lightning.data.replay import ReplayBatch, ReplayLayout, ReplayMemory
from slm_lightning.envs.factory import EnvSpec

STACK, FRAME = 4, (3, 2)
NUM_ENVS = 3


class StackedStream:
    """``num_envs`` sub-envs returning ``(stack, *FRAME)`` uint8 stacks, stepped as the off-policy
    rollout steps a NEXT_STEP vector env; each :meth:`step` returns the arguments of ``add``.

    Args:
        padding: ``zero`` (ale-py) or ``repeat`` (gymnasium's default) stacks after a reset.
        max_len: episodes last 1 to ``max_len`` steps, drawn per episode.
    """

    def __init__(self, padding: str, max_len: int = 12, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.padding, self.max_len = padding, max_len
        self.pool = self.rng.integers(0, 256, (3, *FRAME), dtype=np.uint8)
        self.pool[0] = 0  # all-zero frames also occur inside episodes
        self.stacks = np.stack([self._reset_stack() for _ in range(NUM_ENVS)])
        self.left = self.rng.integers(1, max_len + 1, NUM_ENVS)
        self.prev_done = np.zeros(NUM_ENVS, bool)

    def _frame(self) -> np.ndarray:
        if self.rng.random() < 0.3:
            return self.pool[self.rng.integers(len(self.pool))]
        return self.rng.integers(0, 256, FRAME, dtype=np.uint8)

    def _reset_stack(self) -> np.ndarray:
        first = self._frame()
        if self.padding == "repeat":
            return np.stack([first] * STACK)
        return np.stack([np.zeros(FRAME, np.uint8)] * (STACK - 1) + [first])

    def step(self) -> tuple[np.ndarray, ...]:
        obs = self.stacks.copy()
        next_obs = np.empty_like(obs)
        rewards = self.rng.standard_normal(NUM_ENVS)
        terminated, truncated = np.zeros(NUM_ENVS, bool), np.zeros(NUM_ENVS, bool)
        for e in range(NUM_ENVS):
            if self.prev_done[e]:  # autoreset step: not a transition
                next_obs[e] = self._reset_stack()
                rewards[e] = np.nan
                self.left[e] = self.rng.integers(1, self.max_len + 1)
                continue
            next_obs[e] = np.concatenate([obs[e, 1:], self._frame()[None]])
            self.left[e] -= 1
            if self.left[e] == 0:
                end = self.rng.random() < 0.5
                terminated[e], truncated[e] = end, not end
        valid = ~self.prev_done
        self.prev_done = terminated | truncated
        self.stacks = next_obs
        actions = self.rng.integers(0, 6, NUM_ENVS)
        return obs, actions, rewards, next_obs, terminated, truncated, valid


def feed(memories: list[ReplayMemory], steps: int, padding: str, **stream_kwargs) -> None:
    stream = StackedStream(padding, **stream_kwargs)
    for _ in range(steps):
        args = stream.step()
        for memory in memories:
            memory.add(*args)


def assert_same(a: ReplayBatch, b: ReplayBatch) -> None:
    for key, x, y in zip(a._fields, a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None, key
            continue
        np.testing.assert_array_equal(x, y, err_msg=key)
        assert x.dtype == y.dtype, key


def layout(capacity: int, n_steps: int, combined: bool = False, seed: int = 4) -> ReplayLayout:
    """The stream's layout: ``NUM_ENVS`` envs of ``(STACK, *FRAME)`` uint8 stacks, gamma 0.9."""
    return ReplayLayout(capacity, NUM_ENVS, (STACK, *FRAME), np.uint8, (), np.int64,
                        n_steps=n_steps, gamma=0.9, combined=combined, seed=seed)  # fmt: skip


def naive(capacity: int, n_steps: int, cls: type = ReplayMemory, combined: bool = False,
          seed: int = 4, **kwargs) -> ReplayMemory:  # fmt: skip
    return cls(layout(capacity, n_steps, combined, seed), **kwargs)


def frames(capacity: int, n_steps: int, cls: type = FrameReplay, combined: bool = False,
           seed: int = 4, **kwargs) -> FrameReplay:  # fmt: skip
    return cls(layout(capacity, n_steps, combined, seed), **kwargs)


@pytest.mark.parametrize("padding", ["zero", "repeat"])
@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("combined", [False, True])
def test_same_transitions_and_samples_as_naive_memory(padding, n_steps, combined):
    reference, memory = (
        naive(60, n_steps, combined=combined),
        frames(60, n_steps, combined=combined),
    )
    feed([reference, memory], 150, padding)  # ~400 transitions: the 60 slots wrap many times
    assert len(memory) == len(reference) == 60 and memory.cursor == reference.cursor
    every = np.arange(60)
    assert_same(memory.batch(every), reference.batch(every))
    assert memory.batch(every).obs.dtype == np.uint8
    for _ in range(5):
        assert_same(memory.sample(32), reference.sample(32))
    np.testing.assert_array_equal(memory.pending_count, reference.pending_count)
    # one frame per transition plus about one per episode (episodes of 6.5 steps on average)
    assert memory.frames_written < 1.5 * 150 * NUM_ENVS


def test_not_yet_full_memory_samples_the_same():
    reference, memory = naive(1000, 3), frames(1000, 3)
    feed([reference, memory], 40, "zero")
    assert len(memory) == len(reference) < 1000
    for _ in range(3):
        assert_same(memory.sample(16), reference.sample(16))


@pytest.mark.parametrize("n_steps", [1, 3])
def test_prioritized_variant_matches_prioritized_replay(n_steps):
    reference = naive(50, n_steps, PrioritizedReplay, alpha=0.7)
    memory = frames(50, n_steps, PrioritizedFrameReplay, alpha=0.7)
    assert isinstance(memory, PrioritizedReplay)
    stream = StackedStream("zero", seed=1)
    td_rng = np.random.default_rng(2)
    for t in range(120):
        args = stream.step()
        reference.add(*args)
        memory.add(*args)
        if t >= 10:
            a, b = reference.sample(8, beta=0.5), memory.sample(8, beta=0.5)
            assert_same(b, a)
            td = td_rng.standard_normal(8)
            reference.update_priorities(a.indices, td)
            memory.update_priorities(b.indices, td)
    np.testing.assert_array_equal(memory.tree.tree, reference.tree.tree)


@pytest.mark.parametrize("cls", [FrameReplay, PrioritizedFrameReplay])
def test_short_episodes_drop_oldest_transitions_never_stale_frames(cls):
    # Episodes of 1 or 2 steps write ~1.7 frames per transition (a reset frame per episode).
    memory = frames(400, 3, cls)
    memory_ample = frames(400, 3, cls, frame_capacity=2 * 400 + 2 * memory.reach)
    memory_tight = frames(400, 3, cls, frame_capacity=3 * memory.reach)
    reference = naive(400, 3)
    feed([reference, memory, memory_ample, memory_tight], 300, "zero", max_len=2)
    assert len(memory_ample) == len(reference) == 400
    assert 350 < len(memory) < 400  # the default store is sized for episodes of >= 16 steps
    # The tight store holds the frames of ~100 transitions: the oldest transitions went, the
    # newest are all there and identical to the naive memory's.
    assert 0 < len(memory_tight) < 400
    stored = np.flatnonzero(memory_tight.is_stored(np.arange(400)))
    assert len(stored) == len(memory_tight)
    np.testing.assert_array_equal(np.sort((stored - memory_tight.cursor) % 400),
                                  np.arange(400 - len(stored), 400))  # fmt: skip
    assert_same(memory_tight.batch(stored), reference.batch(stored))
    for _ in range(5):
        batch = memory_tight.sample(64)
        assert memory_tight.is_stored(batch.indices).all()
        assert_same(batch._replace(weights=None), reference.batch(batch.indices))
    if cls is PrioritizedFrameReplay:
        dropped = np.setdiff1d(np.arange(400), stored)
        np.testing.assert_array_equal(memory_tight.tree.get(dropped), 0.0)
        memory_tight.update_priorities(np.arange(400), np.full(400, 5.0))  # skips dropped
        np.testing.assert_array_equal(memory_tight.tree.get(dropped), 0.0)


@pytest.mark.parametrize("cls", [FrameReplay, PrioritizedFrameReplay])
def test_state_dict_round_trip_same_next_samples_and_stream(cls):
    memory = frames(40, 3, cls, seed=7)
    stream = StackedStream("zero", seed=3)
    for _ in range(50):
        memory.add(*stream.step())
    memory.sample(5)  # move the generator off its seed
    state = pickle.loads(pickle.dumps(memory.state_dict()))
    restored = frames(40, 3, cls, seed=99)
    restored.load_state_dict(state)
    assert len(restored) == len(memory) and restored.frames_written == memory.frames_written
    for _ in range(3):
        assert_same(memory.sample(16), restored.sample(16))
    for _ in range(20):  # open windows and stream heads continue where they were
        args = stream.step()
        memory.add(*args)
        restored.add(*args)
    assert_same(memory.batch(np.arange(40)), restored.batch(np.arange(40)))
    assert_same(memory.sample(16), restored.sample(16))
    with pytest.raises(ValueError, match="memory.frame_capacity"):
        frames(40, 3, cls, frame_capacity=10_000).load_state_dict(state)


def test_footprint_about_one_frame_per_transition():
    capacity, shape = 100_000, (4, 84, 84)  # allocation is lazy: nothing is touched here
    memory = FrameReplay(ReplayLayout(capacity, 16, shape, np.uint8, (), np.int64))
    reference = ReplayMemory(ReplayLayout(1000, 16, shape, np.uint8, (), np.int64))
    frame = 84 * 84

    def per_transition(m: ReplayMemory, n: int) -> float:
        return sum(a.nbytes for a in vars(m).values() if isinstance(a, np.ndarray)) / n

    assert per_transition(reference, 1000) > 8 * frame
    assert frame < per_transition(memory, capacity) < 1.1 * frame
    # Written frames: one per transition plus one per episode (zero padding shared).
    small = FrameReplay(ReplayLayout(1000, NUM_ENVS, (STACK, *FRAME), np.uint8, (), np.int64))
    feed([small], 300, "zero", max_len=50)
    assert small.frames_written < 1.1 * len(small)


def test_real_atari_stream_matches_naive_memory():
    vector_env = pytest.importorskip("ale_py.vector_env")
    env = vector_env.AtariVectorEnv("pong", 2, max_num_frames_per_episode=60, num_threads=1)
    reference = ReplayMemory(
        ReplayLayout(500, 2, (4, 84, 84), np.uint8, (), np.int64, n_steps=3, seed=1)
    )
    memory = FrameReplay(
        ReplayLayout(500, 2, (4, 84, 84), np.uint8, (), np.int64, n_steps=3, seed=1)
    )
    obs, _ = env.reset(seed=0)
    prev_done = np.zeros(2, bool)
    rng = np.random.default_rng(0)
    for _ in range(60):  # episodes truncate after 15 agent steps
        actions = rng.integers(0, env.single_action_space.n, 2)
        next_obs, rewards, terminated, truncated, _ = env.step(actions)
        for m in (reference, memory):
            m.add(obs, actions, rewards, next_obs, terminated, truncated, ~prev_done)
        prev_done, obs = terminated | truncated, next_obs
    env.close()
    assert len(memory) == len(reference) > 90
    every = np.arange(len(reference))
    assert_same(memory.batch(every), reference.batch(every))
    # zero padding after resets is shared, not stored: about one frame per transition
    assert memory.frames_written <= len(memory) + 2 * 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"obs_shape": ()}, r"memory.obs_shape must be \(stack, \*frame_shape\)"),
        ({"frame_capacity": 10}, "memory.frame_capacity must be >= 240"),
    ],
)
def test_invalid_arguments(kwargs, message):
    obs_shape = kwargs.pop("obs_shape", (4, 2))
    with pytest.raises(ValueError, match=message):
        FrameReplay(ReplayLayout(100, 3, obs_shape, np.uint8, (), np.int64), **kwargs)


@pytest.mark.parametrize("prioritized", [False, True])
def test_dqn_picks_the_frame_memory_for_atari_and_rolls_out_uint8(prioritized):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = DQN(env=EnvSpec(name="CartPole-v1", num_envs=2), memory_size=100)
    model.trainer = trainer
    assert type(model.build_rollout().memory) is ReplayMemory
    model = DQN(env=EnvSpec(name="ALE/Pong-v5", num_envs=2), memory_size=100, n_steps=3,
                learning_starts=0, prioritized=prioritized)  # fmt: skip
    model.trainer = trainer
    rollout = model.build_rollout()
    expected = PrioritizedFrameReplay if prioritized else FrameReplay
    assert type(rollout.memory) is expected
    try:
        for _ in range(12):
            rollout.step()
    finally:
        rollout.close()
    assert rollout.obs.dtype == np.uint8 and len(rollout.memory) == 2 * (12 - 2)
    batch = rollout.memory.sample(4)
    assert batch.obs.dtype == np.uint8 and batch.obs.shape == (4, 4, 84, 84)
