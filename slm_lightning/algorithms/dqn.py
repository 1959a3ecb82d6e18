"""DQN (Mnih et al. 2015) and its Double (van Hasselt et al. 2016) and Dueling variants,
with optional n-step returns and prioritized replay."""

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.config_types import Count, NonNegativeFloat, PositiveCount
from slm_lightning.data.frame_replay import FrameReplay, PrioritizedFrameReplay
from slm_lightning.data.offpolicy import OffPolicyRollout
from slm_lightning.data.prioritized import PrioritizedReplay
from slm_lightning.data.replay import ReplayMemory
from slm_lightning.envs.atari import is_atari
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.q_network import QNetwork, boltzmann, epsilon_greedy
from slm_lightning.optim import adam, clip_grad_norm, loss_scaling, set_learning_rates
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


class DQN(RLAlgorithm):
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
        lr: Adam learning rate, constant or scheduled over frames.
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
        exploration: ``epsilon_greedy`` or ``boltzmann``.
        epsilon: exploration rate, constant or scheduled over frames.
        temperature: Boltzmann temperature, constant or scheduled over frames.
        target_update_frequency: frames between hard target-network copies (with ``tau`` None).
        tau: Polyak averaging rate per update; None uses hard copies.
        loss: ``huber`` (smooth L1) or ``mse`` on the TD error.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        checkpoint_memory: save the whole replay memory in checkpoints (off for huge memories).
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate the greedy policy instead of exploring.
    """

    action_spaces = (spaces.Discrete,)
    adam_eps = 1e-8

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
        exploration: Literal["epsilon_greedy", "boltzmann"] = "epsilon_greedy",
        epsilon: float | Schedule = Schedule(1.0, 0.05, end_frame=50_000),
        temperature: float | Schedule = 1.0,
        target_update_frequency: int = 1_000,
        tau: float | None = None,
        loss: Literal["huber", "mse"] = "huber",
        max_grad_norm: float | None = 10.0,
        checkpoint_memory: bool = True,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
    ) -> None:
        super().__init__(env, max_frames, gamma, eval_episodes, eval_greedy)
        self.save_hyperparameters()
        self.check_positive(
            batch_size=batch_size,
            memory_size=memory_size,
            training_frequency=training_frequency,
            updates_per_step=updates_per_step,
            n_steps=n_steps,
            target_update_frequency=target_update_frequency,
        )
        self.check_learning_rates(lr=lr)
        self.check_choice("exploration", exploration, ("epsilon_greedy", "boltzmann"))
        self.check_choice("loss", loss, ("huber", "mse"))
        self.check_nets(net=net, conv=conv)
        if combined_replay and prioritized:
            raise ConfigError(
                "model.init_args.combined_replay must be false with prioritized: true "
                "(prioritized replay already gives new transitions the maximal priority)"
            )
        if tau is not None and not 0.0 < tau <= 1.0:
            raise ConfigError(f"model.init_args.tau must be in (0, 1], got {tau}")
        self.check_replay(learning_starts, batch_size, memory_size)
        self.learning_starts = learning_starts
        self.policy = QNetwork(
            self.observation_space, self.action_space, net or MLPSpec(), dueling, conv=conv
        )
        self.target = copy.deepcopy(self.policy).requires_grad_(False)
        self._next_target_update = target_update_frequency

    @override
    def build_rollout(self) -> OffPolicyRollout:
        hp = self.hparams
        obs_dtype = self.observation_space.dtype
        obs_dtype = np.float32 if np.issubdtype(obs_dtype, np.floating) else obs_dtype
        kwargs = dict(
            capacity=hp.memory_size,
            num_envs=self.env_spec.num_envs,
            obs_shape=self.observation_space.shape,
            obs_dtype=obs_dtype,
            action_shape=(),
            action_dtype=np.int64,
            n_steps=hp.n_steps,
            gamma=self.gamma,
            combined=hp.combined_replay,
            seed=self.env_seed(),
        )
        # Stacks of uint8 frames (Atari) go to a frame memory, which stores each frame once
        # (~7.5 instead of 56 GB for 1M Atari transitions) and returns the same batches; the
        # choice changes no result, so it is not a hyperparameter.
        spec = self.env_spec
        stack = spec.atari.stack_num if is_atari(spec.name) else spec.frame_stack
        frames = stack > 1 and obs_dtype == np.uint8
        if hp.prioritized:
            per = PrioritizedFrameReplay if frames else PrioritizedReplay
            memory = per(**kwargs, alpha=hp.per_alpha)
        else:
            memory = (FrameReplay if frames else ReplayMemory)(**kwargs)
        return OffPolicyRollout(
            self,
            self.env_spec,
            memory,
            self.env_seed(),
            training_frequency=hp.training_frequency,
            updates_per_step=hp.updates_per_step,
            world_size=self.trainer.world_size,
            gamma=self.gamma,
            checkpoint_memory=hp.checkpoint_memory,
        )

    def explore(self, obs: Tensor) -> Tensor:
        q = self.policy(obs)
        if self.hparams.exploration == "boltzmann":
            return boltzmann(q, scheduled(self.hparams.temperature, self.frames, self.max_frames))
        return epsilon_greedy(q, scheduled(self.hparams.epsilon, self.frames, self.max_frames))

    @override
    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        return self.policy(obs).argmax(-1) if greedy else self.explore(obs)

    def sample_batch(self, memory: ReplayMemory) -> dict[str, np.ndarray]:
        if isinstance(memory, PrioritizedReplay):
            return memory.sample(
                self.hparams.batch_size,
                beta=scheduled(self.hparams.per_beta, self.frames, self.max_frames),
            )
        return memory.sample(self.hparams.batch_size)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = scheduled(self.hparams.lr, 0, self.max_frames)
        return adam(self.policy.param_groups(), lr, self.adam_eps, loss_scaling(self._trainer))

    @override
    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        max_norm = self.hparams.max_grad_norm if gradient_clip_val is None else gradient_clip_val
        clip_grad_norm(self, optimizer, max_norm)

    @override
    def on_train_epoch_start(self) -> None:
        hp = self.hparams
        lr = scheduled(hp.lr, self.frames, self.max_frames)
        set_learning_rates(self.trainer.optimizers[0], (lr,))
        self.train_metrics.set({"train/lr": lr})
        if hp.exploration == "epsilon_greedy":
            self.train_metrics.set(
                {"train/epsilon": scheduled(hp.epsilon, self.frames, self.max_frames)}
            )
        else:
            self.train_metrics.set(
                {"train/temperature": scheduled(hp.temperature, self.frames, self.max_frames)}
            )

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        obs, next_obs = batch["obs"], batch["next_obs"]
        if hp.double:  # one forward pass of the online net over s and s' together
            q_all = self.policy(torch.cat([obs, next_obs]))
            q_values, next_q_online = q_all[: len(obs)], q_all[len(obs) :].detach()
        else:
            q_values = self.policy(obs)
        q = q_values.gather(-1, batch["actions"].long().unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            next_q_target = self.target(next_obs)
            args = (batch["rewards"], batch["discounts"], batch["terminated"])
            if hp.double:
                target = double_dqn_target(next_q_online, next_q_target, *args)
            else:
                target = dqn_target(next_q_target, *args)
        td_error = q - target
        if hp.loss == "huber":
            elementwise = F.smooth_l1_loss(q, target, reduction="none")
        else:
            elementwise = 0.5 * td_error.pow(2)
        if "weights" in batch:  # prioritized replay: correct the sampling bias
            loss = (batch["weights"] * elementwise).mean()
            self.rollout.memory.update_priorities(
                batch["indices"].cpu().numpy(), td_error.detach().abs().cpu().numpy()
            )
        else:
            loss = elementwise.mean()
        self.train_metrics.add({"train/loss": loss, "train/q_mean": q.mean()})
        return loss

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        hp = self.hparams
        if hp.tau is not None:
            with torch.no_grad():
                torch._foreach_lerp_(
                    list(self.target.parameters()), list(self.policy.parameters()), hp.tau
                )
        elif self.frames >= self._next_target_update:
            self.target.load_state_dict(self.policy.state_dict())
            self._next_target_update = (
                self.frames // hp.target_update_frequency + 1
            ) * hp.target_update_frequency

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["next_target_update"] = self._next_target_update

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._next_target_update = checkpoint.get("next_target_update", self._next_target_update)
