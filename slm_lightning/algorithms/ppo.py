"""Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347)."""

import torch
from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.config_types import NonNegativeFloat, PositiveCount
from slm_lightning.data.onpolicy import OnPolicyMemory
from slm_lightning.data.rollout import OnPolicyRollout
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.recurrent import RecurrentActorCritic, RecurrentSpec
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


# Per-step fields of a recurrent minibatch that the loss reads.
_STEP_FIELDS = ("actions", "log_probs", "values", "advantages", "returns")


class PPO(RLAlgorithm):
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
        lr: Adam learning rate of the actor (and of a shared body), constant or scheduled.
        critic_lr: learning rate of a separate critic; None uses ``lr``.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        normalize_advantages: normalise advantages per minibatch.
        target_kl: stop the rollout's remaining minibatches once approx_kl exceeds this.
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
        super().__init__(env, max_frames, gamma, eval_episodes, eval_greedy)
        self.save_hyperparameters()
        self.check_positive(
            time_horizon=time_horizon,
            training_epochs=training_epochs,
            num_minibatches=num_minibatches,
        )
        self.check_learning_rates(lr=lr, critic_lr=critic_lr)
        if not 0.0 <= gae_lambda <= 1.0:
            raise ConfigError(f"model.init_args.gae_lambda must be in [0, 1], got {gae_lambda}")
        if isinstance(clip_eps, float) and not 0.0 < clip_eps < 1.0:
            raise ConfigError(f"model.init_args.clip_eps must be in (0, 1), got {clip_eps}")
        if num_minibatches > time_horizon * env.num_envs:
            raise ConfigError(
                f"model.init_args.num_minibatches ({num_minibatches}) exceeds the rollout size "
                f"time_horizon x env.num_envs = {time_horizon * env.num_envs}"
            )
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
                    "(time_horizon / recurrent.sequence_length x env.num_envs)"
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

    def compute_returns(self, memory: OnPolicyMemory) -> None:
        memory.compute_returns("gae", self.gamma, self.hparams.gae_lambda)
        self.train_metrics.add({"train/explained_variance": memory.explained_variance()})

    @override
    def build_rollout(self) -> OnPolicyRollout:
        if self.recurrent is None:
            return super().build_rollout()
        hp = self.hparams
        return OnPolicyRollout(
            self,
            self.env_spec,
            self.env_seed(),
            hp.time_horizon,
            hp.training_epochs,
            hp.num_minibatches,
            world_size=self.trainer.world_size,
            gamma=self.gamma,
            sequence_length=self.sequence_length,
        )

    def initial_state(self, num_envs: int) -> Tensor | None:
        """The zero hidden state of ``num_envs`` envs; None for a feed-forward policy."""
        if self.recurrent is None:
            return None
        return self.policy.initial_state(num_envs, self.device)

    def recurrent_act(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One rollout step of the recurrent policy: actions, log-probs, values, next state."""
        return self.policy.act(obs, state, episode_starts)

    def recurrent_values(self, obs: Tensor, state: Tensor, episode_starts: Tensor) -> Tensor:
        """Bootstrap values after the rollout's last step, from the carried state."""
        return self.policy.value(obs, state, episode_starts)

    def recurrent_eval_actions(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor, greedy: bool
    ) -> tuple[Tensor, Tensor]:
        """Evaluation actions (greedy or sampled) and the next hidden state."""
        dist, _, state = self.policy.step(obs, state, episode_starts)
        return (self.policy.greedy(dist) if greedy else dist.sample()), state

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        hp = self.hparams
        self.clip_eps = scheduled(hp.clip_eps, self.frames, self.max_frames)
        self.entropy_coef = scheduled(hp.entropy_coef, self.frames, self.max_frames)
        self.train_metrics.set(
            {"train/clip_eps": self.clip_eps, "train/entropy_coef": self.entropy_coef}
        )

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        hp = self.hparams
        if self.recurrent is None:
            dist, values = self.policy(batch["obs"])
        else:
            # Sequences (B, L): run the cell through them, then keep only the valid steps.
            valid = batch["valid"]
            dist, values, _ = self.policy(
                batch["obs"], batch["states"], batch["episode_starts"], mask=valid
            )
            batch = {key: batch[key][valid] for key in _STEP_FIELDS}
        log_probs = self.policy.log_prob(dist, batch["actions"])
        advantages = batch["advantages"]
        if hp.normalize_advantages:
            advantages = normalize(advantages)
        policy_loss = clipped_surrogate_loss(
            log_probs, batch["log_probs"], advantages, self.clip_eps
        )
        v_loss = value_loss(values, batch["returns"], batch["values"], hp.clip_value)
        loss = policy_loss + hp.value_coef * v_loss
        if self.entropy_coef:
            entropy = self.policy.entropy(dist).mean()
            loss = loss - self.entropy_coef * entropy
        with torch.no_grad():
            if not self.entropy_coef:
                entropy = self.policy.entropy(dist).mean()
            log_ratio = log_probs - batch["log_probs"]
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
        if hp.target_kl is None:
            return loss
        distributed = self.trainer.world_size > 1
        if distributed:  # every rank decides on the same (mean) KL, so all stop together
            approx_kl = self.trainer.strategy.reduce(approx_kl, reduce_op="mean")
        if approx_kl > hp.target_kl:
            self.stop_update = True  # the rollout yields no more minibatches
            # A single process skips this optimizer step; under DDP every rank must step
            # (Lightning refuses a skipped step there), so the crossing minibatch still trains.
            return loss if distributed else None
        return loss
