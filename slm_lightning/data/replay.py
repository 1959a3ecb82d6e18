"""Off-policy replay memory: preallocated circular storage with n-step returns, its layout
(:class:`ReplayLayout`) and its typed samples (:class:`ReplayBatch`)."""

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from slm_lightning.errors import ConfigError

# The arrays of a batch: numpy from the memory, tensors once the rollout hands it to Lightning.
Array = np.ndarray | Tensor


class ReplayBatch(NamedTuple):
    """Sampled transitions, numpy arrays from the memory or tensors for ``training_step``.

    The TD target of row ``i`` is ``rewards[i] + discounts[i] * (1 - terminated[i]) *
    V(next_obs[i])``.

    Args:
        obs: observations the actions were taken in ``(B, *obs_shape)``.
        actions: actions taken ``(B, *action_shape)``.
        rewards: (n-step discounted) rewards ``(B,)``.
        next_obs: observations after the (last) step ``(B, *obs_shape)``.
        discounts: ``gamma^k`` of each transition's k steps ``(B,)``.
        terminated: float32 1 where ``next_obs`` is terminal, 0 otherwise ``(B,)``.
        indices: the memory slots drawn ``(B,)``, for ``update_priorities``.
        weights: importance-sampling weights ``(B,)`` of prioritized replay; None otherwise.
    """

    obs: Array
    actions: Array
    rewards: Array
    next_obs: Array
    discounts: Array
    terminated: Array
    indices: Array
    weights: Array | None = None

    def as_tensors(self, device: torch.device | str | None = None) -> "ReplayBatch":
        """The same batch as tensors: sharing the arrays' memory on the CPU, copied (without
        waiting for the copy) to ``device`` otherwise. None stays None.

        Args:
            device: where the tensors go; None keeps them on the CPU.
        """
        if device is None or torch.device(device).type == "cpu":
            return ReplayBatch(*(None if x is None else torch.from_numpy(x) for x in self))
        return ReplayBatch(
            *(
                None if x is None else torch.from_numpy(x).to(device, non_blocking=True)
                for x in self
            )
        )

    def at(self, index: int) -> "ReplayBatch":
        """Batch ``index`` of a stack from :meth:`ReplayMemory.sample_stack` (its first axis).

        Args:
            index: which batch of the stack.
        """
        return ReplayBatch(*(None if x is None else x[index] for x in self))


def stacked(flat: ReplayBatch, count: int) -> ReplayBatch:
    """``flat``'s ``count * B`` rows as ``count`` batches of ``B`` (a view of each array)."""
    return ReplayBatch(*(None if x is None else x.reshape(count, -1, *x.shape[1:]) for x in flat))


@dataclass(frozen=True)
class ReplayLayout:
    """What a replay memory stores and how it samples: the one constructor argument every
    replay class shares (see :class:`ReplayMemory`). Dtypes are normalised to ``np.dtype``,
    float observations to float32; shapes to tuples.

    Bad values raise a :class:`~slm_lightning.errors.ConfigError` naming the config key
    that sets the field (the algorithms check these keys first; this catches a memory built
    directly).

    Args:
        capacity: transitions kept; the oldest are overwritten first.
        num_envs: envs per ``add`` call (leading dimension of its arrays).
        obs_shape: one observation's shape.
        obs_dtype: stored observation dtype: float observations are stored as float32, any
            other dtype (uint8 frames) is kept.
        action_shape: one action's shape.
        action_dtype: stored action dtype.
        n_steps: steps aggregated into one transition (1: plain one-step transitions).
        gamma: discount of the n-step reward sum and of ``discounts``.
        combined: combined experience replay (Zhang & Sutton 2017, "A Deeper Look at
            Experience Replay"): every batch contains the transitions written by the last
            ``add``, which removes the delay before new data is first learnt from.
        seed: seed of the memory's own sampling generator.
    """

    capacity: int
    num_envs: int
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    action_shape: tuple[int, ...]
    action_dtype: np.dtype
    n_steps: int = 1
    gamma: float = 0.99
    combined: bool = False
    seed: int = 0

    # The key under ``model.init_args`` that sets each field, for messages.
    config_keys: ClassVar[dict[str, str]] = {
        "capacity": "memory_size",
        "num_envs": "env.num_envs",
        "n_steps": "n_steps",
        "gamma": "gamma",
    }

    def __post_init__(self) -> None:
        for field in ("capacity", "num_envs", "n_steps"):
            value = getattr(self, field)
            if value < 1:
                key = self.config_keys[field]
                raise ConfigError(f"model.init_args.{key} must be >= 1, got {value}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"model.init_args.gamma must be in [0, 1], got {self.gamma}")
        obs_dtype = np.dtype(self.obs_dtype)
        if np.issubdtype(obs_dtype, np.floating):
            obs_dtype = np.dtype(np.float32)
        # Frozen: normalise through object.__setattr__, as the dataclasses docs advise.
        object.__setattr__(self, "obs_dtype", obs_dtype)
        object.__setattr__(self, "action_dtype", np.dtype(self.action_dtype))
        object.__setattr__(self, "obs_shape", tuple(self.obs_shape))
        object.__setattr__(self, "action_shape", tuple(self.action_shape))


def replay_layout(
    observation_space: spaces.Box,
    action_space: spaces.Space,
    capacity: int,
    num_envs: int,
    seed: int,
    gamma: float = 0.99,
    n_steps: int = 1,
    combined: bool = False,
) -> ReplayLayout:
    """The layout of a memory for one env's spaces: observations as the space gives them
    (floats as float32); Discrete actions as int64 scalars, Box actions as float32.

    Args:
        observation_space: the env's (single) observation space.
        action_space: the env's (single) action space; a Box is stored as it is given to
            ``add`` (SAC stores the actor's ``[-1, 1]`` actions).
        capacity, num_envs, seed, gamma, n_steps, combined: as in :class:`ReplayLayout`.
    """
    discrete = isinstance(action_space, spaces.Discrete)
    return ReplayLayout(
        capacity=capacity,
        num_envs=num_envs,
        obs_shape=observation_space.shape,
        obs_dtype=observation_space.dtype,
        action_shape=() if discrete else action_space.shape,
        action_dtype=np.dtype(np.int64 if discrete else np.float32),
        n_steps=n_steps,
        gamma=gamma,
        combined=combined,
        seed=seed,
    )


class ReplayMemory:
    """Circular memory of (possibly n-step) transitions from a gymnasium vector env.

    One stored transition is ``(obs, action, reward, next_obs, terminated, discount)`` with the
    TD target ``reward + discount * (1 - terminated) * Q(next_obs)``. With ``n_steps = k > 1``
    ``reward = sum_i gamma^i r_{t+i}`` over the window, ``next_obs`` is the observation after
    its last step and ``discount = gamma^len(window)`` (Sutton & Barto 2018, sec. 7.1; Rainbow,
    Hessel et al. 2018). A window is cut short at an episode end: a termination stores
    ``terminated = True``; a truncation stores ``terminated = False`` so that the target
    bootstraps from the final observation (Pardo et al. 2018, "Time Limits in RL").

    ``next_obs`` is stored explicitly rather than read from the next slot: with vector envs,
    autoreset and n-step windows the next slot is rarely the next observation.

    Args:
        layout: capacity, shapes and dtypes, n-step and sampling settings (its fields are
            also this memory's attributes ``capacity``, ``num_envs``, ``n_steps`` …).
    """

    # Name of the arrays that hold observations: ``obs``, ``next_obs`` and ``pending_obs``
    # here; :class:`~slm_lightning.data.frame_replay.FrameReplay` keeps the serial numbers of
    # the observations' frames there instead, and names them so.
    obs_name = "obs"

    def __init__(self, layout: ReplayLayout) -> None:
        self.layout = layout
        capacity, num_envs, n_steps = layout.capacity, layout.num_envs, layout.n_steps
        self.capacity, self.num_envs, self.n_steps = capacity, num_envs, n_steps
        self.gamma, self.combined = layout.gamma, layout.combined
        obs_shape, obs_dtype = layout.obs_shape, layout.obs_dtype
        action_shape, action_dtype = layout.action_shape, layout.action_dtype
        self.obs_dtype = obs_dtype  # of the observations that add takes and sample returns
        stored_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        setattr(self, self.obs_name, stored_obs)
        setattr(self, f"next_{self.obs_name}", np.zeros_like(stored_obs))
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.cursor = 0  # next slot to write
        self.size = 0
        self.last_indices = np.zeros(0, dtype=np.int64)  # slots written by the last add
        self.rng = np.random.default_rng(layout.seed)
        # Pending windows, oldest first: rewards accumulate sum_i gamma^i r_i in float64,
        # steps counts the steps each window has aggregated so far.
        pend = (num_envs, n_steps)
        setattr(self, f"pending_{self.obs_name}", np.zeros((*pend, *obs_shape), dtype=obs_dtype))
        self.pending_actions = np.zeros((*pend, *action_shape), dtype=action_dtype)
        self.pending_rewards = np.zeros(pend, dtype=np.float64)
        self.pending_steps = np.zeros(pend, dtype=np.int64)
        self.pending_count = np.zeros(num_envs, dtype=np.int64)

    def __len__(self) -> int:
        return self.size

    @property
    def fields(self) -> tuple[str, ...]:
        """The storage arrays, each shaped ``(capacity, …)``, in :meth:`_write`'s order; a
        checkpoint saves their filled prefix."""
        name = self.obs_name
        return (name, "actions", "rewards", f"next_{name}", "terminated", "discounts")

    @property
    def pending_fields(self) -> tuple[str, ...]:
        """The pending n-step windows, each shaped ``(num_envs, n_steps, …)``."""
        return tuple(f"pending_{n}" for n in (self.obs_name, "actions", "rewards", "steps"))

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
        """Store one vector step (arrays with leading dimension ``num_envs``).

        Args:
            obs: observations the actions were taken in.
            actions: actions taken.
            rewards: rewards received.
            next_obs: the true next observations: the final observation where an episode
                ended (``info["final_obs"]``), not the reset observation.
            terminated, truncated: episode-end flags of this step.
            valid: false for gymnasium's NEXT_STEP autoreset steps (the step after a done),
                whose transition is not real; those slots are skipped.
        """
        valid = np.asarray(valid, dtype=bool)
        terminated = np.asarray(terminated, dtype=bool)
        rewards = np.asarray(rewards)
        if self.n_steps == 1:
            discounts = np.full(int(valid.sum()), self.gamma, dtype=np.float32)
            self.last_indices = self._write(
                obs[valid], actions[valid], rewards[valid], next_obs[valid],
                terminated[valid], discounts,
            )  # fmt: skip
            return
        done = valid & (terminated | np.asarray(truncated, dtype=bool))
        self._add_nstep(obs, actions, rewards, next_obs, terminated, done, valid)

    def _add_nstep(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        done: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        # Vectorised over envs: open a window for each valid env, add this step's reward to
        # every open window, then emit the windows that are complete (full or episode end).
        env = np.flatnonzero(valid)
        slot = self.pending_count[env]
        pending_obs = getattr(self, f"pending_{self.obs_name}")
        pending_obs[env, slot] = obs[env]
        self.pending_actions[env, slot] = actions[env]
        self.pending_rewards[env, slot] = 0.0
        self.pending_steps[env, slot] = 0
        self.pending_count[env] += 1
        open_ = (np.arange(self.n_steps) < self.pending_count[:, None]) & valid[:, None]
        # np.where, not a product: invalid slots may carry NaN rewards.
        step_rewards = np.where(valid, rewards, 0.0).astype(np.float64)
        self.pending_rewards += open_ * (self.gamma**self.pending_steps) * step_rewards[:, None]
        self.pending_steps += open_
        full = valid & ~done & (self.pending_count == self.n_steps)
        emit = open_ & (done[:, None] | (full[:, None] & (np.arange(self.n_steps) == 0)))
        env, slot = np.nonzero(emit)  # env-major, oldest window first
        self.last_indices = self._write(
            pending_obs[env, slot],
            self.pending_actions[env, slot],
            self.pending_rewards[env, slot],
            next_obs[env],
            terminated[env],
            self.gamma ** self.pending_steps[env, slot],
        )
        self.pending_count[done] = 0
        shift = np.flatnonzero(full)  # drop the emitted oldest window
        for name in self.pending_fields:
            arr = getattr(self, name)
            arr[shift, :-1] = arr[shift, 1:]
        self.pending_count[shift] -= 1

    def _write(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        discounts: np.ndarray,
    ) -> np.ndarray:
        """Write a batch of transitions at the cursor; return the slots written."""
        count = len(rewards)
        if count > self.capacity:  # only the newest ``capacity`` would survive anyway
            obs, actions, rewards, next_obs, terminated, discounts = (
                x[-self.capacity :]
                for x in (obs, actions, rewards, next_obs, terminated, discounts)
            )
            count = self.capacity
        index = (self.cursor + np.arange(count)) % self.capacity
        values = (obs, actions, rewards, next_obs, terminated, discounts)
        for name, value in zip(self.fields, values, strict=True):
            getattr(self, name)[index] = value
        self.cursor = (self.cursor + count) % self.capacity
        self.size = min(self.size + count, self.capacity)
        return index

    def _check_sample(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"memory batch_size must be >= 1, got {batch_size}")
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay memory: add transitions first")

    def is_stored(self, indices: np.ndarray) -> np.ndarray:
        """Whether each slot in ``indices`` holds a transition that can be sampled.

        Args:
            indices: slots in ``[0, capacity)``.
        """
        indices = np.asarray(indices)
        return (indices >= 0) & (indices < self.size)

    def _uniform_indices(self, count: int) -> np.ndarray:
        """``count`` stored slots drawn uniformly with replacement."""
        return self.rng.integers(0, self.size, count)

    def batch(self, indices: np.ndarray) -> ReplayBatch:
        """The transitions at ``indices`` (copies), with ``terminated`` as float32 0/1.

        Args:
            indices: slots in ``[0, len(self))``.
        """
        stored_obs, actions, rewards, stored_next_obs, terminated, discounts = (
            getattr(self, name)[indices] for name in self.fields
        )
        return ReplayBatch(
            obs=stored_obs,
            actions=actions,
            rewards=rewards,
            next_obs=stored_next_obs,
            discounts=discounts,
            terminated=terminated.astype(np.float32),
            indices=indices,
        )

    def sample(self, batch_size: int) -> ReplayBatch:
        """Sample ``batch_size`` transitions uniformly with replacement.

        With ``combined``, the batch starts with the transitions written by the last
        :meth:`add` (the newest ``batch_size`` of them if there are more) and the rest is
        uniform.

        Args:
            batch_size: transitions in the batch.

        Returns:
            The batch, ``weights`` None.
        """
        self._check_sample(batch_size)
        newest = self.last_indices[-batch_size:] if self.combined else self.last_indices[:0]
        uniform = self._uniform_indices(batch_size - len(newest))
        return self.batch(np.concatenate([newest, uniform]))

    def sample_stack(self, count: int, batch_size: int, **sample_args: float) -> ReplayBatch:
        """``count`` batches of ``batch_size`` in one draw, stacked on a new first axis
        (``obs`` ``(count, batch_size, *obs_shape)``): the batches of one round of updates,
        sampled with one gather instead of ``count``.

        They come from the memory as it is now, as ``count`` calls of :meth:`sample` would
        between two env steps. ``stack.at(k)`` is batch ``k``.

        Args:
            count: batches.
            batch_size: transitions per batch.
            sample_args: passed to :meth:`sample` (prioritized replay's ``beta``).
        """
        if count < 1:
            raise ValueError(f"memory count must be >= 1, got {count}")
        if self.combined:  # each batch starts with the newest transitions: sample them one by one
            batches = [self.sample(batch_size, **sample_args) for _ in range(count)]
            return ReplayBatch(
                *(None if x[0] is None else np.stack(x) for x in zip(*batches, strict=True))
            )
        self._check_sample(batch_size)
        flat = self.batch(self._uniform_indices(count * batch_size))
        return stacked(flat, count)

    def state_dict(self) -> dict[str, Any]:
        """Filled storage, cursor, pending n-step windows and the sampling generator.

        Storage arrays are views, not copies (a checkpoint serialises them at once, and a
        copy of a full memory would double its footprint): copy them to keep a snapshot.
        """
        return {
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "n_steps": self.n_steps,
            **{name: getattr(self, name)[: self.size] for name in self.fields},
            "cursor": self.cursor,
            "size": self.size,
            "last_indices": self.last_indices.copy(),
            **{name: getattr(self, name).copy() for name in self.pending_fields},
            "pending_count": self.pending_count.copy(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; capacity, num_envs and n_steps must match.

        Args:
            state: a :meth:`state_dict`.
        """
        for key in ("capacity", "num_envs", "n_steps"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"memory.{key} of the saved memory ({state[key]}) differs from this "
                    f"memory's ({getattr(self, key)}); they must match to restore it"
                )
        self.size, self.cursor = int(state["size"]), int(state["cursor"])
        for name in self.fields:
            getattr(self, name)[: len(state[name])] = state[name]
        self.last_indices = np.asarray(state["last_indices"], dtype=np.int64)
        for name in (*self.pending_fields, "pending_count"):
            getattr(self, name)[...] = state[name]
        self.rng.bit_generator.state = state["rng"]
