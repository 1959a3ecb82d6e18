"""Recurrent (GRU / LSTM) actor-critic whose hidden state is carried through the rollout.

SLM Lab's RecurrentNet fed the cell a sequence that repeated the current state (its issue
#383), so it had no memory at all. Here the hidden state really flows: the rollout carries
it from step to step and zeroes it where an episode starts, stores the state each step began
with, and training runs the cell over ``(batch, sequence)`` chunks of the rollout, starting
from the stored state of each chunk's first step and re-applying the episode starts inside
the chunk (truncated backpropagation through time over ``sequence_length`` steps).

Hidden states travel as one flat ``(batch, state_size)`` tensor: a GRU core contributes its
``h``, an LSTM core ``[h, c]``, and separate actor and critic cores are concatenated.
"""

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn
from torch.distributions import Distribution

from slm_lightning.errors import ConfigError
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvSpec, observation_encoder
from slm_lightning.nets.mlp import _ACTIVATIONS, Activation, MLPSpec, mlp_body, orthogonal_init

Cell = Literal["gru", "lstm"]


@dataclass
class RecurrentSpec:
    """Shape of a recurrent core and how PPO trains it.

    Args:
        cell: ``gru`` or ``lstm``.
        hidden_size: width of the cell's hidden state.
        input_sizes: hidden layers of an MLP between the observation and the cell; empty
            feeds the (flattened or conv-encoded) observation straight into the cell.
        activation: non-linearity of that MLP.
        sequence_length: steps per training sequence (the truncated-BPTT length); the
            rollout's ``time_horizon`` must be a multiple of it. None: whole rollout columns.
    """

    cell: Cell = "gru"
    hidden_size: int = 64
    input_sizes: list[int] = field(default_factory=list)
    activation: Activation = "tanh"
    sequence_length: int | None = None

    def check(self, key: str) -> None:
        """Raise a :class:`ConfigError` naming ``key`` (e.g. ``model.init_args.recurrent``)
        for a core no net can be built from.

        Args:
            key: where the user typed this spec.
        """
        if self.cell not in ("gru", "lstm"):
            raise ConfigError(f"{key}.cell must be one of gru, lstm, got {self.cell!r}")
        if self.hidden_size < 1:
            raise ConfigError(f"{key}.hidden_size must be >= 1, got {self.hidden_size}")
        if any(size < 1 for size in self.input_sizes):
            raise ConfigError(f"{key}.input_sizes must all be >= 1, got {self.input_sizes}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(
                f"{key}.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.sequence_length is not None and self.sequence_length < 1:
            raise ConfigError(
                f"{key}.sequence_length must be >= 1 or None, got {self.sequence_length}"
            )


class RecurrentCore(nn.Module):
    """Observation encoder, optional MLP, then a GRU or LSTM cell stepped through time.

    Args:
        observation_space: a single observation's Box.
        spec: the cell and its input MLP.
        conv: conv trunk for image observations (see :func:`observation_encoder`).
    """

    def __init__(
        self, observation_space: spaces.Space, spec: RecurrentSpec, conv: ConvSpec | None = None
    ) -> None:
        super().__init__()
        self.encoder = observation_encoder(observation_space, conv)
        self.mlp, width = mlp_body(
            self.encoder.out_features, MLPSpec(spec.input_sizes, spec.activation)
        )
        self.lstm = spec.cell == "lstm"
        self.hidden_size = spec.hidden_size
        self.cell = (nn.LSTMCell if self.lstm else nn.GRUCell)(width, spec.hidden_size)
        for name, param in self.cell.named_parameters():
            # Orthogonal weights and zero biases, as for the MLPs (CleanRL's ppo_atari_lstm).
            if name.startswith("weight"):
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.zeros_(param)
        self.state_size = spec.hidden_size * (2 if self.lstm else 1)

    def forward(self, obs: Tensor, state: Tensor, episode_starts: Tensor) -> tuple[Tensor, Tensor]:
        """Run the cell over a batch of sequences.

        Args:
            obs: ``(B, L, *obs_shape)`` observations.
            state: ``(B, state_size)`` state each sequence begins with (before any reset).
            episode_starts: ``(B, L)`` bool, true where the observation is an episode's first:
                the state entering that step is zeroed.

        Returns:
            ``(B, L, hidden_size)`` outputs and the ``(B, state_size)`` state after step L.
        """
        batch, length = episode_starts.shape
        # Everything but the cell runs once over all B x L steps; only the cell loops.
        x = self.mlp(self.encoder(obs.reshape(batch * length, *obs.shape[2:])))
        x = x.reshape(batch, length, -1)
        keep = (~episode_starts).unsqueeze(-1).to(x.dtype)
        outputs = []
        for t in range(length):
            state = state * keep[:, t]
            if self.lstm:
                h, c = self.cell(x[:, t], state.chunk(2, dim=-1))
                state = torch.cat([h, c], dim=-1)
            else:
                h = state = self.cell(x[:, t], state)
            outputs.append(h)
        return torch.stack(outputs, dim=1), state


class RecurrentActorCritic(nn.Module):
    """A recurrent actor (Categorical or diagonal Gaussian policy) and critic ``V(h)``.

    The recurrent core replaces the input end of :class:`ActorCritic`: the actor and critic
    MLP bodies and heads (and Gaussian log std, action rescaling, greedy actions) are an
    :class:`ActorCritic` over the core's outputs. With ``shared`` one core and one MLP body
    feed both heads; otherwise the critic has its own core and body, so its state is the
    second half of the flat hidden state.

    Args:
        observation_space: a single observation's Box.
        action_space: Discrete or Box.
        spec: the recurrent core(s).
        actor: the actor MLP body after the core.
        critic: the critic MLP body after its core (ignored when ``shared``).
        shared: one core and body for actor and critic.
        log_std_init: initial log standard deviation of Gaussian policies.
        rescale_actions: map ``[-1, 1]`` onto the Box bounds instead of clipping to them.
        conv: conv trunk for image observations, one per core.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        spec: RecurrentSpec,
        actor: MLPSpec,
        critic: MLPSpec,
        shared: bool = False,
        log_std_init: float = 0.0,
        rescale_actions: bool = True,
        conv: ConvSpec | None = None,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.actor_core = RecurrentCore(observation_space, spec, conv)
        features = spaces.Box(-np.inf, np.inf, (spec.hidden_size,), np.float32)
        self.heads = ActorCritic(
            features,
            action_space,
            actor,
            None,
            shared=shared,
            log_std_init=log_std_init,
            rescale_actions=rescale_actions,
        )
        self.discrete = self.heads.discrete
        self.critic_core: RecurrentCore | None = None
        if not shared:
            self.critic_core = RecurrentCore(observation_space, spec, conv)
            self.critic_body, width = mlp_body(spec.hidden_size, critic)
            self.critic_head = orthogonal_init(nn.Linear(width, 1), 1.0)
        self.state_sizes = [self.actor_core.state_size]
        if self.critic_core is not None:
            self.state_sizes.append(self.critic_core.state_size)
        self.state_size = sum(self.state_sizes)

    @property
    def has_critic(self) -> bool:
        return True

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """The zero state of ``batch_size`` fresh episodes, ``(batch_size, state_size)``."""
        return torch.zeros(batch_size, self.state_size, device=device)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Optimizer parameter groups: the actor (with a shared core), then the critic."""
        actor = [*self.actor_core.parameters(), *self.heads.actor_parameters()]
        critic = list(self.heads.critic_parameters())
        if self.critic_core is not None:
            critic += [
                *self.critic_core.parameters(),
                *self.critic_body.parameters(),
                *self.critic_head.parameters(),
            ]
        return [actor, critic]

    def forward(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor, mask: Tensor | None = None
    ) -> tuple[Distribution, Tensor, Tensor]:
        """Policy and values over sequences.

        Args:
            obs: ``(B, L, *obs_shape)``.
            state: ``(B, state_size)`` state entering each sequence's first step.
            episode_starts: ``(B, L)`` bool; the state is zeroed before these steps.
            mask: ``(B, L)`` bool selecting the steps to return (e.g. ``valid``); None: all.

        Returns:
            The action distribution and values over the selected steps (flat, in row-major
            ``(B, L)`` order), and the ``(B, state_size)`` state after the last step.
        """
        states = state.split(self.state_sizes, dim=-1)
        actor_out, actor_state = self.actor_core(obs, states[0], episode_starts)
        actor_out = actor_out.flatten(0, 1) if mask is None else actor_out[mask]
        dist, values = self.heads(actor_out)
        if self.critic_core is None:
            return dist, values, actor_state
        critic_out, critic_state = self.critic_core(obs, states[1], episode_starts)
        critic_out = critic_out.flatten(0, 1) if mask is None else critic_out[mask]
        values = self.critic_head(self.critic_body(critic_out)).squeeze(-1)
        return dist, values, torch.cat([actor_state, critic_state], dim=-1)

    def step(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor
    ) -> tuple[Distribution, Tensor, Tensor]:
        """One step for ``N`` envs: ``obs (N, …)``, ``state (N, S)``, ``episode_starts (N,)``;
        returns the distribution, values ``(N,)`` and the next state."""
        return self(obs.unsqueeze(1), state, episode_starts.unsqueeze(1))

    def act(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Sample actions; returns ``(actions, log_probs, values, next_state)``."""
        dist, values, state = self.step(obs, state, episode_starts)
        actions = dist.sample()
        return actions, self.log_prob(dist, actions), values, state

    def value(self, obs: Tensor, state: Tensor, episode_starts: Tensor) -> Tensor:
        """``V`` of one step for ``N`` envs (the rollout's bootstrap values)."""
        return self.step(obs, state, episode_starts)[1]

    def log_prob(self, dist: Distribution, actions: Tensor) -> Tensor:
        return self.heads.log_prob(dist, actions)

    def entropy(self, dist: Distribution) -> Tensor:
        return self.heads.entropy(dist)

    def greedy(self, dist: Distribution) -> Tensor:
        return self.heads.greedy(dist)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return self.heads.env_actions(actions)
