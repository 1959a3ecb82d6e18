"""A uniformly random agent: the baseline return of each environment."""

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.algorithms.policy_gradient import onpolicy_rollout
from slm_lightning.config_types import PositiveCount
from slm_lightning.data.onpolicy_memory import OnPolicyMemory
from slm_lightning.data.onpolicy_rollout import Minibatches, OnPolicyRollout
from slm_lightning.data.returns import MonteCarloReturns
from slm_lightning.envs.factory import EnvSpec


class RandomPolicy(nn.Module):
    """Uniform actions over a Discrete space or over a bounded Box (an unbounded Box
    dimension samples a standard normal). Has no parameters."""

    def __init__(self, action_space: spaces.Space) -> None:
        super().__init__()
        self.action_space = action_space

    def sample(self, n: int, device: torch.device) -> Tensor:
        space = self.action_space
        if isinstance(space, spaces.Discrete):
            return torch.randint(int(space.n), (n,), device=device) + int(space.start)
        low = torch.as_tensor(space.low, device=device)
        high = torch.as_tensor(space.high, device=device)
        bounded = torch.isfinite(low) & torch.isfinite(high)
        uniform = torch.rand((n, *space.shape), device=device)
        normal = torch.randn((n, *space.shape), device=device)
        safe_low, safe_high = torch.where(bounded, low, 0.0), torch.where(bounded, high, 0.0)
        return torch.where(bounded, safe_low + uniform * (safe_high - safe_low), normal)

    @staticmethod
    def env_actions(actions: np.ndarray) -> np.ndarray:
        return actions


class RandomAgent(RLAlgorithm):
    """Acts uniformly at random and never learns; its return is the env's random baseline.

    It rolls out like an on-policy algorithm (one rollout of ``time_horizon`` steps per
    Lightning epoch, one minibatch that trains nothing) and has no optimizer.

    Args:
        env: the environment spec.
        max_frames: frames to play (all envs, all ranks).
        time_horizon: vector steps per rollout (one Lightning epoch).
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
    """

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 100_000,
        time_horizon: int = 128,
        eval_episodes: int = 10,
    ) -> None:
        super().__init__(env, max_frames, gamma=1.0, eval_episodes=eval_episodes, eval_greedy=False)
        self.save_hyperparameters()
        self.check_positive(time_horizon=time_horizon)
        self.time_horizon = time_horizon
        self.policy = RandomPolicy(self.action_space)
        self.memory: OnPolicyMemory | None = None

    @override
    def build_rollout(self) -> OnPolicyRollout:
        # The episodes' returns; nothing trains on them.
        self.memory, rollout = onpolicy_rollout(
            self, self.time_horizon, MonteCarloReturns(self.gamma)
        )
        return rollout

    def act(
        self, obs: Tensor, state: None, episode_starts: None
    ) -> tuple[Tensor, Tensor, None, None]:
        """Uniform actions (log-probs 0, no values, no state)."""
        actions = self.policy.sample(obs.shape[0], obs.device)
        return actions, torch.zeros(obs.shape[0], device=obs.device), None, None

    def bootstrap_values(self, obs: Tensor, state: None, episode_starts: None) -> None:
        return None

    @override
    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        return self.policy.sample(obs.shape[0], obs.device)

    @override
    def configure_optimizers(self) -> None:
        return None  # nothing to learn

    @override
    def training_step(self, batch: Minibatches, batch_idx: int) -> None:
        return None
