"""Advantage Actor-Critic (Mnih et al. 2016, arXiv:1602.01783), synchronous, with GAE or n-step returns."""

from typing import Literal

from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.algorithms.ppo import normalize
from slm_lightning.config_types import NonNegativeFloat, PositiveCount
from slm_lightning.data.onpolicy import OnPolicyMemory
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.schedules import Schedule, scheduled


class A2C(RLAlgorithm):
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
        super().__init__(env, max_frames, gamma, eval_episodes, eval_greedy)
        self.save_hyperparameters()
        self.check_positive(time_horizon=time_horizon, n_steps=n_steps)
        self.check_learning_rates(lr=lr, critic_lr=critic_lr)
        self.check_choice("returns", returns, ("gae", "nstep"))
        if not 0.0 <= gae_lambda <= 1.0:
            raise ConfigError(f"model.init_args.gae_lambda must be in [0, 1], got {gae_lambda}")
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
        hp = self.hparams
        memory.compute_returns(hp.returns, self.gamma, hp.gae_lambda, hp.n_steps)
        self.train_metrics.add({"train/explained_variance": memory.explained_variance()})

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        dist, values = self.policy(batch["obs"])
        log_probs = self.policy.log_prob(dist, batch["actions"])
        entropy = self.policy.entropy(dist).mean()
        advantages = (
            normalize(batch["advantages"]) if hp.normalize_advantages else batch["advantages"]
        )
        policy_loss = -(log_probs * advantages).mean()
        value_loss = 0.5 * (values - batch["returns"]).pow(2).mean()
        entropy_coef = scheduled(hp.entropy_coef, self.frames, self.max_frames)
        loss = policy_loss + hp.value_coef * value_loss - entropy_coef * entropy
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
