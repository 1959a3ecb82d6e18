"""SARSA (Rummery & Niranjan 1994): on-policy TD control with a Q-network."""

from typing import Literal

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.algorithms.policy_gradient import MinibatchUpdates, onpolicy_rollout
from slm_lightning.config_types import NonNegativeFloat, PositiveCount
from slm_lightning.data.onpolicy_memory import OnPolicyBatch, OnPolicyMemory
from slm_lightning.data.onpolicy_rollout import OnPolicyRollout
from slm_lightning.data.returns import GAE
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.q_network import QNetwork, exploration_setting, exploring_actions
from slm_lightning.optim import OptimizerSpec, PolicyOptimizer
from slm_lightning.schedules import Schedule


class SARSA(MinibatchUpdates, PolicyOptimizer, RLAlgorithm):
    """SARSA: regress ``Q(s, a)`` on ``r + gamma Q(s', a')`` where ``a'`` is the action the
    exploring policy really took next.

    The on-policy rollout stores ``Q(s_t, a_t)`` as each slot's value, so the target for slot
    ``t`` is the TD(0) return over the next slot's value; on truncation that next slot is the
    autoreset step, whose stored value is ``Q(final_obs, a')``. The rollout's last step
    bootstraps from ``Q(s_T, a')`` with a freshly sampled ``a'``.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        net: the Q-network body.
        lr: learning rate, constant or scheduled over frames.
        time_horizon: vector steps per rollout.
        training_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        exploration: ``epsilon_greedy`` or ``boltzmann``.
        epsilon: exploration rate, constant or scheduled over frames.
        temperature: Boltzmann temperature, constant or scheduled over frames.
        loss: ``huber`` or ``mse`` on the TD error.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) and its keyword arguments;
            None is Adam with eps 1e-5.
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate the greedy policy instead of exploring.
    """

    action_spaces = (spaces.Discrete,)

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 200_000,
        gamma: float = 0.99,
        net: MLPSpec | None = None,
        lr: NonNegativeFloat | Schedule = 1e-3,
        time_horizon: int = 32,
        training_epochs: int = 1,
        num_minibatches: int = 1,
        exploration: Literal["epsilon_greedy", "boltzmann"] = "epsilon_greedy",
        epsilon: float | Schedule = Schedule(1.0, 0.05, end_frame=50_000),
        temperature: float | Schedule = 1.0,
        loss: Literal["huber", "mse"] = "mse",
        max_grad_norm: float | None = 10.0,
        optimizer: OptimizerSpec | None = None,
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
        self.check_learning_rates(lr=lr)
        self.check_choice("exploration", exploration, ("epsilon_greedy", "boltzmann"))
        self.check_choice("loss", loss, ("huber", "mse"))
        self.check_nets(net=net)
        self.lr = lr
        self.time_horizon = time_horizon
        self.training_epochs = training_epochs
        self.num_minibatches = num_minibatches
        self.exploration = exploration
        self.epsilon = epsilon
        self.temperature = temperature
        self.loss = loss
        self.max_grad_norm = max_grad_norm
        self.automatic_optimization = False  # a rollout's minibatches in one training step
        self.optimizer_spec = optimizer or OptimizerSpec()
        self.policy = QNetwork(self.observation_space, self.action_space, net or MLPSpec())
        self.estimator = GAE(gamma, 0.0)  # lambda 0: TD(0) targets
        self.memory: OnPolicyMemory | None = None

    @override
    def build_rollout(self) -> OnPolicyRollout:
        self.memory, rollout = onpolicy_rollout(
            self, self.time_horizon, self.estimator, self.training_epochs, self.num_minibatches
        )
        return rollout

    def exploring_actions(self, q: Tensor) -> Tensor:
        """Epsilon-greedy or Boltzmann actions from the Q-values ``q`` ``(B, n)``."""
        _, rate = exploration_setting(
            self.exploration, self.epsilon, self.temperature, self.frames, self.max_frames
        )
        return exploring_actions(q, self.exploration, rate)

    def act(
        self, obs: Tensor, state: None = None, episode_starts: None = None
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        q = self.policy(obs)
        actions = self.exploring_actions(q)
        values = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        return actions, torch.zeros_like(q[:, 0]), values, None

    def bootstrap_values(
        self, obs: Tensor, state: None = None, episode_starts: None = None
    ) -> Tensor:
        return self.act(obs)[2]

    @override
    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        q = self.policy(obs)
        return q.argmax(-1) if greedy else self.exploring_actions(q)

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        key, rate = exploration_setting(
            self.exploration, self.epsilon, self.temperature, self.frames, self.max_frames
        )
        self.train_metrics.set({key: rate})

    @override
    def minibatch_loss(self, batch: OnPolicyBatch) -> Tensor:
        q = self.policy(batch.obs).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        if self.loss == "huber":
            loss = F.smooth_l1_loss(q, batch.returns)
        else:
            loss = 0.5 * (q - batch.returns).pow(2).mean()
        self.train_metrics.add({"train/loss": loss, "train/q_mean": q.mean()})
        return loss
