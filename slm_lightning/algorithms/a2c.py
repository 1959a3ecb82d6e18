"""Advantage Actor-Critic (Mnih et al. 2016, arXiv:1602.01783), synchronous, with GAE or n-step returns."""

from typing import Literal

from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.policy_gradient import PolicyGradient
from slm_lightning.algorithms.ppo import normalize
from slm_lightning.config_types import NonNegativeFloat, PositiveCount
from slm_lightning.data.onpolicy_memory import OnPolicyBatch
from slm_lightning.data.returns import GAE, NStepReturns, ReturnsEstimator
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.optim import OptimizerSpec
from slm_lightning.schedules import Schedule, scheduled


class A2C(PolicyGradient):
    """A2C: one gradient step per rollout on ``-log pi(a|s) A + c_v (V - R)^2 / 2 - c_e H``.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        returns: ``gae`` (advantages by GAE) or ``nstep`` (advantages ``R^(n) - V``).
        gae_lambda: GAE lambda (``returns: gae``).
        n_steps: steps summed before bootstrapping (``returns: nstep``).
        time_horizon: vector steps per rollout (and per update).
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus, constant or scheduled over frames.
        lr: learning rate of the actor (and of a shared body), constant or scheduled.
        critic_lr: learning rate of a separate critic; None uses ``lr``.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) and its keyword arguments;
            None is Adam with eps 1e-5.
        normalize_advantages: normalise advantages over the rollout.
        actor: actor body.
        critic: critic body (ignored when ``shared``).
        shared: one body with a policy head and a value head.
        conv: conv trunk shared by actor and critic, before their bodies; None uses the
            Nature CNN for image observations (e.g. Atari) and none otherwise.
        log_std_init: initial log std of Gaussian policies.
        rescale_actions: map Gaussian actions from [-1, 1] onto the Box instead of clipping.
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate the greedy policy instead of sampling.
    """

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 1_000_000,
        gamma: float = 0.99,
        returns: Literal["gae", "nstep"] = "gae",
        gae_lambda: float = 0.95,
        n_steps: int = 5,
        time_horizon: int = 5,
        value_coef: float = 0.5,
        entropy_coef: float | Schedule = 0.0,
        lr: NonNegativeFloat | Schedule = 7e-4,
        critic_lr: NonNegativeFloat | Schedule | None = None,
        max_grad_norm: float | None = 0.5,
        optimizer: OptimizerSpec | None = None,
        normalize_advantages: bool = False,
        actor: MLPSpec | None = None,
        critic: MLPSpec | None = None,
        shared: bool = False,
        log_std_init: float = 0.0,
        rescale_actions: bool = True,
        conv: ConvSpec | None = None,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
    ) -> None:
        self.check_choice("returns", returns, ("gae", "nstep"))
        self.check_positive(n_steps=n_steps)
        if not 0.0 <= gae_lambda <= 1.0:
            raise ConfigError(f"model.init_args.gae_lambda must be in [0, 1], got {gae_lambda}")
        # The user's choice of estimator, made once: the memory computes with this object.
        estimator: ReturnsEstimator = (
            GAE(gamma, gae_lambda) if returns == "gae" else NStepReturns(gamma, n_steps)
        )
        # One update per rollout: one epoch of one minibatch.
        super().__init__(
            env,
            max_frames,
            gamma,
            estimator,
            time_horizon,
            1,
            1,
            lr,
            critic_lr,
            max_grad_norm,
            eval_episodes,
            eval_greedy,
            optimizer,
        )
        self.save_hyperparameters()
        self.check_nets(actor=actor, critic=critic, conv=conv)
        self.value_coef = value_coef
        self.entropy_coef = entropy_coef
        self.normalize_advantages = normalize_advantages
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
    def minibatch_loss(self, batch: OnPolicyBatch) -> Tensor:
        dist, values = self.policy(batch.obs)
        log_probs = self.policy.log_prob(dist, batch.actions)
        entropy = self.policy.entropy(dist).mean()
        advantages = normalize(batch.advantages) if self.normalize_advantages else batch.advantages
        policy_loss = -(log_probs * advantages).mean()
        value_loss = 0.5 * (values - batch.returns).pow(2).mean()
        entropy_coef = scheduled(self.entropy_coef, self.frames, self.max_frames)
        loss = policy_loss + self.value_coef * value_loss - entropy_coef * entropy
        self.train_metrics.set({"train/entropy_coef": entropy_coef})
        self.train_metrics.add(
            {
                "train/loss": loss,
                "train/policy_loss": policy_loss,
                "train/value_loss": value_loss,
                "train/entropy": entropy,
            }
        )
        return loss
