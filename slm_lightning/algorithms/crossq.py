"""CrossQ (Bhatt et al. 2024, "CrossQ: Batch Normalization in Deep Reinforcement Learning for
Greater Sample Efficiency and Simplicity", ICLR, arXiv:1902.05605): SAC without target
networks, with batch-(re)normalised critics."""

import torch
from gymnasium import spaces
from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.sac import SAC, sac_critic_target, twin_critic_loss
from slm_lightning.config_types import Count, NonNegativeFloat, PositiveCount
from slm_lightning.data.replay import ReplayBatch
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.sac_nets import BatchRenormSpec, TwinQ
from slm_lightning.optim import OptimizerSpec

# The paper's critics are wide: two layers of 2048 ReLU units (Bhatt et al. 2024, table 1).
WIDE_CRITIC = MLPSpec([2048, 2048], "relu")


class CrossQ(SAC):
    """CrossQ: SAC whose critics carry Batch Renormalization and have no target networks.

    The bootstrap target comes from the critics themselves. The batch's current pairs
    ``(s, a)`` and next pairs ``(s', a' ~ pi(s'))`` go through the critics in one forward
    pass, concatenated, so the normalisation statistics are those of both distributions
    (with separate passes the next pairs, whose actions come from the policy rather than
    the memory, would be normalised with mismatched statistics: Bhatt et al. 2024, sec. 3).
    The actor update evaluates the critics in eval mode (running statistics, untouched).
    Box actions only. Everything else (actor, temperature, replay, delays) is :class:`SAC`'s.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        actor: the actor body; None is two layers of 256 ReLU units.
        critic: the body of each critic; None is two layers of 2048 ReLU units.
        actor_lr: learning rate of the actor.
        critic_lr: learning rate of the critics.
        alpha_lr: learning rate of log(alpha) (automatic tuning only).
        adam_beta1: Adam's (and AdamW's) first-moment decay for actor and critics (the
            paper's 0.5), where ``optimizer.betas`` is not given.
        batch_size: transitions per gradient step (the joint critic pass sees twice as many rows).
        memory_size: replay capacity in transitions.
        learning_starts: frames of uniformly random actions before the first update.
        training_frequency: vector steps between two rounds of updates.
        updates_per_step: gradient steps (sampled batches) per round.
        policy_delay: critic updates per actor (and alpha) update.
        alpha: a fixed entropy coefficient; None tunes it towards target_entropy.
        initial_alpha: starting entropy coefficient of automatic tuning.
        target_entropy: entropy automatic tuning aims for; None is -dim(A).
        batch_renorm: the critics' Batch Renormalization (momentum, warm-up, r_max, d_max).
        checkpoint_memory: save the whole replay memory in checkpoints (off for huge memories).
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate tanh(mean) actions instead of sampling.
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) of critics, actor and
            temperature, and its keyword arguments; None is Adam with betas
            ``(adam_beta1, 0.999)`` for actor and critics.
    """

    action_spaces = (spaces.Box,)
    target_critics = False
    critic_eval_in_actor_update = True

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 1_000_000,
        gamma: float = 0.99,
        actor: MLPSpec | None = None,
        critic: MLPSpec | None = None,
        actor_lr: NonNegativeFloat = 1e-3,
        critic_lr: NonNegativeFloat = 1e-3,
        alpha_lr: NonNegativeFloat = 1e-3,
        adam_beta1: float = 0.5,
        batch_size: int = 256,
        memory_size: PositiveCount = 1_000_000,
        learning_starts: Count = 5_000,
        training_frequency: int = 1,
        updates_per_step: int = 1,
        policy_delay: int = 3,
        alpha: float | None = None,
        initial_alpha: float = 1.0,
        target_entropy: float | None = None,
        batch_renorm: BatchRenormSpec | None = None,
        checkpoint_memory: bool = True,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
        optimizer: OptimizerSpec | None = None,
    ) -> None:
        if not 0.0 <= adam_beta1 < 1.0:  # before any net is built
            raise ConfigError(f"model.init_args.adam_beta1 must be in [0, 1), got {adam_beta1}")
        spec = optimizer or OptimizerSpec()
        if adam_beta1 != 0.5 and ("betas" not in spec.accepted() or spec.betas is not None):
            raise ConfigError(
                "model.init_args.adam_beta1 sets the betas of Adam and AdamW only, and only "
                f"without model.init_args.optimizer.betas; got {spec.name} with betas "
                f"{spec.betas}"
            )
        if batch_size < 2:  # batch statistics of one row are undefined
            raise ConfigError(f"model.init_args.batch_size must be >= 2, got {batch_size}")
        self.batch_renorm = batch_renorm or BatchRenormSpec()
        super().__init__(
            env,
            max_frames,
            gamma,
            actor=actor,
            critic=critic or WIDE_CRITIC,
            actor_lr=actor_lr,
            critic_lr=critic_lr,
            alpha_lr=alpha_lr,
            batch_size=batch_size,
            memory_size=memory_size,
            learning_starts=learning_starts,
            training_frequency=training_frequency,
            updates_per_step=updates_per_step,
            policy_delay=policy_delay,
            alpha=alpha,
            initial_alpha=initial_alpha,
            target_entropy=target_entropy,
            checkpoint_memory=checkpoint_memory,
            eval_episodes=eval_episodes,
            eval_greedy=eval_greedy,
            optimizer=optimizer,
        )  # SAC's tau stays unused: there are no target critics
        self.optimizer_defaults = {"betas": (adam_beta1, 0.999)}

    @override
    def build_critic(self, spec: MLPSpec) -> TwinQ:
        return TwinQ(
            self.observation_space, self.action_space, spec, batch_renorm=self.batch_renorm
        )

    def joint_q(self, batch: ReplayBatch, next_actions: Tensor) -> tuple[Tensor, Tensor]:
        """``Q_i(s, a)`` and ``Q_i(s', a')``, each ``(num_critics, B)``, from ONE forward pass
        over the concatenated batch (in train mode: both halves share its BN statistics)."""
        obs = torch.cat([batch.obs, batch.next_obs])
        actions = torch.cat([batch.actions, next_actions])
        q, next_q = self.critic(obs, actions).chunk(2, dim=1)
        return q, next_q

    @override
    def critic_loss(self, batch: ReplayBatch) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            nxt = self.actor.evaluate(batch.next_obs)
        q, next_q = self.joint_q(batch, nxt.actions)
        terms = batch.rewards, batch.discounts, batch.terminated
        # No target network: the bootstrap is the critics' own, with its gradient stopped.
        next_q = next_q.detach().min(0).values
        target = sac_critic_target(next_q, nxt.log_probs, *terms, self.temperature.alpha)
        return q, twin_critic_loss(q, target)
