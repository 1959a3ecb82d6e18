"""Preallocated on-policy memory of one rollout, shaped ``(time_horizon, num_envs, …)``."""

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from slm_lightning.data.returns import gae, monte_carlo_returns, nstep_returns

ReturnsEstimator = Literal["gae", "nstep", "monte_carlo"]


class OnPolicyMemory:
    """One rollout of transitions plus the returns and advantages computed from it.

    ``valid[t, i]`` is false for gymnasium's NEXT_STEP autoreset steps (the step after a
    ``done``, whose action is ignored by the env): those slots never reach a minibatch.
    ``values[t + 1, i]`` of such a step is ``V(final_obs)``, which is exactly the bootstrap
    value a truncated step ``t`` needs.

    A recurrent policy's memory (``state_size > 0``) also keeps ``states[t, i]``, the hidden
    state sub-env ``i`` carried into step ``t`` (before any reset), and ``episode_starts[t,
    i]``, true where ``obs[t, i]`` is an episode's first observation (the state is zeroed
    there); :meth:`sequence_tensors` cuts the rollout into training sequences.

    Args:
        time_horizon: vector steps per rollout (``T``).
        num_envs: envs per process (``N``).
        obs_shape, obs_dtype: single observation shape and dtype (uint8 stays uint8).
        action_shape, action_dtype: single action shape and dtype.
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
        state_size: int = 0,
    ) -> None:
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

    @property
    def next_values(self) -> np.ndarray:
        """``V(s_{t+1})`` for every slot: the next row's values, then the bootstrap values."""
        return np.concatenate([self.values[1:], self.last_values[None]], axis=0)

    def compute_returns(
        self, estimator: ReturnsEstimator, gamma: float, gae_lambda: float = 0.95, n_steps: int = 5
    ) -> None:
        """Fill ``advantages`` and ``returns`` with the chosen estimator.

        For ``monte_carlo`` (no critic) the advantage is the return itself.
        """
        dones = self.terminated | self.truncated
        if estimator == "gae":
            self.advantages, self.returns = gae(
                self.rewards,
                self.values,
                self.next_values,
                self.terminated,
                dones,
                gamma,
                gae_lambda,
            )
        elif estimator == "nstep":
            self.returns = nstep_returns(
                self.rewards, self.next_values, self.terminated, dones, gamma, n_steps
            )
            self.advantages = self.returns - self.values
        elif estimator == "monte_carlo":
            self.returns = monte_carlo_returns(self.rewards, dones, gamma)
            self.advantages = self.returns.copy()
        else:
            raise ValueError(
                f"returns estimator must be gae, nstep or monte_carlo, got {estimator!r}"
            )

    def explained_variance(self) -> float:
        """``1 - Var(returns - values) / Var(returns)`` over valid slots (1 is a perfect critic)."""
        returns, values = self.returns[self.valid], self.values[self.valid]
        var = float(np.var(returns))
        return float("nan") if var == 0 else 1.0 - float(np.var(returns - values)) / var

    def flat_tensors(self) -> dict[str, Tensor]:
        """The rollout as flat ``(T * N, …)`` CPU tensors sharing this memory's storage."""
        fields = {
            "obs": self.obs,
            "actions": self.actions,
            "log_probs": self.log_probs,
            "values": self.values,
            "advantages": self.advantages,
            "returns": self.returns,
        }
        return {
            key: torch.from_numpy(arr.reshape(-1, *arr.shape[2:])) for key, arr in fields.items()
        }

    def sequence_tensors(self, length: int) -> dict[str, Tensor]:
        """The rollout cut into ``(T // length) * N`` sequences of ``length`` steps, for a
        recurrent policy: fields shaped ``(sequences, length, …)`` plus ``states``, the
        ``(sequences, state_size)`` hidden state each sequence began with.

        Sequence ``k * N + i`` is sub-env ``i``'s steps ``k * length`` to
        ``(k + 1) * length - 1``. ``valid`` and ``episode_starts`` come along so training
        can mask the NEXT_STEP autoreset slots and zero the state where episodes start.
        """
        horizon, num_envs = self.valid.shape
        if horizon % length:
            raise ValueError(f"time_horizon {horizon} is not a multiple of sequence {length}")
        fields = {
            "obs": self.obs,
            "actions": self.actions,
            "log_probs": self.log_probs,
            "values": self.values,
            "advantages": self.advantages,
            "returns": self.returns,
            "valid": self.valid,
            "episode_starts": self.episode_starts,
        }
        chunks = horizon // length

        def cut(arr: np.ndarray) -> Tensor:
            # (T, N, …) -> (T/L, L, N, …) -> (T/L, N, L, …) -> (T/L * N, L, …)
            arr = arr.reshape(chunks, length, num_envs, *arr.shape[2:]).swapaxes(1, 2)
            return torch.from_numpy(np.ascontiguousarray(arr).reshape(-1, *arr.shape[2:]))

        out = {key: cut(arr) for key, arr in fields.items()}
        out["states"] = torch.from_numpy(
            self.states[::length].reshape(chunks * num_envs, self.states.shape[-1])
        )
        return out
