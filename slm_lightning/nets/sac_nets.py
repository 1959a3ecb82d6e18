"""Networks of SAC and CrossQ: a tanh-squashed Gaussian actor (Box actions), a Categorical
actor (Discrete actions), twin Q critics, and the Batch Renormalization layer of CrossQ."""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import _ACTIVATIONS, MLPSpec, mlp_body, orthogonal_init

# Bounds on the Gaussian's log standard deviation before squashing (SB3 and CleanRL use these):
# below -5 the policy is deterministic for practical purposes and log-probs explode; above 2
# tanh saturates and every action is at the bounds.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def tanh_log_det(u: Tensor) -> Tensor:
    """``log(1 - tanh(u)^2)``, elementwise, as ``2 (log 2 - u - softplus(-2u))``.

    The direct form is ``-inf`` once ``tanh(u)`` rounds to 1 (``|u| > ~9`` in float32); this
    identity is exact and finite for every ``u`` (the form TensorFlow Probability and CleanRL use).
    """
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


@dataclass
class PolicySample:
    """What the SAC losses need from the policy at a batch of states.

    Args:
        actions: continuous: reparameterised actions in ``[-1, 1]``, shape ``(B, act_dim)``;
            discrete: None (the losses take the exact expectation over actions instead).
        log_probs: continuous: ``log pi(a|s)`` of ``actions``, ``(B,)``; discrete:
            ``log pi(.|s)`` of every action, ``(B, n)``.
        probs: discrete: ``pi(.|s)``, ``(B, n)``; continuous: None.
    """

    actions: Tensor | None
    log_probs: Tensor
    probs: Tensor | None = None

    def entropy(self) -> Tensor:
        """Per-state entropy: exact for discrete, the one-sample estimate ``-log pi(a|s)`` else."""
        if self.probs is None:
            return -self.log_probs
        return -(self.probs * self.log_probs).sum(-1)


class SquashedGaussianActor(nn.Module):
    """``a = tanh(u)``, ``u ~ N(mu(s), sigma(s))``: a state-dependent diagonal Gaussian squashed
    into ``[-1, 1]`` (Haarnoja et al. 2018a, appendix C); :meth:`env_actions` maps ``[-1, 1]``
    linearly onto the Box bounds.

    Args:
        observation_space: a Box of observations (flattened).
        action_space: a bounded Box.
        spec: the MLP body.
    """

    def __init__(self, observation_space: spaces.Box, action_space: spaces.Box, spec: MLPSpec):
        super().__init__()
        act_dim = int(np.prod(action_space.shape))
        self.action_shape = action_space.shape
        self.body, width = mlp_body(int(np.prod(observation_space.shape)), spec)
        # Small output weights: initial means near 0 and std near 1 (before squashing).
        self.mean = orthogonal_init(nn.Linear(width, act_dim), 0.01)
        self.log_std = orthogonal_init(nn.Linear(width, act_dim), 0.01)
        self._low = action_space.low.astype(np.float32).reshape(-1)
        self._high = action_space.high.astype(np.float32).reshape(-1)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clamped log standard deviation of the pre-squash Gaussian, ``(B, act_dim)``."""
        hidden = self.body(obs.flatten(1).float())
        return self.mean(hidden), self.log_std(hidden).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def evaluate(self, obs: Tensor) -> PolicySample:
        """Reparameterised actions (gradients flow through them) and their log-probabilities."""
        mean, log_std = self(obs)
        noise = torch.randn_like(mean)
        u = mean + log_std.exp() * noise  # rsample
        # Change of variables for a = tanh(u): log pi(a) = log N(u) - sum log(1 - tanh(u)^2).
        # log N(u; mean, std) with (u - mean) / std written as the noise it is: the same value
        # and gradients (those of (u - mean) / std to mean and std cancel), four ops fewer.
        normal_log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = (normal_log_prob - tanh_log_det(u)).sum(-1)
        return PolicySample(torch.tanh(u), log_prob)

    def sample(self, obs: Tensor) -> Tensor:
        """Sampled actions in ``[-1, 1]``."""
        mean, log_std = self(obs)
        return torch.tanh(mean + log_std.exp() * torch.randn_like(mean))

    def greedy(self, obs: Tensor) -> Tensor:
        """``tanh(mean)``: the squashed mode of the pre-squash Gaussian."""
        return torch.tanh(self(obs)[0])

    def uniform(self, n: int, device: torch.device) -> Tensor:
        """``n`` actions uniform in ``[-1, 1]`` (uniform over the Box after rescaling)."""
        return torch.rand((n, len(self._low)), device=device) * 2.0 - 1.0

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        """Rescale ``[-1, 1]`` actions onto the Box bounds (clipped: float32 tanh may hit 1)."""
        unit = np.clip(actions, -1.0, 1.0)
        scaled = self._low + (unit + 1.0) * 0.5 * (self._high - self._low)
        return scaled.reshape(len(actions), *self.action_shape)


class CategoricalActor(nn.Module):
    """A softmax policy over Discrete actions (Christodoulou 2019, "Soft Actor-Critic for
    Discrete Action Settings").

    Args:
        observation_space: a Box of observations (flattened).
        action_space: Discrete.
        spec: the MLP body.
    """

    def __init__(self, observation_space: spaces.Box, action_space: spaces.Discrete, spec: MLPSpec):
        super().__init__()
        self.n, self.start = int(action_space.n), int(action_space.start)
        self.body, width = mlp_body(int(np.prod(observation_space.shape)), spec)
        self.head = orthogonal_init(nn.Linear(width, self.n), 0.01)  # near-uniform at first

    def forward(self, obs: Tensor) -> Tensor:
        """Action logits, ``(B, n)``."""
        return self.head(self.body(obs.flatten(1).float()))

    def evaluate(self, obs: Tensor) -> PolicySample:
        """Probabilities and log-probabilities of every action (no sampling needed)."""
        log_probs = F.log_softmax(self(obs), dim=-1)
        return PolicySample(None, log_probs, log_probs.exp())

    def sample(self, obs: Tensor) -> Tensor:
        return torch.distributions.Categorical(logits=self(obs), validate_args=False).sample()

    def greedy(self, obs: Tensor) -> Tensor:
        return self(obs).argmax(-1)

    def uniform(self, n: int, device: torch.device) -> Tensor:
        return torch.randint(self.n, (n,), device=device)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return actions + self.start if self.start else actions


Actor = SquashedGaussianActor | CategoricalActor


def make_actor(
    observation_space: spaces.Box, action_space: spaces.Space, spec: MLPSpec, name: str
) -> Actor:
    """The squashed Gaussian (bounded Box) or Categorical (Discrete) actor of ``name``."""
    if isinstance(action_space, spaces.Discrete):
        return CategoricalActor(observation_space, action_space, spec)
    if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
        raise ConfigError(
            f"model: {name} squashes actions into bounds; the action Box is unbounded"
        )
    return SquashedGaussianActor(observation_space, action_space, spec)


@dataclass
class BatchRenormSpec:
    """Batch Renormalization settings of CrossQ's critics.

    The layer is plain batch normalisation for ``warmup_steps`` updates (``r_max = 1``,
    ``d_max = 0``), then its limits relax linearly to ``r_max``, ``d_max`` over ``relax_steps``.
    CrossQ (Bhatt et al. 2024; its JAX code, and SBX) uses a 100k-step warm-up and switches at
    once (``relax_steps = 0``); Ioffe (2017) relaxes over tens of thousands of steps.

    Args:
        momentum: running-statistics update rate (PyTorch convention; CrossQ's 0.99 in Flax's).
        warmup_steps: training forward passes of pure batch normalisation.
        relax_steps: forward passes over which ``r_max``, ``d_max`` grow after the warm-up.
        r_max: final bound on the scale correction ``r = sigma_B / sigma``.
        d_max: final bound on the shift correction ``d = (mu_B - mu) / sigma``.
        eps: added to variances (SBX's 1e-3).
    """

    momentum: float = 0.01
    warmup_steps: int = 100_000
    relax_steps: int = 0
    r_max: float = 3.0
    d_max: float = 5.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 < self.momentum <= 1.0:
            raise ConfigError(
                f"model.init_args.batch_renorm.momentum must be in (0, 1], got {self.momentum}"
            )
        if self.warmup_steps < 0 or self.relax_steps < 0:
            raise ConfigError(
                "model.init_args.batch_renorm.warmup_steps and relax_steps must be >= 0"
            )
        if self.r_max < 1.0 or self.d_max < 0.0:
            raise ConfigError(
                "model.init_args.batch_renorm needs r_max >= 1 and d_max >= 0, got "
                f"{self.r_max}, {self.d_max}"
            )


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe 2017, arXiv:1702.03275) of ``E`` critics at once, over the
    features of ``(E, B, C)``: each critic with its own affine parameters and running
    statistics ``(E, 1, C)``.

    Training: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max,
    d_max)`` treated as constants, so training sees the same normalisation as inference (which
    uses the running ``mu``, ``sigma``) as far as the clips allow. The running statistics and a
    step counter are buffers, so they are checkpointed.

    Args:
        members: ``E``.
        num_features: ``C``.
        spec: momentum, warm-up and clip limits.
    """

    def __init__(self, members: int, num_features: int, spec: BatchRenormSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.ones(members, 1, num_features))
        self.bias = nn.Parameter(torch.zeros(members, 1, num_features))
        self.register_buffer("running_mean", torch.zeros(members, 1, num_features))
        self.register_buffer("running_var", torch.ones(members, 1, num_features))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def limits(self) -> tuple[Tensor, Tensor]:
        """Current ``(r_max, d_max)``: ``(1, 0)`` during the warm-up, then relaxed. Tensors,
        so that reading the step counter never synchronises with an accelerator."""
        spec = self.spec
        after = self.steps.float() - spec.warmup_steps
        if spec.relax_steps == 0:
            progress = (after >= 0).float()
        else:
            progress = (after / spec.relax_steps).clamp(0.0, 1.0)
        return 1.0 + (spec.r_max - 1.0) * progress, spec.d_max * progress

    def forward(self, x: Tensor, batch_stats: bool, frozen: bool = False) -> Tensor:
        """Normalise ``x`` ``(E, B, C)``.

        Args:
            x: features.
            batch_stats: training's batch statistics (updating the running ones); else the
                running statistics, untouched.
            frozen: detach the affine parameters (no gradient reaches them).
        """
        # Statistics in float32, as torch's batch norm keeps them under autocast (bf16-mixed
        # hands bfloat16 features here; the running buffers are float32).
        x = x.float()
        eps = self.spec.eps
        weight, bias = (
            (self.weight.detach(), self.bias.detach()) if frozen else (self.weight, self.bias)
        )
        if not batch_stats:
            x_hat = (x - self.running_mean) / (self.running_var + eps).sqrt()
            return x_hat * weight + bias
        mean = x.mean(1, keepdim=True)
        centered = x - mean
        var = centered.pow(2).mean(1, keepdim=True)
        std = (var + eps).sqrt()
        with torch.no_grad():
            r_max, d_max = self.limits()
            running_std = (self.running_var + eps).sqrt()
            r = (std / running_std).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-d_max, d_max)
            n = x.shape[1]
            self.running_mean.lerp_(mean, self.spec.momentum)
            self.running_var.lerp_(var * (n / max(n - 1, 1)), self.spec.momentum)  # unbiased
            self.steps += 1
        return centered * (r * weight / std) + (d * weight + bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}x{self.weight.shape[-1]}, {self.spec}"


class TwinQ(nn.Module):
    """``num_critics`` independent Q networks, evaluated together as one batched ensemble.

    Continuous actions: ``Q(s, a)`` on ``concat(s, a)``; discrete: ``Q(s, .)`` for every action.
    Layer ``l`` of every critic is one weight ``(num_critics, in, out)`` and one bias
    ``(num_critics, 1, out)``, so a forward pass is one batched matmul per layer whatever the
    number of critics, and one optimizer step covers them with a few large tensors. Each
    critic is initialised as its own MLP would be (orthogonal, gain sqrt 2, last layer 1).
    With ``batch_renorm`` (CrossQ) a :class:`BatchRenorm` normalises the input and
    follows every hidden activation, as in Bhatt et al. (2024), fig. 3.

    Args:
        observation_space: a Box of observations (flattened).
        action_space: Box or Discrete.
        spec: the MLP body of each critic.
        num_critics: critics; the SAC target takes their minimum (clipped double Q).
        batch_renorm: Batch Renormalization settings; None for plain MLPs (SAC).
    """

    # Tensors in, tensors out: --torch-compile compiles the whole forward (compile.py).
    compile_whole = True

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Space,
        spec: MLPSpec,
        num_critics: int = 2,
        batch_renorm: BatchRenormSpec | None = None,
    ) -> None:
        super().__init__()
        self.discrete = isinstance(action_space, spaces.Discrete)
        self.num_critics = num_critics
        in_features = int(np.prod(observation_space.shape))
        if self.discrete:
            out_features = int(action_space.n)
        else:
            in_features += int(np.prod(action_space.shape))
            out_features = 1
        # Each critic's layers drawn as its own MLP's would be, critic by critic, then stacked.
        widths = [in_features, *spec.hidden_sizes]
        members = [
            [
                *mlp_body(in_features, spec)[0][0::2],  # the Linear layers, not activations
                orthogonal_init(nn.Linear(widths[-1], out_features), 1.0),
            ]
            for _ in range(num_critics)
        ]
        self.weights = nn.ParameterList(
            torch.stack([layers[i].weight.detach().T for layers in members])
            for i in range(len(widths))
        )
        self.biases = nn.ParameterList(
            torch.stack([layers[i].bias.detach()[None] for layers in members])
            for i in range(len(widths))
        )
        self.activation = _ACTIVATIONS[spec.activation]()
        self.norms = (
            nn.ModuleList(BatchRenorm(num_critics, width, batch_renorm) for width in widths)
            if batch_renorm
            else None
        )

    def forward(
        self,
        obs: Tensor,
        actions: Tensor | None = None,
        frozen: bool = False,
        batch_stats: bool | None = None,
    ) -> Tensor:
        """``(num_critics, B)`` for Box actions; ``(num_critics, B, n)`` (``actions`` None)
        for Discrete ones.

        Args:
            obs: ``(B, *obs_shape)``.
            actions: ``(B, *action_shape)`` for Box actions; None for Discrete.
            frozen: detach every parameter, so gradients reach the inputs (the actor's
                actions) but no critic weight: the actor update's pass.
            batch_stats: Batch Renormalization with the batch's statistics (updating the
                running ones); None follows ``self.training``.
        """
        x = obs.flatten(1).float()
        if not self.discrete:
            x = torch.cat([x, actions.flatten(1).float()], dim=-1)
        x = x.expand(self.num_critics, *x.shape)
        if batch_stats is None:
            batch_stats = self.training
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if self.norms is not None:
                x = self.norms[i](x, batch_stats, frozen)
            if frozen:
                weight, bias = weight.detach(), bias.detach()
            x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = self.activation(x)
        return x if self.discrete else x.squeeze(-1)

    def taken(self, obs: Tensor, actions: Tensor) -> Tensor:
        """``Q_i(s, a)`` of the actions taken, ``(num_critics, B)``."""
        if not self.discrete:
            return self(obs, actions)
        index = actions.long().view(1, -1, 1).expand(self.num_critics, -1, 1)
        return self(obs).gather(-1, index).squeeze(-1)
