"""Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347).

The data path, in order:

1. env step: ``data/onpolicy_rollout.py:OnPolicyRollout.collect`` steps the vector env with
   actions from ``algorithms/policy_gradient.py:PolicyGradient.act`` (the policy's ``act``,
   feed-forward or recurrent alike) for ``time_horizon`` steps;
2. rollout -> memory: each step is written into the algorithm's ``self.memory``
   (``data/onpolicy_memory.py:OnPolicyMemory``, built in ``PolicyGradient.build_rollout``);
3. returns: ``OnPolicyMemory.compute_returns`` with the :class:`GAE` estimator
   (``data/returns.py:GAE.estimate`` -> ``gae``), bootstrapped from ``PolicyGradient.bootstrap_values``;
4. minibatch: ``OnPolicyRollout.__iter__`` yields one ``Minibatches``: ``training_epochs x
   num_minibatches`` shuffled :class:`OnPolicyBatch` (or :class:`RecurrentBatch` sequences)
   from ``OnPolicyMemory.flat_batch`` / ``sequence_batch``, all trained in one Lightning
   training step (``algorithms/policy_gradient.py:MinibatchUpdates.training_step``);
5. loss: :meth:`PPO.minibatch_loss` (:func:`clipped_surrogate_loss`, :func:`value_loss`,
   entropy bonus); past ``target_kl`` it returns None, which ends the rollout's updates;
6. optimizer: ``algorithms/base.py:RLAlgorithm.backward_step`` (Lightning's manual
   optimization) steps ``optim.py:PolicyOptimizer.configure_optimizers``' optimizer
   (``optim.py:OptimizerSpec.build``) after ``optim.py:clip_grad_norm``, at the learning
   rates ``PolicyOptimizer.on_train_epoch_start`` set for this rollout
   (``PolicyGradient.learning_rates``: actor, then critic).
"""

import torch
from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.policy_gradient import PolicyGradient
from slm_lightning.config_types import NonNegativeFloat, PositiveCount
from slm_lightning.data.onpolicy_memory import OnPolicyBatch, RecurrentBatch
from slm_lightning.data.returns import GAE
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.recurrent import RecurrentActorCritic, RecurrentSpec
from slm_lightning.optim import OptimizerSpec
from slm_lightning.schedules import Schedule, scheduled


def clipped_surrogate_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_eps: float
) -> Tensor:
    """PPO's clipped policy loss ``-E[min(r A, clip(r, 1-eps, 1+eps) A)]``."""
    ratio = (log_probs - old_log_probs).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.min(unclipped, clipped).mean()


def value_loss(
    values: Tensor, returns: Tensor, old_values: Tensor, clip_range: float | None
) -> Tensor:
    """``0.5 * (V - R)^2``, optionally with PPO2's value clipping around the rollout values."""
    loss = (values - returns).pow(2)
    if clip_range is not None:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        loss = torch.max(loss, (clipped - returns).pow(2))
    return 0.5 * loss.mean()


def normalize(advantages: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero-mean, unit-variance advantages (per minibatch); a single sample is left centred."""
    if advantages.numel() < 2:
        return advantages - advantages.mean()
    return (advantages - advantages.mean()) / (advantages.std() + eps)


class PPO(PolicyGradient):
    """PPO with the clipped surrogate objective and GAE, for discrete and continuous actions.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        gae_lambda: GAE lambda.
        time_horizon: vector steps per rollout; a rollout is ``time_horizon x num_envs`` frames.
        training_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        clip_eps: surrogate clip range, constant or a schedule over frames.
        clip_value: clip range of value updates around the rollout values (None: no clipping).
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus, constant or a schedule over frames.
        lr: learning rate of the actor (and of a shared body), constant or scheduled.
        critic_lr: learning rate of a separate critic; None uses ``lr``.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) and its keyword arguments;
            None is Adam with eps 1e-5.
        normalize_advantages: normalise advantages per minibatch.
        target_kl: stop the rollout's updates at the first minibatch whose approx_kl exceeds
            this (mean over ranks), without a step on it.
        actor: actor body.
        critic: critic body (ignored when ``shared``).
        shared: one body with a policy head and a value head.
        conv: conv trunk shared by actor and critic, before their bodies; None uses the
            Nature CNN for image observations (e.g. Atari) and none otherwise.
        log_std_init: initial log std of Gaussian policies.
        rescale_actions: map Gaussian actions from [-1, 1] onto the Box instead of clipping.
        recurrent: a GRU / LSTM core before the actor and critic bodies (which then run on
            its outputs); training minibatches become whole sequences of
            ``recurrent.sequence_length`` steps. None: no recurrence.
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate the greedy policy instead of sampling.
    """

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 1_000_000,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        time_horizon: int = 128,
        training_epochs: int = 4,
        num_minibatches: int = 4,
        clip_eps: float | Schedule = 0.2,
        clip_value: float | None = None,
        value_coef: float = 0.5,
        entropy_coef: float | Schedule = 0.0,
        lr: NonNegativeFloat | Schedule = 3e-4,
        critic_lr: NonNegativeFloat | Schedule | None = None,
        max_grad_norm: float | None = 0.5,
        optimizer: OptimizerSpec | None = None,
        normalize_advantages: bool = True,
        target_kl: float | None = None,
        actor: MLPSpec | None = None,
        critic: MLPSpec | None = None,
        shared: bool = False,
        log_std_init: float = 0.0,
        rescale_actions: bool = True,
        conv: ConvSpec | None = None,
        recurrent: RecurrentSpec | None = None,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
    ) -> None:
        super().__init__(
            env,
            max_frames,
            gamma,
            GAE(gamma, gae_lambda),
            time_horizon,
            training_epochs,
            num_minibatches,
            lr,
            critic_lr,
            max_grad_norm,
            eval_episodes,
            eval_greedy,
            optimizer,
        )
        self.save_hyperparameters()
        self.check_nets(actor=actor, critic=critic, conv=conv, recurrent=recurrent)
        if not 0.0 <= gae_lambda <= 1.0:
            raise ConfigError(f"model.init_args.gae_lambda must be in [0, 1], got {gae_lambda}")
        if isinstance(clip_eps, float) and not 0.0 < clip_eps < 1.0:
            raise ConfigError(f"model.init_args.clip_eps must be in (0, 1), got {clip_eps}")
        if num_minibatches > time_horizon * env.num_envs:
            raise ConfigError(
                f"model.init_args.num_minibatches ({num_minibatches}) exceeds the rollout size "
                f"time_horizon x model.init_args.env.num_envs = {time_horizon * env.num_envs}"
            )
        self.clip_eps_schedule = clip_eps
        self.entropy_coef_schedule = entropy_coef
        self.clip_value = clip_value
        self.value_coef = value_coef
        self.normalize_advantages = normalize_advantages
        self.target_kl = target_kl
        self.recurrent = recurrent
        if recurrent is not None:
            self.sequence_length = recurrent.sequence_length or time_horizon
            sequences = time_horizon // self.sequence_length * env.num_envs
            if time_horizon % self.sequence_length:
                raise ConfigError(
                    f"model.init_args.time_horizon ({time_horizon}) must be a multiple of "
                    f"recurrent.sequence_length ({self.sequence_length})"
                )
            if num_minibatches > sequences:
                raise ConfigError(
                    f"model.init_args.num_minibatches ({num_minibatches}) exceeds the "
                    f"{sequences} training sequences per rollout "
                    "(time_horizon / recurrent.sequence_length x model.init_args.env.num_envs)"
                )
            self.policy = RecurrentActorCritic(
                self.observation_space,
                self.action_space,
                recurrent,
                actor or MLPSpec(),
                critic or MLPSpec(),
                shared=shared,
                log_std_init=log_std_init,
                rescale_actions=rescale_actions,
                conv=conv,
            )
        else:
            self.policy = ActorCritic(
                self.observation_space,
                self.action_space,
                actor or MLPSpec(),
                critic or MLPSpec(),
                shared=shared,
                log_std_init=log_std_init,
                rescale_actions=rescale_actions,
                conv=conv,
            )

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        # Constant over a rollout: the clip range and entropy weight at its first frame.
        self.clip_eps = scheduled(self.clip_eps_schedule, self.frames, self.max_frames)
        self.entropy_coef = scheduled(self.entropy_coef_schedule, self.frames, self.max_frames)
        self.train_metrics.set(
            {"train/clip_eps": self.clip_eps, "train/entropy_coef": self.entropy_coef}
        )

    @override
    def minibatch_loss(self, batch: OnPolicyBatch | RecurrentBatch) -> Tensor | None:
        steps = (batch.actions, batch.log_probs, batch.values, batch.advantages, batch.returns)
        if isinstance(batch, RecurrentBatch):
            # Sequences (B, L): run the cell through them, then keep only the valid steps.
            valid = batch.valid
            dist, values, _ = self.policy(batch.obs, batch.states, batch.episode_starts, mask=valid)
            steps = tuple(field[valid] for field in steps)
        else:
            dist, values = self.policy(batch.obs)
        actions, old_log_probs, old_values, advantages, returns = steps
        log_probs = self.policy.log_prob(dist, actions)
        if self.normalize_advantages:
            advantages = normalize(advantages)
        policy_loss = clipped_surrogate_loss(log_probs, old_log_probs, advantages, self.clip_eps)
        v_loss = value_loss(values, returns, old_values, self.clip_value)
        loss = policy_loss + self.value_coef * v_loss
        if self.entropy_coef:
            entropy = self.policy.entropy(dist).mean()
            loss = loss - self.entropy_coef * entropy
        with torch.no_grad():
            if not self.entropy_coef:
                entropy = self.policy.entropy(dist).mean()
            log_ratio = log_probs - old_log_probs
            ratio = log_ratio.exp()
            # Two KL estimators (Schulman, "Approximating KL divergence"): the naive -log r
            # and the unbiased, non-negative (r - 1) - log r, as CleanRL logs them.
            old_approx_kl = (-log_ratio).mean()
            approx_kl = ((ratio - 1) - log_ratio).mean()
            clipfrac = ((ratio - 1.0).abs() > self.clip_eps).float().mean()
        # Every minibatch's terms: a row logs their means over the update, and a non-finite
        # loss is reported by its term.
        self.train_metrics.add(
            {
                "train/loss": loss,
                "train/policy_loss": policy_loss,
                "train/value_loss": v_loss,
                "train/entropy": entropy,
                "train/approx_kl": approx_kl,
                "train/old_approx_kl": old_approx_kl,
                "train/clipfrac": clipfrac,
            }
        )
        if self.target_kl is None:
            return loss
        if self.trainer.world_size > 1:  # every rank decides on the same (mean) KL: all stop
            approx_kl = self.trainer.strategy.reduce(approx_kl, reduce_op="mean")
        return None if approx_kl > self.target_kl else loss
