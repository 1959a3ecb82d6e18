"""DQN (Mnih et al. 2015) and its Double (van Hasselt et al. 2016) and Dueling variants,
with optional n-step returns and prioritized replay.

The data path, in order:

1. env step: ``data/offpolicy_rollout.py:OffPolicyRollout.step`` acts with :meth:`DQN.explore`
   (``nets/q_network.py:exploring_actions``) and steps the vector env;
2. rollout: the same ``step`` writes the transition into the algorithm's memory,
   ``data/replay.py:ReplayMemory.add`` (n-step windows in ``_add_nstep``; the class chosen
   by ``data/replay_choice.py:make_replay``, built in ``algorithms/off_policy.py:build_rollout``);
3. replay memory: ``ReplayMemory._write`` (``PrioritizedReplay._write`` gives new transitions
   the maximal priority; ``FrameReplay`` stores each frame once);
4. sample: ``OffPolicyRollout.__iter__`` yields ``UpdateRound`` s, whose cycles call
   :meth:`DQN.sample_batches` (``ReplayMemory.sample_stack`` /
   ``PrioritizedReplay.sample_stack``): a cycle's batches as one stacked
   ``data/replay.py:ReplayBatch``;
5. target: :meth:`DQN.update` with :func:`dqn_target` / :func:`double_dqn_target`;
6. loss: Huber or MSE on the TD error, weighted by the PER weights, in :meth:`DQN.loss_terms`;
7. optimizer: Lightning's manual optimization in :meth:`DQN.update`,
   ``optim.py:PolicyOptimizer.configure_optimizers`` (``optim.py:OptimizerSpec.build``),
   clipped by ``optim.py:clip_grad_norm``;
8. target-net update: :meth:`DQN.update_target` after every update (Polyak with ``tau``,
   or hard copies), one foreach kernel (``off_policy.py:TargetNetwork``);
9. priorities: :meth:`DQN.training_step` calls ``PrioritizedReplay.update_priorities`` once
   per cycle with the TD errors of all its batches.
"""

import copy
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.off_policy import OffPolicyAlgorithm, TargetNetwork
from slm_lightning.config_types import Count, NonNegativeFloat, PositiveCount
from slm_lightning.data.offpolicy_rollout import UpdateRound
from slm_lightning.data.prioritized import PrioritizedReplay
from slm_lightning.data.replay import ReplayBatch, ReplayLayout, ReplayMemory
from slm_lightning.data.replay_choice import make_replay
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.q_network import QNetwork, exploration_setting, exploring_actions
from slm_lightning.optim import OptimizerSpec, PolicyOptimizer
from slm_lightning.schedules import Schedule, scheduled


def dqn_target(
    next_q_target: Tensor, rewards: Tensor, discounts: Tensor, terminated: Tensor
) -> Tensor:
    """``r + gamma^k (1 - terminated) max_a Q_target(s', a)``: the target net picks and values."""
    return rewards + discounts * (1.0 - terminated) * next_q_target.max(-1).values


def double_dqn_target(
    next_q_online: Tensor,
    next_q_target: Tensor,
    rewards: Tensor,
    discounts: Tensor,
    terminated: Tensor,
) -> Tensor:
    """``r + gamma^k (1 - terminated) Q_target(s', argmax_a Q_online(s', a))``: the online net
    picks the action, the target net values it, which removes DQN's max-operator bias."""
    best = next_q_online.argmax(-1, keepdim=True)
    return rewards + discounts * (1.0 - terminated) * next_q_target.gather(-1, best).squeeze(-1)


class DQN(PolicyOptimizer, OffPolicyAlgorithm):
    """Deep Q-learning from replay, for discrete actions.

    ``double``, ``dueling``, ``n_steps`` and ``prioritized`` combine freely: DQN is all off,
    Double DQN is ``double: true``, Rainbow-lite is all on.

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        double: Double DQN targets (online net picks, target net values).
        dueling: dueling head ``V + A - mean(A)``.
        net: the Q-network's MLP body (after the conv trunk, if any).
        conv: conv trunk; None uses the Nature CNN for image observations (e.g. Atari) and
            none otherwise. With ``dueling`` each stream gets its own ``conv.hidden_size`` layer.
        lr: learning rate, constant or scheduled over frames.
        batch_size: transitions per gradient step.
        memory_size: replay capacity in transitions.
        learning_starts: frames collected before the first update.
        training_frequency: vector steps between two rounds of updates.
        updates_per_step: gradient steps per round.
        n_steps: n-step returns stored in memory.
        combined_replay: always include the newest transitions in the batch.
        prioritized: prioritized replay with importance-sampling weights.
        per_alpha: priority exponent.
        per_beta: importance-sampling exponent, annealed towards 1 over frames.
        per_epsilon: added to ``|TD error|`` before the exponent, so that no transition's
            priority ``(|delta| + per_epsilon)^per_alpha`` drops to zero.
        exploration: ``epsilon_greedy`` or ``boltzmann``.
        epsilon: exploration rate, constant or scheduled over frames.
        temperature: Boltzmann temperature, constant or scheduled over frames.
        target_update_frequency: frames between hard target-network copies (with ``tau`` None).
        tau: Polyak averaging rate per update; None uses hard copies.
        loss: ``huber`` (smooth L1) or ``mse`` on the TD error.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        optimizer: the optimizer (Adam, AdamW, RMSprop, SGD) and its keyword arguments;
            None is Adam with eps 1e-8.
        checkpoint_memory: save the whole replay memory in checkpoints (off for huge memories).
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate the greedy policy instead of exploring.
    """

    action_spaces = (spaces.Discrete,)
    optimizer_defaults = {"eps": 1e-8}

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount = 100_000,
        gamma: float = 0.99,
        double: bool = False,
        dueling: bool = False,
        net: MLPSpec | None = None,
        conv: ConvSpec | None = None,
        lr: NonNegativeFloat | Schedule = 1e-3,
        batch_size: int = 64,
        memory_size: PositiveCount = 100_000,
        learning_starts: Count = 1_000,
        training_frequency: int = 1,
        updates_per_step: int = 1,
        n_steps: int = 1,
        combined_replay: bool = False,
        prioritized: bool = False,
        per_alpha: float = 0.6,
        per_beta: float | Schedule = Schedule(0.4, 1.0),
        per_epsilon: float = 1e-6,
        exploration: Literal["epsilon_greedy", "boltzmann"] = "epsilon_greedy",
        epsilon: float | Schedule = Schedule(1.0, 0.05, end_frame=50_000),
        temperature: float | Schedule = 1.0,
        target_update_frequency: int = 1_000,
        tau: float | None = None,
        loss: Literal["huber", "mse"] = "huber",
        max_grad_norm: float | None = 10.0,
        optimizer: OptimizerSpec | None = None,
        checkpoint_memory: bool = True,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
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
        self.save_hyperparameters()
        self.check_positive(n_steps=n_steps, target_update_frequency=target_update_frequency)
        self.check_learning_rates(lr=lr)
        self.check_choice("exploration", exploration, ("epsilon_greedy", "boltzmann"))
        self.check_choice("loss", loss, ("huber", "mse"))
        if combined_replay and prioritized:
            raise ConfigError(
                "model.init_args.combined_replay must be false with prioritized: true "
                "(prioritized replay already gives new transitions the maximal priority)"
            )
        if per_alpha < 0:
            raise ConfigError(f"model.init_args.per_alpha must be >= 0, got {per_alpha}")
        if not per_epsilon > 0:
            raise ConfigError(f"model.init_args.per_epsilon must be > 0, got {per_epsilon}")
        if tau is not None and not 0.0 < tau <= 1.0:
            raise ConfigError(f"model.init_args.tau must be in (0, 1], got {tau}")
        self.check_replay_settings()
        self.check_nets(net=net, conv=conv)
        self.double_q = double  # not ``double``: nn.Module.double() casts to float64
        self.lr = lr
        self.n_steps = n_steps
        self.combined_replay = combined_replay
        self.prioritized = prioritized
        self.per_alpha = per_alpha
        self.per_beta = per_beta
        self.per_epsilon = per_epsilon
        self.exploration = exploration
        self.epsilon = epsilon
        self.temperature = temperature
        self.target_update_frequency = target_update_frequency
        self.tau = tau
        self.loss = loss
        self.max_grad_norm = max_grad_norm
        self.optimizer_spec = optimizer or OptimizerSpec()
        self.policy = QNetwork(
            self.observation_space, self.action_space, net or MLPSpec(), dueling, conv=conv
        )
        self.target = copy.deepcopy(self.policy).requires_grad_(False)
        self._target = TargetNetwork(self.policy, self.target)
        self._next_target_update = target_update_frequency

    @override
    def replay_layout(self) -> ReplayLayout:
        layout = super().replay_layout()
        return dataclasses.replace(layout, n_steps=self.n_steps, combined=self.combined_replay)

    @override
    def build_memory(self) -> ReplayMemory:
        return make_replay(self.replay_layout(), self.prioritized, self.per_alpha, self.per_epsilon)

    def explore(self, obs: Tensor) -> Tensor:
        """Epsilon-greedy or Boltzmann actions from the online net's Q-values."""
        _, rate = exploration_setting(
            self.exploration, self.epsilon, self.temperature, self.frames, self.max_frames
        )
        return exploring_actions(self.policy(obs), self.exploration, rate)

    @override
    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        return self.policy(obs).argmax(-1) if greedy else self.explore(obs)

    @override
    def sample_batches(self, count: int) -> ReplayBatch:
        if isinstance(self.memory, PrioritizedReplay):
            beta = scheduled(self.per_beta, self.frames, self.max_frames)
            stack = self.memory.sample_stack(count, self.batch_size, beta=beta)
            return stack.as_tensors(self.device)
        return super().sample_batches(count)

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        key, rate = exploration_setting(
            self.exploration, self.epsilon, self.temperature, self.frames, self.max_frames
        )
        self.train_metrics.set({key: rate})

    def loss_terms(self, batch: ReplayBatch) -> tuple[Tensor, Tensor]:
        """The batch's loss (Huber or MSE on the TD error, weighted by the PER weights) and
        its TD errors ``Q(s, a) - target`` ``(B,)``."""
        obs, next_obs = batch.obs, batch.next_obs
        if self.double_q:  # one forward pass of the online net over s and s' together
            q_all = self.policy(torch.cat([obs, next_obs]))
            q_values, next_q_online = q_all[: len(obs)], q_all[len(obs) :].detach()
        else:
            q_values = self.policy(obs)
        q = q_values.gather(-1, batch.actions.long().unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            next_q_target = self.target(next_obs)
            args = (batch.rewards, batch.discounts, batch.terminated)
            if self.double_q:
                target = double_dqn_target(next_q_online, next_q_target, *args)
            else:
                target = dqn_target(next_q_target, *args)
        td_error = q - target
        if self.loss == "huber":
            elementwise = F.smooth_l1_loss(q, target, reduction="none")
        else:
            elementwise = 0.5 * td_error.pow(2)
        if batch.weights is not None:  # prioritized replay: correct the sampling bias
            loss = (batch.weights * elementwise).mean()
        else:
            loss = elementwise.mean()
        self.train_metrics.add({"train/loss": loss, "train/q_mean": q.mean()})
        return loss, td_error.detach()

    def update(self, batch: ReplayBatch, optimizer: torch.optim.Optimizer) -> Tensor:
        """One gradient step on ``batch``, then the target network's update; returns the
        batch's TD errors (for prioritized replay)."""
        loss, td_error = self.loss_terms(batch)
        self.backward_step(loss, optimizer, self.max_grad_norm)
        self.update_target()
        return td_error

    @override
    def training_step(self, batch: UpdateRound, batch_idx: int) -> None:
        optimizer = self.optimizers()
        for stack in batch:
            td_errors = [self.update(stack.at(k), optimizer) for k in range(len(stack.rewards))]
            if stack.weights is not None:  # one priority write for the cycle's batches
                self.memory.update_priorities(
                    stack.indices.reshape(-1).cpu().numpy(),
                    torch.cat(td_errors).abs().cpu().numpy(),
                )

    def update_target(self) -> None:
        """Polyak-average the target network towards the online one (``tau``), or copy it
        every ``target_update_frequency`` frames."""
        if self.tau is not None:
            self._target.polyak(self.tau)
        elif self.frames >= self._next_target_update:
            self._target.copy()
            period = self.target_update_frequency
            self._next_target_update = (self.frames // period + 1) * period

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["next_target_update"] = self._next_target_update

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._next_target_update = checkpoint.get("next_target_update", self._next_target_update)
