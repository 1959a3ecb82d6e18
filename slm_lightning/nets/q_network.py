"""Action-value networks for discrete actions, with an optional dueling head."""

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from slm_lightning.nets.mlp import MLPSpec, mlp_body, orthogonal_init


class QNetwork(nn.Module):
    """``Q(s, ·)`` for every discrete action from a flat observation.

    With ``dueling`` the head splits into a state value and action advantages,
    ``Q = V + A - mean(A)`` (Wang et al. 2016, arXiv:1511.06581); subtracting the mean keeps
    V and A identifiable.

    Args:
        observation_space: a Box of observations (flattened).
        action_space: Discrete.
        body: the MLP body.
        dueling: use the dueling head.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Discrete,
        body: MLPSpec,
        dueling: bool = False,
    ) -> None:
        super().__init__()
        self.body, width = mlp_body(int(np.prod(observation_space.shape)), body)
        self.dueling = dueling
        n = int(action_space.n)
        self.head = orthogonal_init(nn.Linear(width, n), 1.0)
        self.value_head = orthogonal_init(nn.Linear(width, 1), 1.0) if dueling else None

    def forward(self, obs: Tensor) -> Tensor:
        hidden = self.body(obs.flatten(1).float())
        q = self.head(hidden)
        if self.value_head is not None:
            q = self.value_head(hidden) + q - q.mean(dim=-1, keepdim=True)
        return q

    def param_groups(self) -> list[list[nn.Parameter]]:
        """One optimizer parameter group: the whole network."""
        return [list(self.parameters())]

    @staticmethod
    def env_actions(actions: np.ndarray) -> np.ndarray:
        return actions


def epsilon_greedy(q: Tensor, epsilon: float) -> Tensor:
    """Greedy actions, each replaced by a uniformly random one with probability ``epsilon``."""
    greedy = q.argmax(-1)
    if epsilon <= 0.0:
        return greedy
    random = torch.randint_like(greedy, q.shape[-1])
    return torch.where(torch.rand(greedy.shape, device=q.device) < epsilon, random, greedy)


def boltzmann(q: Tensor, temperature: float) -> Tensor:
    """Actions sampled from ``softmax(Q / temperature)``."""
    return torch.distributions.Categorical(logits=q / max(temperature, 1e-8)).sample()
