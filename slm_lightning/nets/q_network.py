"""Action-value networks for discrete actions over flat or image observations, with an
optional dueling head."""

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from slm_lightning.nets.conv import ConvBody, ConvSpec, full_precision, observation_encoder
from slm_lightning.nets.mlp import _ACTIVATIONS, Activation, MLPSpec, mlp_body, orthogonal_init
from slm_lightning.schedules import Schedule, scheduled


class QNetwork(nn.Module):
    """``Q(s, ·)`` for every discrete action from a flat or image observation.

    With ``dueling`` the head splits into a state value and action advantages,
    ``Q = V + A - mean(A)`` (Wang et al. 2016, arXiv:1511.06581); subtracting the mean keeps
    V and A identifiable. On a conv trunk the dueling head is Wang et al.'s: the conv features
    feed two streams, each with its own ``conv.hidden_size`` linear layer.

    Args:
        observation_space: a Box of observations (flattened, or an image for the conv trunk).
        action_space: Discrete.
        body: the MLP body (after the conv trunk, if any).
        dueling: use the dueling head.
        conv: the conv trunk; None uses the Nature CNN for image observations (``(C, H, W)``
            Boxes, uint8 pixels scaled by 1/255) and no trunk otherwise.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Discrete,
        body: MLPSpec,
        dueling: bool = False,
        conv: ConvSpec | None = None,
    ) -> None:
        super().__init__()
        # A dueling conv net gives each stream its own hidden layer instead of sharing one.
        self.encoder = observation_encoder(observation_space, conv, hidden=not dueling)
        self.body, width = mlp_body(self.encoder.out_features, body)
        self.dueling = dueling
        n = int(action_space.n)
        conv = conv or ConvSpec()
        stream = conv.hidden_size if dueling and isinstance(self.encoder, ConvBody) else 0
        self.head = _stream(width, stream, n, conv.activation)
        self.value_head = _stream(width, stream, 1, conv.activation) if dueling else None

    def forward(self, obs: Tensor) -> Tensor:
        features = self.encoder(obs)
        with full_precision(features):
            hidden = self.body(features)
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


def _stream(in_features: int, hidden: int, out_features: int, activation: Activation) -> nn.Module:
    """A linear output layer, preceded by a hidden layer of width ``hidden`` if > 0."""
    if not hidden:
        return orthogonal_init(nn.Linear(in_features, out_features), 1.0)
    return nn.Sequential(
        orthogonal_init(nn.Linear(in_features, hidden), np.sqrt(2)),
        _ACTIVATIONS[activation](),
        orthogonal_init(nn.Linear(hidden, out_features), 1.0),
    )


def epsilon_greedy(q: Tensor, epsilon: float) -> Tensor:
    """Greedy actions, each replaced by a uniformly random one with probability ``epsilon``."""
    greedy = q.argmax(-1)
    if epsilon <= 0.0:
        return greedy
    random = torch.randint_like(greedy, q.shape[-1])
    return torch.where(torch.rand(greedy.shape, device=q.device) < epsilon, random, greedy)


def boltzmann(q: Tensor, temperature: float) -> Tensor:
    """Actions sampled from ``softmax(Q / temperature)``."""
    return torch.distributions.Categorical(
        logits=q / max(temperature, 1e-8), validate_args=False
    ).sample()


def exploration_setting(
    exploration: str,
    epsilon: float | Schedule,
    temperature: float | Schedule,
    frames: int,
    max_frames: int,
) -> tuple[str, float]:
    """The exploration rate in force at ``frames`` and its metric key: ``train/epsilon`` for
    ``epsilon_greedy``, ``train/temperature`` for ``boltzmann``.

    Args:
        exploration: ``epsilon_greedy`` or ``boltzmann``.
        epsilon: the exploration rate, constant or scheduled over frames.
        temperature: the Boltzmann temperature, constant or scheduled over frames.
        frames: the frame clock.
        max_frames: the training budget (the end of a schedule by default).
    """
    if exploration == "boltzmann":
        return "train/temperature", scheduled(temperature, frames, max_frames)
    return "train/epsilon", scheduled(epsilon, frames, max_frames)


def exploring_actions(q: Tensor, exploration: str, rate: float) -> Tensor:
    """Actions from Q-values ``(B, n)``: :func:`epsilon_greedy` with epsilon ``rate``, or
    :func:`boltzmann` with temperature ``rate``.

    Args:
        q: Q-values of every action.
        exploration: ``epsilon_greedy`` or ``boltzmann``.
        rate: its epsilon or temperature (:func:`exploration_setting`).
    """
    return boltzmann(q, rate) if exploration == "boltzmann" else epsilon_greedy(q, rate)
