"""REINFORCE (Williams 1992): Monte Carlo policy gradient with an entropy bonus."""

from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.policy_gradient import PolicyGradient
from slm_lightning.config_types import NonNegativeFloat, PositiveCount
from slm_lightning.data.onpolicy_memory import OnPolicyBatch
from slm_lightning.data.returns import MonteCarloReturns
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.optim import OptimizerSpec
from slm_lightning.schedules import Schedule, scheduled


class Reinforce(PolicyGradient):
    """REINFORCE: ``-log pi(a|s) G - c_e H`` with ``G`` the discounted reward-to-go.

    There is no critic: an episode still running when the rollout ends contributes the
    rewards seen so far, so a ``time_horizon`` of about an episode's length keeps that bias small.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        time_horizon: vector steps per rollout.
        training_epochs: passes over each rollout (1 is the textbook algorithm).
        num_minibatches: minibatches per pass.
        center_returns: subtract the rollout's mean return (a constant baseline).
        entropy_coef: weight of the entropy bonus, constant or scheduled over frames.
        lr: learning rate, constant or scheduled.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) and its keyword arguments;
            None is Adam with eps 1e-5.
        actor: policy body.
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
        time_horizon: int = 256,
        training_epochs: int = 1,
        num_minibatches: int = 1,
        center_returns: bool = True,
        entropy_coef: float | Schedule = 0.01,
        lr: NonNegativeFloat | Schedule = 2e-3,
        max_grad_norm: float | None = None,
        optimizer: OptimizerSpec | None = None,
        actor: MLPSpec | None = None,
        log_std_init: float = 0.0,
        rescale_actions: bool = True,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
    ) -> None:
        super().__init__(
            env,
            max_frames,
            gamma,
            MonteCarloReturns(gamma, center=center_returns),
            time_horizon,
            training_epochs,
            num_minibatches,
            lr,
            None,
            max_grad_norm,
            eval_episodes,
            eval_greedy,
            optimizer,
        )
        self.save_hyperparameters()
        self.check_nets(actor=actor)
        self.entropy_coef = entropy_coef
        self.policy = ActorCritic(
            self.observation_space,
            self.action_space,
            actor or MLPSpec(),
            critic=None,
            log_std_init=log_std_init,
            rescale_actions=rescale_actions,
        )

    @override
    def minibatch_loss(self, batch: OnPolicyBatch) -> Tensor:
        dist, _ = self.policy(batch.obs)
        log_probs = self.policy.log_prob(dist, batch.actions)
        entropy = self.policy.entropy(dist).mean()
        policy_loss = -(log_probs * batch.advantages).mean()
        entropy_coef = scheduled(self.entropy_coef, self.frames, self.max_frames)
        loss = policy_loss - entropy_coef * entropy
        self.train_metrics.set({"train/entropy_coef": entropy_coef})
        self.train_metrics.add(
            {"train/loss": loss, "train/policy_loss": policy_loss, "train/entropy": entropy}
        )
        return loss
