"""Replay memory for stacked frames (Atari): every frame stored once, stacks rebuilt at sampling."""

import dataclasses
from typing import Any

import numpy as np

from slm_lightning.data.prioritized import PrioritizedReplay
from slm_lightning.data.replay import ReplayBatch, ReplayLayout, ReplayMemory


class FrameReplay(ReplayMemory):
    """:class:`ReplayMemory` for observations stacking the last frames, shaped
    ``(stack, *frame_shape)``, that stores each frame once instead of ``2 * stack`` times.

    A naive store of Atari's ``(4, 84, 84)`` uint8 observations plus next observations takes
    56 KB per transition (56 GB for 1M); here a transition costs about one 7 KB frame. Each
    :meth:`add` writes, per valid sub-env, only the newest frame of ``next_obs`` into a
    circular frame store. A transition keeps the serial numbers of the ``stack`` frames of its
    ``obs`` and of its ``next_obs`` (int64 serials shaped ``(…, stack)``, in the arrays
    ``obs_serials``, ``next_obs_serials`` and ``pending_obs_serials`` that hold observations
    in :class:`ReplayMemory`), and :meth:`batch` gathers
    the frames back into stacks with one fancy index per key. Everything else (n-step windows,
    combined replay, sampling, the generator) is :class:`ReplayMemory`'s.

    Nothing is assumed about what the env does at a reset: an ``obs`` that is not the
    sub-env's previous ``next_obs`` (a new episode) and a ``next_obs`` that is not ``obs``
    shifted by one frame are stored as whole stacks, with all-zero frames (the zero padding
    of ale-py's ``AtariVectorEnv``) mapped to one shared zero frame and a frame equal to its
    successor (the reset-frame padding of gymnasium's ``FrameStackObservation``) stored once.
    So a rebuilt stack equals, element for element, the array that was added, and frames of
    an earlier episode appear in a stack only where the env put them.

    The frame store keeps ``frame_capacity`` frames. Each episode adds about one frame more
    than it adds transitions, so with very short episodes the oldest frames are overwritten
    while transitions still refer to them: those (oldest) transitions are dropped first, and
    ``len(memory)`` stays below ``capacity``. No sample ever holds an overwritten frame.

    ``valid`` must be False only on the autoreset step after a done (as the off-policy
    rollout passes it): an n-step window left open over masked steps would outlive its frames.

    Args:
        layout: as in :class:`ReplayMemory`, with ``obs_shape`` ``(stack, *frame_shape)``:
            the last ``stack`` frames, oldest first, as ale-py's ``AtariVectorEnv`` and
            gymnasium's ``FrameStackObservation`` give them.
        frame_capacity: frames kept; None: ``capacity + capacity // 16`` plus a few steps'
            worth, enough for all ``capacity`` transitions with episodes of 16 steps or more.
        **kwargs: for the next class in the method resolution order (``alpha`` and ``eps`` of
            :class:`PrioritizedFrameReplay`).
    """

    obs_name = "obs_serials"

    def __init__(
        self, layout: ReplayLayout, frame_capacity: int | None = None, **kwargs: Any
    ) -> None:
        obs_shape = layout.obs_shape
        if len(obs_shape) < 1 or obs_shape[0] < 1:
            raise ValueError(
                f"memory.obs_shape must be (stack, *frame_shape) with stack >= 1, got {obs_shape}"
            )
        self.stack = obs_shape[0]
        # The storage arrays of ReplayMemory hold the serials of each observation's frames.
        serials = dataclasses.replace(layout, obs_shape=(self.stack,), obs_dtype=np.int64)
        super().__init__(serials, **kwargs)
        self.layout = layout
        self.obs_dtype = layout.obs_dtype
        self.obs_shape = obs_shape
        capacity, num_envs, n_steps = layout.capacity, layout.num_envs, layout.n_steps
        # Frames one add can write: a whole obs stack and a whole next_obs stack per sub-env.
        self.add_frames = 2 * self.stack * num_envs
        # Every frame a new transition refers to was written within ``reach`` frames: its
        # n-step window opened at most n_steps - 1 adds ago, with a stack whose frames are at
        # most ``stack`` adds old (add rewrites older ones). Eviction relies on this bound.
        self.reach = (n_steps + self.stack) * self.add_frames
        if frame_capacity is None:
            frame_capacity = capacity + capacity // 16 + 2 * self.reach
        if frame_capacity < 2 * self.reach:
            raise ValueError(
                f"memory.frame_capacity must be >= {2 * self.reach} "
                f"(4 * (n_steps + stack) * stack * num_envs), got {frame_capacity}"
            )
        self.frame_capacity = frame_capacity
        # Frame serial s lives in row s % frame_capacity; serial -1 is the all-zero frame in
        # the extra last row, which is never written.
        self.frame_store = np.zeros((frame_capacity + 1, *obs_shape[1:]), dtype=self.obs_dtype)
        self.frames_written = 0
        self.head = np.full((num_envs, self.stack), -1, dtype=np.int64)  # last next_obs
        # frames_written when each transition was stored: non-decreasing from the oldest.
        self.written_at = np.zeros(capacity, dtype=np.int64)
        self.filled = 0  # slots ever written; len(self) is smaller after evictions

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        """Store one vector step; arguments as in :meth:`ReplayMemory.add`, with ``obs`` and
        ``next_obs`` shaped ``(num_envs, stack, *frame_shape)``."""
        valid = np.asarray(valid, dtype=bool)
        obs_refs = np.full((self.num_envs, self.stack), -1, dtype=np.int64)
        next_refs = obs_refs.copy()
        if valid.all():
            obs_refs, next_refs = self._store_step(np.asarray(obs), np.asarray(next_obs), valid)
        elif valid.any():
            obs_refs[valid], next_refs[valid] = self._store_step(
                np.asarray(obs)[valid], np.asarray(next_obs)[valid], valid
            )
        self._evict()
        super().add(obs_refs, actions, rewards, next_refs, terminated, truncated, valid)

    def _slots(self, refs: np.ndarray) -> np.ndarray:
        """Rows of :attr:`frame_store` holding the frames with serials ``refs``."""
        return np.where(refs < 0, self.frame_capacity, refs % self.frame_capacity)

    def _store(self, frames: np.ndarray) -> np.ndarray:
        """Append frames to the store; return their serials."""
        serials = self.frames_written + np.arange(len(frames))
        self.frame_store[serials % self.frame_capacity] = frames
        self.frames_written += len(frames)
        return serials

    def _store_stacks(self, stacks: np.ndarray) -> np.ndarray:
        """Store whole stacks, zero frames and repeats of the next frame deduplicated; return
        their serials, shaped ``(len(stacks), stack)``."""
        flat = stacks.reshape(*stacks.shape[:2], -1)
        zero = ~flat.any(axis=2)
        repeat = np.zeros_like(zero)
        repeat[:, :-1] = (flat[:, :-1] == flat[:, 1:]).all(axis=2)
        new = ~zero & ~repeat
        refs = np.full(zero.shape, -1, dtype=np.int64)
        refs[new] = self._store(stacks[new])
        for i in range(self.stack - 2, -1, -1):  # a repeat shares its successor's frame
            refs[:, i] = np.where(repeat[:, i], refs[:, i + 1], refs[:, i])
        return refs

    def _store_step(
        self, obs: np.ndarray, next_obs: np.ndarray, valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frame serials of the valid sub-envs' ``obs`` and ``next_obs``, storing new frames."""
        head = self.head[valid]
        # obs continues the sub-env's stream if it equals its last next_obs, whose frames
        # must be recent for the ``reach`` bound (after a long masked gap they are rewritten).
        recent = self.frames_written - self.stack * self.add_frames
        same = (np.where(head < 0, recent, head) >= recent).all(axis=1)
        if same.all():
            same = (self.frame_store[self._slots(head)] == obs).reshape(len(obs), -1).all(axis=1)
        elif same.any():
            old = self.frame_store[self._slots(head[same])]
            same[same] = (old == obs[same]).reshape(len(old), -1).all(axis=1)
        obs_refs = head
        if not same.all():  # a new episode (or a stream that does not continue)
            obs_refs[~same] = self._store_stacks(obs[~same])
        shifted = (next_obs[:, :-1] == obs[:, 1:]).reshape(len(obs), -1).all(axis=1)
        next_refs = np.empty_like(obs_refs)
        next_refs[:, :-1] = obs_refs[:, 1:]
        next_refs[shifted, -1] = self._store(next_obs[shifted, -1])
        if not shifted.all():
            next_refs[~shifted] = self._store_stacks(next_obs[~shifted])
        self.head[valid] = next_refs
        return obs_refs, next_refs

    def _evict(self) -> None:
        """Drop the oldest transitions whose frames may have been overwritten."""
        # Transition i refers to frames with serials >= written_at[i] - reach, and frames
        # with serials >= frames_written - frame_capacity are intact.
        threshold = self.frames_written - self.frame_capacity + self.reach
        while self.size:
            tail = (self.cursor - self.size) % self.capacity
            if self.written_at[tail] >= threshold:
                return
            chunk = (tail + np.arange(min(self.size, 4096))) % self.capacity
            count = int(np.searchsorted(self.written_at[chunk], threshold))
            self._drop(chunk[:count])
            self.size -= count

    def _drop(self, slots: np.ndarray) -> None:
        """Hook: ``slots`` leave the memory (overwritten frames)."""

    def _write(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        discounts: np.ndarray,
    ) -> np.ndarray:
        oldest = np.where(obs < 0, self.frames_written, obs).min(axis=1, initial=2**62)
        if (oldest < self.frames_written - self.reach).any():
            raise ValueError(
                "memory.add: an n-step window stayed open over masked steps; valid may be "
                "False only on the autoreset step after a done"
            )
        index = super()._write(obs, actions, rewards, next_obs, terminated, discounts)
        self.written_at[index] = self.frames_written
        self.filled = min(self.filled + len(index), self.capacity)
        return index

    def is_stored(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        tail = self.cursor - self.size
        in_range = (indices >= 0) & (indices < self.capacity)
        return in_range & ((indices - tail) % self.capacity < self.size)

    def _uniform_indices(self, count: int) -> np.ndarray:
        draws = self.rng.integers(0, self.size, count)
        tail = (self.cursor - self.size) % self.capacity
        # Without evictions the stored slots are [0, size) (the same slots as ReplayMemory).
        return draws if self.size == self.capacity or tail == 0 else (draws + tail) % self.capacity

    def batch(self, indices: np.ndarray) -> ReplayBatch:
        """As :meth:`ReplayMemory.batch`, with ``obs`` and ``next_obs`` rebuilt from frames."""
        out = super().batch(indices)
        return out._replace(
            obs=self.frame_store[self._slots(out.obs)],
            next_obs=self.frame_store[self._slots(out.next_obs)],
        )

    def state_dict(self) -> dict[str, Any]:
        """The :class:`ReplayMemory` state (frame serials for observations, every filled slot)
        plus the written frames (views, as there), their counter and each stream's head."""
        state = super().state_dict()
        state.update({name: getattr(self, name)[: self.filled] for name in self.fields})
        return {
            **state,
            "frame_capacity": self.frame_capacity,
            "frame_store": self.frame_store[: min(self.frames_written, self.frame_capacity)],
            "frames_written": self.frames_written,
            "head": self.head.copy(),
            "written_at": self.written_at[: self.filled],
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; capacities, num_envs, n_steps and shapes must match.

        Args:
            state: a :meth:`state_dict`.
        """
        saved = (state["frame_capacity"], state["frame_store"].shape[1:], state["head"].shape[1])
        if saved != (self.frame_capacity, self.frame_store.shape[1:], self.stack):
            raise ValueError(
                f"memory.frame_capacity, frame shape and stack of the saved memory {saved} "
                f"differ from this memory's {(self.frame_capacity, self.frame_store.shape[1:])}, "
                f"{self.stack}; they must match to restore it"
            )
        super().load_state_dict(state)
        self.frame_store[: len(state["frame_store"])] = state["frame_store"]
        self.frames_written = int(state["frames_written"])
        self.head[...] = state["head"]
        self.filled = int(state["filled"])
        self.written_at[: self.filled] = state["written_at"]


class PrioritizedFrameReplay(FrameReplay, PrioritizedReplay):
    """:class:`FrameReplay` sampled by priority, with :class:`PrioritizedReplay`'s sum tree.

    Transitions dropped for overwritten frames get priority 0, and
    :meth:`update_priorities` skips them, so they are never drawn again.

    Args:
        layout, frame_capacity: as in :class:`FrameReplay`.
        alpha, eps: as in :class:`PrioritizedReplay` (``FrameReplay`` passes them on along
            the method resolution order).
    """

    def _drop(self, slots: np.ndarray) -> None:
        self.tree.update(slots, 0.0)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """As :meth:`PrioritizedReplay.update_priorities`, skipping slots dropped since the
        batch was sampled (their priority stays 0)."""
        indices = np.asarray(indices, dtype=np.int64)
        stored = self.is_stored(indices)
        super().update_priorities(indices[stored], np.asarray(td_errors)[stored])
