"""Policy and value networks over flat or image observations, for discrete and continuous
actions."""

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from slm_lightning.nets.conv import ConvSpec, full_precision, observation_encoder
from slm_lightning.nets.mlp import MLPSpec, mlp_body, orthogonal_init


class ActorCritic(nn.Module):
    """An actor (Categorical or diagonal Gaussian policy) and an optional critic ``V(s)``.

    Continuous actions are sampled unbounded in a normalised ``[-1, 1]`` action space;
    :meth:`env_actions` clips them there and rescales them to the env's Box (or clips them
    to the Box when ``rescale_actions`` is false or the Box is unbounded).

    It takes the same step as :class:`~slm_lightning.nets.RecurrentActorCritic`
    (:meth:`step`, :meth:`act`, :meth:`value` with a hidden ``state`` and ``episode_starts``),
    with no state: ``state`` is None and passes through, so rollouts, evaluation and videos
    call both alike.

    Observations first go through an encoder shared by actor and critic: a conv trunk for
    image observations (trained by both losses, in the actor's parameter group), else a plain
    flatten. The actor and critic MLP bodies then run on its features.

    Args:
        observation_space: a Box of observations (flattened, or an image for the conv trunk).
        action_space: Discrete or Box.
        actor: the actor body (after the encoder).
        critic: the critic body; ignored when ``shared``; ``None`` for an actor-only policy.
        shared: the critic head sits on the actor body (one body, two heads).
        log_std_init: initial log standard deviation of Gaussian policies.
        rescale_actions: map ``[-1, 1]`` onto the Box bounds instead of clipping to them.
        conv: the conv trunk; None uses the Nature CNN for image observations (``(C, H, W)``
            Boxes, uint8 pixels scaled by 1/255) and no trunk otherwise.
    """

    # Width of the flat hidden state a step carries: none.
    state_size: int = 0

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        actor: MLPSpec,
        critic: MLPSpec | None,
        shared: bool = False,
        log_std_init: float = 0.0,
        rescale_actions: bool = True,
        conv: ConvSpec | None = None,
    ) -> None:
        super().__init__()
        self.encoder = observation_encoder(observation_space, conv)
        obs_dim = self.encoder.out_features
        self.discrete = isinstance(action_space, spaces.Discrete)
        self.action_space = action_space
        self.shared = shared
        self.actor_body, width = mlp_body(obs_dim, actor)
        if self.discrete:
            self.actor_head = orthogonal_init(nn.Linear(width, int(action_space.n)), 0.01)
        else:
            act_dim = int(np.prod(action_space.shape))
            self.actor_head = orthogonal_init(nn.Linear(width, act_dim), 0.01)
            self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))
            low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
            bounded = bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))
            self._rescale = rescale_actions and bounded
            self._low, self._high = low, high
        self.critic_body: nn.Module | None = None
        self.critic_head: nn.Linear | None = None
        if shared:
            self.critic_head = orthogonal_init(nn.Linear(width, 1), 1.0)
        elif critic is not None:
            self.critic_body, critic_width = mlp_body(obs_dim, critic)
            self.critic_head = orthogonal_init(nn.Linear(critic_width, 1), 1.0)

    @property
    def has_critic(self) -> bool:
        return self.critic_head is not None

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Optimizer parameter groups: the actor (with any shared body), then a separate critic."""
        critic = self.critic_parameters()
        return [self.actor_parameters(), critic] if critic else [self.actor_parameters()]

    def actor_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the policy loss (the shared body included)."""
        params = [
            *self.encoder.parameters(),
            *self.actor_body.parameters(),
            *self.actor_head.parameters(),
        ]
        return [*params, self.log_std] if not self.discrete else params

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters only the value loss trains (empty for a shared body's critic body)."""
        if self.critic_head is None:
            return []
        body = [] if self.critic_body is None else list(self.critic_body.parameters())
        return [*body, *self.critic_head.parameters()]

    def forward(self, obs: Tensor) -> tuple[Distribution, Tensor | None]:
        """Action distribution and value estimate (``None`` without a critic) for ``obs``."""
        obs = self.encoder(obs)
        with full_precision(obs):
            hidden = self.actor_body(obs)
            out = self.actor_head(hidden)
            # validate_args=False: argument validation costs more than the tiny forward
            # passes of RL policies (the outputs are finite: the rollout and the loss check).
            if self.discrete:
                dist: Distribution = Categorical(logits=out, validate_args=False)
            else:
                dist = Normal(out, self.log_std.exp().expand_as(out), validate_args=False)
            value = None
            if self.critic_head is not None:
                critic_in = hidden if self.shared else self.critic_body(obs)
                value = self.critic_head(critic_in).squeeze(-1)
        return dist, value

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        """No hidden state: None, whatever the batch."""
        return None

    def step(
        self, obs: Tensor, state: None = None, episode_starts: Tensor | None = None
    ) -> tuple[Distribution, Tensor | None, None]:
        """One step for ``N`` envs: the distribution, values (None without a critic) and the
        (absent) next state."""
        dist, values = self(obs)
        return dist, values, state

    def act(
        self, obs: Tensor, state: None = None, episode_starts: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, None]:
        """Sample actions; returns ``(actions, log_probs, values, state)`` (values None
        without a critic, state None)."""
        dist, values = self(obs)
        actions = dist.sample()
        return actions, self.log_prob(dist, actions), values, state

    def value(
        self, obs: Tensor, state: None = None, episode_starts: Tensor | None = None
    ) -> Tensor:
        """``V(s)`` only; cheaper than :meth:`forward` with a separate critic."""
        obs = self.encoder(obs)
        with full_precision(obs):
            body = self.actor_body if self.shared else self.critic_body
            return self.critic_head(body(obs)).squeeze(-1)

    def log_prob(self, dist: Distribution, actions: Tensor) -> Tensor:
        """Log-likelihood of ``actions``, summed over action dimensions for Gaussians."""
        log_prob = dist.log_prob(actions)
        return log_prob if self.discrete else log_prob.sum(-1)

    def entropy(self, dist: Distribution) -> Tensor:
        entropy = dist.entropy()
        return entropy if self.discrete else entropy.sum(-1)

    def greedy(self, dist: Distribution) -> Tensor:
        """The most likely action: argmax for Categorical, the mean for Gaussian."""
        return dist.probs.argmax(-1) if self.discrete else dist.mean

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        """Convert sampled policy actions to actions the env accepts."""
        if self.discrete:
            return actions
        if self._rescale:
            unit = np.clip(actions, -1.0, 1.0)
            return self._low + (unit + 1.0) * 0.5 * (self._high - self._low)
        return np.clip(actions, self._low, self._high)
