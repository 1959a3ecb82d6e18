"""Soft Actor-Critic (Haarnoja et al. 2018a, arXiv:1801.01290; 2018b, arXiv:1812.05905) for
Box actions, and its Discrete-action form (Christodoulou 2019, arXiv:1910.07207).

The loss math is in small pure functions below; CrossQ (``crossq.py``) is a :class:`SAC` with
another critic loss.
"""

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn
from typing_extensions import override

from slm_lightning.algorithms.off_policy import OffPolicyAlgorithm, TargetNetwork
from slm_lightning.config_types import Count, NonNegativeFloat, PositiveCount
from slm_lightning.data.offpolicy_rollout import UpdateRound
from slm_lightning.data.replay import ReplayBatch
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.sac_nets import Actor, TwinQ, make_actor
from slm_lightning.optim import OptimizerSpec
from slm_lightning.train_metrics import TrainMetrics

# Haarnoja et al. (2018b) use two hidden layers of 256 ReLU units for actor and critics.
DEFAULT_NET = MLPSpec([256, 256], "relu")
# Bounds on log(alpha) (alpha in [4.5e-5, 7.4]): automatic tuning can drive alpha towards 0
# or infinity when the target entropy is out of reach (often in discrete SAC), from where
# it needs many steps to come back.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -10.0, 2.0


def default_target_entropy(action_space: spaces.Space) -> float:
    """``-dim(A)`` for Box actions (Haarnoja et al. 2018b, sec. 5); ``0.98 log|A|`` for
    Discrete ones, 98% of the uniform policy's entropy (Christodoulou 2019, sec. 4)."""
    if isinstance(action_space, spaces.Discrete):
        return 0.98 * math.log(int(action_space.n))
    return -float(np.prod(action_space.shape))


def soft_value(
    q: Tensor, log_probs: Tensor, alpha: Tensor | float, probs: Tensor | None = None
) -> Tensor:
    """``V(s) = E_{a~pi}[Q(s, a) - alpha log pi(a|s)]``: from one sampled action (``probs``
    None, ``q`` and ``log_probs`` shaped ``(B,)``) or the exact expectation over all discrete
    actions (``q``, ``log_probs``, ``probs`` shaped ``(B, n)``)."""
    soft = q - alpha * log_probs
    return soft if probs is None else (probs * soft).sum(-1)


def sac_critic_target(
    next_q: Tensor,
    next_log_probs: Tensor,
    rewards: Tensor,
    discounts: Tensor,
    terminated: Tensor,
    alpha: Tensor | float,
    next_probs: Tensor | None = None,
) -> Tensor:
    """``r + gamma^k (1 - terminated) V(s')``, with the soft value :func:`soft_value` of
    ``min_i Q_i(s', .)`` under the current policy.

    Args:
        next_q: ``min_i Q_i`` at ``s'``: of the sampled ``a'`` ``(B,)``, or of every action
            ``(B, n)``.
        next_log_probs: ``log pi(a'|s')`` ``(B,)``, or of every action ``(B, n)``.
        rewards: (n-step) rewards ``(B,)``.
        discounts: ``gamma^k`` of each transition ``(B,)``.
        terminated: 1 where ``s'`` is terminal (no bootstrap), 0 otherwise (truncations too).
        alpha: entropy coefficient.
        next_probs: ``pi(.|s')`` for discrete actions; None for a sampled continuous ``a'``.
    """
    next_value = soft_value(next_q, next_log_probs, alpha, next_probs)
    return rewards + discounts * (1.0 - terminated) * next_value


def twin_critic_loss(q: Tensor, target: Tensor) -> Tensor:
    """``sum_i 0.5 * mean (Q_i - target)^2`` over the critics: ``q`` ``(num_critics, B)``."""
    return 0.5 * (q - target.detach()).pow(2).mean(-1).sum()


def sac_actor_loss(
    q: Tensor, log_probs: Tensor, alpha: Tensor | float, probs: Tensor | None = None
) -> Tensor:
    """``E_s[alpha log pi(a|s) - Q(s, a)]`` = ``-E_s V(s)``: reparameterised (continuous) or
    the exact expectation over actions (discrete, where ``q`` must carry no gradient)."""
    return -soft_value(q, log_probs, alpha, probs).mean()


def alpha_loss(log_alpha: Tensor, entropy: Tensor, target_entropy: float) -> Tensor:
    """``E_s[log(alpha) (H(s) - H_target)]``: its gradient lowers alpha while the policy's
    entropy exceeds the target and raises it below (Haarnoja et al. 2018b, eq. 18, in
    ``log(alpha)`` as in their code and SB3)."""
    return (log_alpha * (entropy - target_entropy).detach()).mean()


class EntropyTemperature(nn.Module):
    """The entropy coefficient ``alpha``: fixed, or tuned towards ``target_entropy``.

    ``log_alpha`` is a parameter (trained when ``alpha`` is None), so it is checkpointed.

    Args:
        alpha: a fixed coefficient; None tunes it automatically.
        target_entropy: the entropy automatic tuning aims for.
        initial_alpha: the starting value when tuned.
    """

    def __init__(self, alpha: float | None, target_entropy: float, initial_alpha: float = 1.0):
        super().__init__()
        self.auto = alpha is None
        self.target_entropy = target_entropy
        start = math.log(initial_alpha if alpha is None else alpha)
        self.log_alpha = nn.Parameter(torch.tensor(start), requires_grad=self.auto)

    @property
    def alpha(self) -> Tensor:
        """The current coefficient, detached."""
        return self.log_alpha.detach().exp()

    def loss(self, entropy: Tensor) -> Tensor:
        return alpha_loss(self.log_alpha, entropy, self.target_entropy)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def check_sac_args(**values: float | None) -> None:
    """Raise a :class:`ConfigError` naming the first of these hyperparameters out of range."""
    for key, value in values.items():
        if key == "tau" and not 0.0 < value <= 1.0:
            raise ConfigError(f"model.init_args.tau must be in (0, 1], got {value}")
        if key.endswith(("_lr", "alpha")) and value is not None and value <= 0:
            raise ConfigError(f"model.init_args.{key} must be > 0, got {value}")


def update_actor_and_alpha(
    actor: Actor,
    critic: TwinQ,
    temperature: EntropyTemperature,
    obs: Tensor,
    optimizer: torch.optim.Optimizer,
    step: Callable[[Tensor, torch.optim.Optimizer], None],
    metrics: TrainMetrics,
    critic_batch_stats: bool = True,
) -> None:
    """One actor step and, when tuned, one temperature step on ``obs``, with one backward
    pass and one optimizer step: the two losses share no parameter (the actor's sees alpha
    as a constant, the temperature's the entropy), so their sum has each one's gradients.

    Args:
        actor: the policy.
        critic: the critics, evaluated with their parameters detached (gradients reach the
            actions only).
        temperature: the entropy coefficient.
        obs: a batch of states.
        optimizer: the actor's parameters, then ``log_alpha`` as a second group if tuned.
        step: zeroes the gradients, backpropagates a loss and steps an optimizer (the
            algorithm's ``backward_step``).
        metrics: the algorithm's ``train_metrics``, updated in place with ``train/actor_loss``
            (before the backward, so that a non-finite one is reported by name),
            ``train/entropy`` and ``train/alpha``.
        critic_batch_stats: Batch Renormalization with batch statistics; False uses the
            running statistics, untouched (CrossQ's actor update).
    """
    pi = actor.evaluate(obs)
    q = critic(obs, pi.actions, frozen=True, batch_stats=critic_batch_stats).min(0).values
    loss = sac_actor_loss(q, pi.log_probs, temperature.alpha, pi.probs)
    metrics.add({"train/actor_loss": loss})
    entropy = pi.entropy().detach()
    if temperature.auto:
        loss = loss + temperature.loss(entropy)
    step(loss, optimizer)
    if temperature.auto:
        temperature.clamp_()
    metrics.add({"train/entropy": entropy.mean(), "train/alpha": temperature.alpha})


class SAC(OffPolicyAlgorithm):
    """Soft Actor-Critic: twin critics with Polyak-averaged targets, a maximum-entropy actor,
    and an automatically tuned entropy coefficient; Box or Discrete actions.

    Box actions use a tanh-squashed Gaussian and the reparameterised actor loss; Discrete
    actions a softmax policy, with the exact expectation over actions in the critic target,
    the actor loss and the entropy (Christodoulou 2019). Each sampled batch is one critic
    update; every ``policy_delay`` critic updates the actor and alpha update once.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        actor: the actor body; None is two layers of 256 ReLU units.
        critic: the body of each critic; None is two layers of 256 ReLU units.
        actor_lr: learning rate of the actor.
        critic_lr: learning rate of the critics.
        alpha_lr: learning rate of log(alpha) (automatic tuning only).
        batch_size: transitions per gradient step.
        memory_size: replay capacity in transitions.
        learning_starts: frames of uniformly random actions before the first update.
        training_frequency: vector steps between two rounds of updates.
        updates_per_step: gradient steps (sampled batches) per round.
        tau: Polyak averaging rate of the target critics per critic update.
        policy_delay: critic updates per actor (and alpha) update.
        alpha: a fixed entropy coefficient; None tunes it towards target_entropy.
        initial_alpha: starting entropy coefficient of automatic tuning.
        target_entropy: entropy automatic tuning aims for; None is -dim(A) (Box) or
            0.98 log|A| (Discrete).
        checkpoint_memory: save the whole replay memory in checkpoints (off for huge memories).
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate tanh(mean) / argmax actions instead of sampling.
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) of critics, actor and
            temperature, and its keyword arguments; None is Adam with torch's defaults.
    """

    action_spaces = (spaces.Box, spaces.Discrete)
    # Polyak-averaged target critics give the bootstrap (CrossQ bootstraps from the critics).
    target_critics = True
    # Evaluate the critics in eval mode in the actor update (CrossQ: running BN statistics).
    critic_eval_in_actor_update = False

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 1_000_000,
        gamma: float = 0.99,
        actor: MLPSpec | None = None,
        critic: MLPSpec | None = None,
        actor_lr: NonNegativeFloat = 3e-4,
        critic_lr: NonNegativeFloat = 3e-4,
        alpha_lr: NonNegativeFloat = 3e-4,
        batch_size: int = 256,
        memory_size: PositiveCount = 1_000_000,
        learning_starts: Count = 5_000,
        training_frequency: int = 1,
        updates_per_step: int = 1,
        tau: float = 0.005,
        policy_delay: int = 1,
        alpha: float | None = None,
        initial_alpha: float = 1.0,
        target_entropy: float | None = None,
        checkpoint_memory: bool = True,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
        optimizer: OptimizerSpec | None = None,
    ) -> None:
        super().__init__(
            env,
            max_frames,
            gamma,
            batch_size,
            memory_size,
            learning_starts,
            training_frequency,
            updates_per_step,
            checkpoint_memory,
            eval_episodes,
            eval_greedy,
        )
        # Lightning collects the arguments of every __init__ up the subclass chain (CrossQ's
        # too); tau means nothing without target critics and is no argument of CrossQ.
        self.save_hyperparameters(ignore=[] if self.target_critics else ["tau"])
        self.check_positive(policy_delay=policy_delay)
        check_sac_args(
            actor_lr=actor_lr,
            critic_lr=critic_lr,
            alpha_lr=alpha_lr,
            tau=tau,
            alpha=alpha,
            initial_alpha=initial_alpha,
        )
        self.check_replay_settings()
        self.check_nets(actor=actor, critic=critic)
        self.actor_lr, self.critic_lr, self.alpha_lr = actor_lr, critic_lr, alpha_lr
        self.optimizer_spec = optimizer or OptimizerSpec()
        # The actor's and critics' defaults for fields the config leaves None (CrossQ: betas).
        self.optimizer_defaults: dict[str, Any] = {}
        self.tau = tau
        self.policy_delay = policy_delay
        self.actor = make_actor(
            self.observation_space, self.action_space, actor or DEFAULT_NET, type(self).__name__
        )
        self.critic = self.build_critic(critic or DEFAULT_NET)
        self.critic_target = (
            copy.deepcopy(self.critic).requires_grad_(False) if self.target_critics else None
        )
        self._target = (
            TargetNetwork(self.critic, self.critic_target) if self.target_critics else None
        )
        if target_entropy is None:
            target_entropy = default_target_entropy(self.action_space)
        self.temperature = EntropyTemperature(alpha, target_entropy, initial_alpha)
        self.critic_updates = 0  # drives policy_delay; checkpointed

    def build_critic(self, spec: MLPSpec) -> TwinQ:
        """The twin critics, each with the MLP body ``spec``."""
        return TwinQ(self.observation_space, self.action_space, spec)

    def explore(self, obs: Tensor) -> Tensor:
        """Uniform actions before ``learning_starts``, then samples from the policy."""
        if self.frames < self.learning_starts:
            return self.actor.uniform(len(obs), obs.device)
        return self.actor.sample(obs)

    @override
    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        return self.actor.greedy(obs) if greedy else self.actor.sample(obs)

    @override
    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return self.actor.env_actions(actions)

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``optimizer_spec``'s optimizer for the critics, then one for the actor with
        ``log_alpha`` as a second parameter group when it is tuned (they step together); the
        learning rates are constant. The temperature's group takes none of
        ``optimizer_defaults`` (CrossQ's betas are for the networks) but the torch
        optimizer's own defaults."""
        spec, defaults = self.optimizer_spec, self.optimizer_defaults
        critic = spec.build([self.critic.parameters()], self.critic_lr, defaults)
        policy = spec.build([self.actor.parameters()], self.actor_lr, defaults)
        if self.temperature.auto:
            settings = {**spec.defaults_of_optimizer(defaults), **spec.kwargs()}
            settings.pop("fused", None)
            policy.add_param_group(
                {"params": [self.temperature.log_alpha], "lr": self.alpha_lr, **settings}
            )
        return [critic, policy]

    def critic_loss(self, batch: ReplayBatch) -> tuple[Tensor, Tensor]:
        """``Q_i(s, a)`` ``(num_critics, B)`` and the twin critics' loss against the soft
        target from the target critics."""
        with torch.no_grad():
            nxt = self.actor.evaluate(batch.next_obs)
            next_q = self.critic_target(batch.next_obs, nxt.actions).min(0).values
            terms = batch.rewards, batch.discounts, batch.terminated
            alpha = self.temperature.alpha
            target = sac_critic_target(next_q, nxt.log_probs, *terms, alpha, nxt.probs)
        q = self.critic.taken(batch.obs, batch.actions)
        return q, twin_critic_loss(q, target)

    def update(
        self,
        batch: ReplayBatch,
        critic_opt: torch.optim.Optimizer,
        policy_opt: torch.optim.Optimizer,
    ) -> None:
        """One critic step on ``batch`` and the target critics' Polyak step, then every
        ``policy_delay`` critic steps one actor (and temperature) step."""
        q, critic_loss = self.critic_loss(batch)
        self.train_metrics.add({"train/critic_loss": critic_loss})  # named if not finite
        self.backward_step(critic_loss, critic_opt)
        if self._target is not None:
            self._target.polyak(self.tau)
        self.critic_updates += 1
        self.train_metrics.add({"train/q_mean": q.mean()})
        if self.critic_updates % self.policy_delay == 0:
            update_actor_and_alpha(
                self.actor,
                self.critic,
                self.temperature,
                batch.obs,
                policy_opt,
                self.backward_step,
                self.train_metrics,
                critic_batch_stats=not self.critic_eval_in_actor_update,
            )

    @override
    def training_step(self, batch: UpdateRound, batch_idx: int) -> None:
        critic_opt, policy_opt = self.optimizers()
        for stack in batch:
            for k in range(len(stack.rewards)):
                self.update(stack.at(k), critic_opt, policy_opt)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["critic_updates"] = self.critic_updates

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.critic_updates = checkpoint.get("critic_updates", 0)
