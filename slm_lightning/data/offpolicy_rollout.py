"""The off-policy rollout dataset: step the envs, write the algorithm's replay memory, yield
sampled batches."""

import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor

from slm_lightning.data.replay import ReplayBatch, ReplayMemory
from slm_lightning.data.vector_rollout import VectorRollout
from slm_lightning.envs.factory import EnvSpec, next_step_resets
from slm_lightning.nets.conv import full_precision


class OffPolicyAgent(Protocol):
    """What the off-policy rollout needs from an algorithm."""

    device: torch.device
    max_frames: int

    def explore(self, obs: Tensor) -> Tensor: ...
    def env_actions(self, actions: np.ndarray) -> np.ndarray: ...
    def sample_batches(self, count: int) -> ReplayBatch: ...


# Updates a Lightning batch (one training_step) holds at least, where the budget allows:
# Lightning's per-batch hooks cost ~0.3 ms, as much as a small update, so they are paid once
# per round of several updates (and env steps) rather than once per update.
ROUND_UPDATES = 32


class UpdateRound:
    """The work of one ``training_step``: ``cycles`` rollout cycles of ``training_frequency``
    vector steps, each followed by its ``updates_per_step`` sampled batches.

    Lazy: iterating it steps the envs and samples, so every update still sees the memory as
    the sequential algorithm would (the batches of a cycle are drawn after its env steps).
    Each item is one cycle's batches stacked on a first axis (``batches.at(k)`` is update
    ``k``'s), already on the agent's device; cycles before ``learning_starts`` yield nothing.

    Args:
        rollout: the rollout that steps the envs and writes the memory.
        cycles: cycles in this round.
    """

    def __init__(self, rollout: "OffPolicyRollout", cycles: int) -> None:
        self.rollout = rollout
        self.cycles = cycles

    def __iter__(self) -> Iterator[ReplayBatch]:
        rollout = self.rollout
        for _ in range(self.cycles):
            if rollout.frames >= rollout.agent.max_frames:
                return
            for _ in range(rollout.training_frequency):
                rollout.step()
            if rollout.updating():
                yield rollout.agent.sample_batches(rollout.updates_per_step)


class OffPolicyRollout(VectorRollout):
    """Alternates ``training_frequency`` vector steps with ``updates_per_step`` sampled batches.

    One ``iter()`` (one Lightning epoch) runs enough such cycles to cover about
    ``epoch_frames`` frames, so per-epoch hooks (metrics, checkpoints) stay off the
    per-step path. It yields :class:`UpdateRound` s of enough cycles for
    :data:`ROUND_UPDATES` updates, so Lightning's per-batch hooks stay off the per-update
    path; a round runs its cycles as ``training_step`` iterates it. No batch is sampled before
    the frame clock reaches ``learning_starts``.

    The memory is the algorithm's: it checkpoints it; the rollout only writes into it. The
    rollout's own state (frame clock, RNGs, normalisers) is :class:`VectorRollout`'s.

    Args:
        agent: the algorithm (see :class:`OffPolicyAgent`).
        env_spec: which env to build.
        memory: the algorithm's replay memory, which the rollout writes and the agent samples.
        seed: seed of this process's first sub-env.
        learning_starts: the frame before which no batch is yielded (the agent's
            ``learning_starts``, later after a resume that has to refill the memory).
        training_frequency: vector steps between two rounds of updates.
        updates_per_step: sampled batches (gradient steps) per round.
        epoch_frames: frames per Lightning epoch (rounded up to whole cycles).
        world_size: processes rolling out in lockstep; the frame clock counts all of them.
        gamma: discount for reward normalisation.
    """

    def __init__(
        self,
        agent: OffPolicyAgent,
        env_spec: EnvSpec,
        memory: ReplayMemory,
        seed: int,
        learning_starts: int,
        training_frequency: int = 1,
        updates_per_step: int = 1,
        epoch_frames: int = 1000,
        world_size: int = 1,
        gamma: float = 0.99,
    ) -> None:
        super().__init__(env_spec, seed, world_size, gamma)
        self.agent = agent
        self.memory = memory
        self.learning_starts = learning_starts
        self.training_frequency = training_frequency
        self.updates_per_step = updates_per_step
        frames_per_cycle = training_frequency * env_spec.num_envs * world_size
        self.cycles_per_epoch = max(1, math.ceil(epoch_frames / frames_per_cycle))

    def __len__(self) -> int:
        return math.ceil(self.cycles_per_epoch / self.cycles_per_round)

    @property
    def cycles_per_round(self) -> int:
        """Cycles per :class:`UpdateRound`: enough for :data:`ROUND_UPDATES` updates."""
        return min(self.cycles_per_epoch, math.ceil(ROUND_UPDATES / self.updates_per_step))

    def updating(self) -> bool:
        """Whether a cycle that ends now samples its batches: past ``learning_starts``."""
        return self.frames >= self.learning_starts and len(self.memory) > 0

    def on_env_created(self, env: VectorEnv) -> None:
        # Fresh episodes: n-step windows left open by a restored memory (a resume) belong to
        # episodes that no longer exist and must not be continued with the new ones' steps.
        self.memory.pending_count[:] = 0

    @torch.inference_mode()
    def step(self) -> None:
        """One vector step with the agent's exploration policy, written to memory."""
        if self.env is None:
            self.start()
        obs = self.obs
        obs_t = torch.as_tensor(obs, device=self.agent.device)
        # The round's env steps run inside training_step, under Lightning's bf16-mixed /
        # 16-mixed autocast: act in float32, as the on-policy rollouts do (their steps run in
        # the dataloader), and numpy takes no bfloat16.
        with full_precision(obs_t):
            actions = self.agent.explore(obs_t).cpu().numpy()
        next_obs, rewards, terminated, truncated, info = self.env.step(
            self.agent.env_actions(actions)
        )
        next_obs = np.asarray(next_obs, dtype=self.memory.obs_dtype)
        self.record_step(next_obs, rewards, info)
        # NEXT_STEP autoreset: the step after a done only resets; it is not a transition.
        # On the done step itself next_obs is the true final observation.
        self.memory.add(obs, actions, rewards, next_obs, terminated, truncated, ~self.prev_done)
        self.prev_done = next_step_resets(terminated, truncated, info)
        self.obs = next_obs

    def __iter__(self) -> Iterator[UpdateRound]:
        per_round = self.cycles_per_round
        for start in range(0, self.cycles_per_epoch, per_round):
            if self.frames >= self.agent.max_frames:
                return
            yield UpdateRound(self, min(per_round, self.cycles_per_epoch - start))
