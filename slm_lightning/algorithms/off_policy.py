"""What the replay-based algorithms (DQN, SAC, CrossQ) share: the replay memory they own, the
off-policy rollout that fills it, and its place in the checkpoint."""

from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn
from typing_extensions import override

from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.checkpoints import checkpoint_frames, saved_memory_state, saved_rollout_state
from slm_lightning.data.offpolicy_rollout import OffPolicyRollout
from slm_lightning.data.replay import ReplayBatch, ReplayLayout, ReplayMemory, replay_layout
from slm_lightning.data.replay_choice import make_replay
from slm_lightning.envs.spec import EnvSpec
from slm_lightning.errors import ConfigError


class TargetNetwork:
    """A target network's tensors matched with its online network's, listed once (walking
    the module tree costs as much as a small net's update), for one-kernel updates.

    Args:
        online: the trained network.
        target: its copy (same structure), which bootstraps the TD targets.
    """

    def __init__(self, online: nn.Module, target: nn.Module) -> None:
        self.online, self.target = online, target
        self._params: tuple[list[Tensor], list[Tensor]] | None = None

    def _lists(self) -> tuple[list[Tensor], list[Tensor]]:
        # Listed at first use, after Lightning moved the modules to their device (``.to``
        # keeps the Parameter objects, so the lists stay valid).
        if self._params is None:
            self._params = (list(self.target.parameters()), list(self.online.parameters()))
        return self._params

    @torch.no_grad()
    def polyak(self, tau: float) -> None:
        """``target <- tau * online + (1 - tau) * target``, one foreach kernel."""
        torch._foreach_lerp_(*self._lists(), tau)

    @torch.no_grad()
    def copy(self) -> None:
        """``target <- online`` (parameters and buffers)."""
        torch._foreach_copy_(*self._lists())
        for target, online in zip(self.target.buffers(), self.online.buffers(), strict=True):
            target.copy_(online)


class OffPolicyAlgorithm(RLAlgorithm):
    """An algorithm that learns from a replay memory: it owns the memory (``self.memory``),
    hands it to the :class:`OffPolicyRollout` that writes into it, samples its batches, and
    saves it under ``checkpoint["memory"]`` (None with ``checkpoint_memory: false``).

    A resume from a checkpoint without the memory collects ``learning_starts`` frames before
    it updates again: updating at once would fit the first few transitions over and over.

    ``training_step`` receives an :class:`~slm_lightning.data.offpolicy_rollout.UpdateRound`
    and runs every update in it under Lightning's manual optimization.

    Subclasses implement :meth:`explore` (and ``training_step``); the memory's class follows
    from :meth:`replay_layout` (see :func:`~slm_lightning.data.replay_choice.make_replay`).

    Args:
        env: the environment spec.
        max_frames: training budget in frames (all envs, all ranks).
        gamma: discount factor.
        batch_size: transitions per gradient step.
        memory_size: replay capacity in transitions.
        learning_starts: frames collected before the first update.
        training_frequency: vector steps between two rounds of updates.
        updates_per_step: gradient steps (sampled batches) per round.
        checkpoint_memory: save the whole replay memory in checkpoints.
        eval_episodes: episodes played by ``slm-lab validate`` / ``test``.
        eval_greedy: evaluate the greedy policy instead of exploring.
    """

    def __init__(
        self,
        env: EnvSpec,
        max_frames: int,
        gamma: float,
        batch_size: int,
        memory_size: int,
        learning_starts: int,
        training_frequency: int,
        updates_per_step: int,
        checkpoint_memory: bool,
        eval_episodes: int,
        eval_greedy: bool,
    ) -> None:
        super().__init__(env, max_frames, gamma, eval_episodes, eval_greedy)
        self.check_positive(
            batch_size=batch_size,
            memory_size=memory_size,
            training_frequency=training_frequency,
            updates_per_step=updates_per_step,
        )
        if learning_starts < 0:
            raise ConfigError(
                f"model.init_args.learning_starts must be >= 0, got {learning_starts}"
            )
        # Several updates per training_step (a round of env steps and updates, see
        # OffPolicyRollout), each with its own optimizer steps: Lightning's manual optimization.
        self.automatic_optimization = False
        self.batch_size = batch_size
        self.memory_size = memory_size
        self.learning_starts = learning_starts
        self.training_frequency = training_frequency
        self.updates_per_step = updates_per_step
        self.checkpoint_memory = checkpoint_memory
        self.memory: ReplayMemory | None = None  # built with the rollout
        self._saved_memory: dict[str, Any] | None = None
        self._resumed_frames: int | None = None  # the frame clock of a checkpoint resumed

    def check_replay_settings(self) -> None:
        """Raise a :class:`ConfigError` for replay settings under which nothing would train:
        no update before the budget ends, or a memory smaller than one batch. Subclasses call
        it after checking their own hyperparameters, which it presupposes."""
        if self.learning_starts >= self.max_frames:
            raise ConfigError(
                f"model.init_args.learning_starts ({self.learning_starts}) must be < max_frames "
                f"({self.max_frames}): no update would run"
            )
        if self.memory_size < self.batch_size:
            raise ConfigError(
                f"model.init_args.memory_size ({self.memory_size}) must be >= batch_size "
                f"({self.batch_size})"
            )

    def replay_layout(self) -> ReplayLayout:
        """The memory's layout: this env's spaces, ``memory_size`` one-step transitions."""
        return replay_layout(
            self.observation_space,
            self.action_space,
            capacity=self.memory_size,
            num_envs=self.env_spec.num_envs,
            seed=self.env_seed(),
            gamma=self.gamma,
        )

    def build_memory(self) -> ReplayMemory:
        """A new, empty replay memory of :meth:`replay_layout`."""
        return make_replay(self.replay_layout())

    @override
    def build_rollout(self) -> OffPolicyRollout:
        self.memory = self.build_memory()
        learning_starts = self.learning_starts
        if self._saved_memory is not None:
            self.memory.load_state_dict(self._saved_memory)
            self._saved_memory = None
        elif self._resumed_frames is not None:
            # Saved with checkpoint_memory: false: fill the memory again as a new run does.
            learning_starts = max(learning_starts, self._resumed_frames + learning_starts)
            if self.learning_starts > 0:
                logger.info(
                    "the checkpoint holds no replay memory (checkpoint_memory: false): "
                    f"collecting learning_starts={self.learning_starts} frames, to frame "
                    f"{learning_starts}, before updating again"
                )
        return OffPolicyRollout(
            self,
            self.env_spec,
            self.memory,
            self.env_seed(),
            learning_starts,
            training_frequency=self.training_frequency,
            updates_per_step=self.updates_per_step,
            world_size=self.trainer.world_size,
            gamma=self.gamma,
        )

    def sample_batches(self, count: int) -> ReplayBatch:
        """``count`` uniformly sampled batches of ``batch_size`` transitions, stacked on a
        first axis, on this module's device: one cycle's updates."""
        return self.memory.sample_stack(count, self.batch_size).as_tensors(self.device)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        keep = self.checkpoint_memory and self.memory is not None
        checkpoint["memory"] = self.memory.state_dict() if keep else None

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Restored into the memory when the rollout is built (fit only; not for evaluation).
        self._saved_memory = saved_memory_state(checkpoint)
        resumed = saved_rollout_state(checkpoint) is not None
        self._resumed_frames = checkpoint_frames(checkpoint) if resumed else None
