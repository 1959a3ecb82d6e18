"""Returns and advantages for on-policy memory: GAE, n-step and Monte Carlo, as functions
and as the estimator objects a memory is built with.

All functions take ``(T, N)`` float arrays (time-major, one column per env) and never build
a return across an episode boundary:

- ``dones[t]`` (terminated or truncated) cuts the recursion after step ``t``;
- ``next_values[t]`` is ``V(s_{t+1})`` for the *true* next state, i.e. ``V(final_obs)``
  when episode ``t`` was truncated; it is used on truncation and ignored on termination.

Masked slots (gymnasium's NEXT_STEP autoreset steps) may hold anything, NaN included:
``np.where`` (not multiplication, since ``0 * NaN = NaN``) keeps them out of valid results.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Trajectory(Protocol):
    """The ``(T, N)`` arrays of one rollout an estimator reads (an
    :class:`~slm_lightning.data.onpolicy_memory.OnPolicyMemory`)."""

    rewards: np.ndarray
    values: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    valid: np.ndarray

    @property
    def next_values(self) -> np.ndarray: ...


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    dones: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    Args:
        rewards, values, next_values: ``(T, N)`` float arrays.
        terminated: ``(T, N)`` bool, true where the episode ended in a terminal state.
        dones: ``(T, N)`` bool, terminated or truncated.
        gamma: discount factor.
        lam: GAE lambda; 1 gives Monte Carlo returns bootstrapped at the rollout end, 0 gives TD(0).

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    bootstrap = np.where(terminated, 0.0, next_values)
    deltas = rewards + gamma * bootstrap - values
    advantages = np.zeros_like(deltas)
    next_advantage = np.zeros(deltas.shape[1:], dtype=deltas.dtype)
    for t in reversed(range(len(deltas))):
        next_advantage = deltas[t] + gamma * lam * np.where(dones[t], 0.0, next_advantage)
        advantages[t] = next_advantage
    return advantages, advantages + values


def nstep_returns(
    rewards: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    dones: np.ndarray,
    gamma: float,
    n: int,
) -> np.ndarray:
    """n-step returns ``sum_k gamma^k r_{t+k} + gamma^n V(s_{t+n})``.

    The sum stops early at an episode end (bootstrapping from ``next_values`` only on
    truncation) and at the rollout end (bootstrapping from the last ``next_values``).

    Args:
        rewards, next_values: ``(T, N)`` float arrays.
        terminated, dones: ``(T, N)`` bool arrays.
        gamma: discount factor.
        n: the number of steps summed before bootstrapping (>= 1).
    """
    steps = len(rewards)
    returns = np.zeros_like(rewards)
    for t in range(steps):
        ret = np.zeros(rewards.shape[1:], dtype=rewards.dtype)
        discount = 1.0
        open_ = np.ones(rewards.shape[1:], dtype=bool)
        horizon = min(n, steps - t)
        for k in range(horizon):
            s = t + k
            ret = np.where(open_, ret + discount * rewards[s], ret)
            discount *= gamma
            end = open_ & (dones[s] | (k == horizon - 1))
            ret = np.where(end & ~terminated[s], ret + discount * next_values[s], ret)
            open_ &= ~end
        returns[t] = ret
    return returns


def monte_carlo_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted reward-to-go within each episode, with no bootstrap.

    Used by REINFORCE, which has no critic: an episode still running at the end of the
    rollout contributes the rewards seen so far.

    Args:
        rewards: ``(T, N)`` float array.
        dones: ``(T, N)`` bool array.
        gamma: discount factor.
    """
    returns = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1:], dtype=rewards.dtype)
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * np.where(dones[t], 0.0, running)
        returns[t] = running
    return returns


@dataclass(frozen=True)
class GAE:
    """Generalised advantage estimation; the returns are ``advantages + values``.

    Args:
        gamma: discount factor.
        lam: GAE lambda (0: TD(0) targets, 1: Monte Carlo bootstrapped at the rollout end).
    """

    gamma: float
    lam: float

    def estimate(self, rollout: Trajectory) -> tuple[np.ndarray, np.ndarray]:
        """``(advantages, returns)`` of ``rollout``."""
        return gae(
            rollout.rewards,
            rollout.values,
            rollout.next_values,
            rollout.terminated,
            rollout.terminated | rollout.truncated,
            self.gamma,
            self.lam,
        )


@dataclass(frozen=True)
class NStepReturns:
    """n-step returns; the advantages are ``returns - values``.

    Args:
        gamma: discount factor.
        n: steps summed before bootstrapping.
    """

    gamma: float
    n: int

    def estimate(self, rollout: Trajectory) -> tuple[np.ndarray, np.ndarray]:
        """``(advantages, returns)`` of ``rollout``."""
        dones = rollout.terminated | rollout.truncated
        returns = nstep_returns(
            rollout.rewards, rollout.next_values, rollout.terminated, dones, self.gamma, self.n
        )
        return returns - rollout.values, returns


@dataclass(frozen=True)
class MonteCarloReturns:
    """Discounted reward-to-go with no critic: the advantage is the return itself, less the
    mean return over the rollout's real transitions when ``center`` (a constant baseline).

    Args:
        gamma: discount factor.
        center: subtract the mean return of the valid slots from the advantages.
    """

    gamma: float
    center: bool = False

    def estimate(self, rollout: Trajectory) -> tuple[np.ndarray, np.ndarray]:
        """``(advantages, returns)`` of ``rollout``."""
        returns = monte_carlo_returns(
            rollout.rewards, rollout.terminated | rollout.truncated, self.gamma
        )
        advantages = returns.copy()
        if self.center:
            advantages -= advantages[rollout.valid].mean()
        return advantages, returns


ReturnsEstimator = GAE | NStepReturns | MonteCarloReturns
