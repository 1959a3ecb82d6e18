"""Preallocated on-policy memory of one rollout, shaped ``(time_horizon, num_envs, …)``."""

from typing import NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from slm_lightning.data.returns import ReturnsEstimator


class OnPolicyBatch(NamedTuple):
    """A minibatch of a feed-forward policy's rollout: flat ``(B, …)`` tensors."""

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor


class RecurrentBatch(NamedTuple):
    """A minibatch of whole sequences for a recurrent policy: per-step fields shaped
    ``(B, L, …)``, ``valid`` masking NEXT_STEP autoreset slots, ``episode_starts`` where the
    state is zeroed, and ``states``, the ``(B, state_size)`` state each sequence began with."""

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    valid: Tensor
    episode_starts: Tensor
    states: Tensor


class OnPolicyMemory:
    """One rollout of transitions plus the returns and advantages computed from it.

    ``valid[t, i]`` is false for gymnasium's NEXT_STEP autoreset steps (the step after a
    ``done``, whose action is ignored by the env): those slots never reach a minibatch.
    ``values[t + 1, i]`` of such a step is ``V(final_obs)``, which is exactly the bootstrap
    value a truncated step ``t`` needs.

    A recurrent policy's memory (``state_size > 0``) also keeps ``states[t, i]``, the hidden
    state sub-env ``i`` carried into step ``t`` (before any reset), and ``episode_starts[t,
    i]``, true where ``obs[t, i]`` is an episode's first observation (the state is zeroed
    there); :meth:`sequence_batch` cuts the rollout into training sequences.

    Returns and advantages are computed here, by the ``estimator`` the memory is built
    with, once the rollout has filled it (:meth:`compute_returns`).

    Args:
        time_horizon: vector steps per rollout (``T``).
        num_envs: envs per process (``N``).
        obs_shape, obs_dtype: single observation shape and dtype (uint8 stays uint8).
        action_shape, action_dtype: single action shape and dtype.
        estimator: how returns and advantages are computed (GAE, n-step, Monte Carlo).
        state_size: width of a recurrent policy's flat hidden state; 0 for none.
    """

    def __init__(
        self,
        time_horizon: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype,
        action_shape: tuple[int, ...],
        action_dtype: np.dtype,
        estimator: ReturnsEstimator,
        state_size: int = 0,
    ) -> None:
        self.estimator = estimator
        shape = (time_horizon, num_envs)
        self.obs = np.zeros((*shape, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros((*shape, *action_shape), dtype=action_dtype)
        self.log_probs = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.terminated = np.zeros(shape, dtype=bool)
        self.truncated = np.zeros(shape, dtype=bool)
        self.valid = np.ones(shape, dtype=bool)
        self.last_values = np.zeros(num_envs, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)
        self.states = np.zeros((*shape, state_size), dtype=np.float32)
        self.episode_starts = np.zeros(shape, dtype=bool)

    @classmethod
    def for_spaces(
        cls,
        time_horizon: int,
        num_envs: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        estimator: ReturnsEstimator,
        state_size: int = 0,
    ) -> "OnPolicyMemory":
        """The memory for one env's spaces: float observations stored as float32 (integer
        ones, e.g. uint8 pixels, keep their dtype), scalar actions as int64, others float32.

        Args:
            time_horizon: vector steps per rollout.
            num_envs: envs per process.
            observation_space: a single env's observation space.
            action_space: a single env's action space.
            estimator: how returns and advantages are computed.
            state_size: width of a recurrent policy's flat hidden state; 0 for none.
        """
        obs_dtype = observation_space.dtype
        obs_dtype = np.float32 if np.issubdtype(obs_dtype, np.floating) else obs_dtype
        action_dtype = np.int64 if action_space.shape == () else np.float32
        return cls(
            time_horizon,
            num_envs,
            observation_space.shape,
            obs_dtype,
            action_space.shape,
            action_dtype,
            estimator,
            state_size,
        )

    @property
    def time_horizon(self) -> int:
        """Vector steps per rollout (``T``)."""
        return len(self.valid)

    @property
    def next_values(self) -> np.ndarray:
        """``V(s_{t+1})`` for every slot: the next row's values, then the bootstrap values."""
        return np.concatenate([self.values[1:], self.last_values[None]], axis=0)

    def compute_returns(self) -> None:
        """Fill ``advantages`` and ``returns`` with the memory's estimator (the rollout calls
        this once ``last_values`` holds the bootstrap values)."""
        self.advantages, self.returns = self.estimator.estimate(self)

    def explained_variance(self) -> float:
        """``1 - Var(returns - values) / Var(returns)`` over valid slots (1 is a perfect critic)."""
        returns, values = self.returns[self.valid], self.values[self.valid]
        var = float(np.var(returns))
        return float("nan") if var == 0 else 1.0 - float(np.var(returns - values)) / var

    def flat_batch(self) -> OnPolicyBatch:
        """The rollout as flat ``(T * N, …)`` CPU tensors sharing this memory's storage."""
        fields = (
            self.obs,
            self.actions,
            self.log_probs,
            self.values,
            self.advantages,
            self.returns,
        )
        return OnPolicyBatch(*(torch.from_numpy(a.reshape(-1, *a.shape[2:])) for a in fields))

    def sequence_batch(self, length: int) -> RecurrentBatch:
        """The rollout cut into ``(T // length) * N`` sequences of ``length`` steps, for a
        recurrent policy: fields shaped ``(sequences, length, …)`` plus ``states``, the
        ``(sequences, state_size)`` hidden state each sequence began with (see
        :class:`RecurrentBatch`).

        Sequence ``k * N + i`` is sub-env ``i``'s steps ``k * length`` to
        ``(k + 1) * length - 1``. ``valid`` and ``episode_starts`` come along so training
        can mask the NEXT_STEP autoreset slots and zero the state where episodes start.
        """
        horizon, num_envs = self.valid.shape
        if horizon % length:
            raise ValueError(f"time_horizon {horizon} is not a multiple of sequence {length}")
        fields = (
            self.obs,
            self.actions,
            self.log_probs,
            self.values,
            self.advantages,
            self.returns,
            self.valid,
            self.episode_starts,
        )
        chunks = horizon // length

        def cut(arr: np.ndarray) -> Tensor:
            # (T, N, …) -> (T/L, L, N, …) -> (T/L, N, L, …) -> (T/L * N, L, …)
            arr = arr.reshape(chunks, length, num_envs, *arr.shape[2:]).swapaxes(1, 2)
            return torch.from_numpy(np.ascontiguousarray(arr).reshape(-1, *arr.shape[2:]))

        states = self.states[::length].reshape(chunks * num_envs, self.states.shape[-1])
        return RecurrentBatch(*(cut(arr) for arr in fields), torch.from_numpy(states))
