"""The on-policy rollout dataset: roll out the vector env into the algorithm's memory, compute
returns there, and yield the rollout's minibatches to train on."""

from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor

from slm_lightning.data.onpolicy_memory import OnPolicyBatch, OnPolicyMemory, RecurrentBatch
from slm_lightning.data.vector_rollout import EpisodeLog, VectorRollout
from slm_lightning.envs.factory import EnvSpec, next_step_resets
from slm_lightning.envs.split import SplitVectorEnv

__all__ = ["EpisodeLog", "Minibatches", "OnPolicyAgent", "OnPolicyRollout"]

BatchT = TypeVar("BatchT", OnPolicyBatch, RecurrentBatch)


class Minibatches(Generic[BatchT]):
    """One rollout's updates: ``epochs`` passes over its samples, each shuffled and split into
    ``count`` minibatches. What an on-policy ``training_step`` receives; it iterates the
    minibatches and may stop early (PPO's target KL), and the passes not reached are never
    shuffled, so the shuffling generator advances as the training does.

    Args:
        batch: the whole rollout, one row per sample (or per sequence), on the training
            device.
        samples: the rows to train on (valid transitions, or sequences with one).
        epochs: passes over ``samples``.
        count: minibatches per pass.
        rng: the rollout's shuffling generator.
    """

    def __init__(
        self, batch: BatchT, samples: np.ndarray, epochs: int, count: int, rng: np.random.Generator
    ) -> None:
        self.batch, self.samples = batch, samples
        self.epochs, self.count, self.rng = epochs, count, rng
        self.device = batch.obs.device

    def __len__(self) -> int:
        return self.epochs * self.count

    def __iter__(self) -> Iterator[BatchT]:
        batch = self.batch
        for _ in range(self.epochs):
            for chunk in np.array_split(self.rng.permutation(self.samples), self.count):
                index = torch.from_numpy(chunk).to(self.device, non_blocking=True)
                yield batch._make(field[index] for field in batch)


class OnPolicyAgent(Protocol):
    """What the rollout needs from an on-policy algorithm.

    One step interface serves feed-forward and recurrent policies: ``state`` is the flat
    ``(N, state_size)`` hidden state the envs carry into the step (None for a feed-forward
    policy, whose ``initial_state`` is None) and ``episode_starts`` ``(N,)`` marks envs whose
    observation starts an episode (their state is zeroed before use; None without a state).
    """

    device: torch.device
    max_frames: int

    def initial_state(self, num_envs: int) -> Tensor | None: ...
    def act(
        self, obs: Tensor, state: Tensor | None, episode_starts: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]: ...
    def bootstrap_values(
        self, obs: Tensor, state: Tensor | None, episode_starts: Tensor | None
    ) -> Tensor | None: ...
    def env_actions(self, actions: np.ndarray) -> np.ndarray: ...


class OnPolicyRollout(VectorRollout):
    """Each ``iter()`` collects one rollout with the agent's current policy into ``memory``,
    has the memory compute returns and advantages, then yields one :class:`Minibatches`:
    ``training_epochs x num_minibatches`` shuffled minibatches (:class:`OnPolicyBatch`), all
    trained in one Lightning training step (the hooks Lightning runs around a step cost more
    than a small net's minibatch update).

    With a recurrent policy (``sequence_length`` set) the rollout carries the policy's hidden
    state from step to step (across rollouts too), zeroes it where an episode starts, and
    stores the state each step began with; minibatches are then whole sequences of
    ``sequence_length`` steps of one sub-env (:class:`RecurrentBatch`, see
    :meth:`OnPolicyMemory.sequence_batch`), shuffled over sequences, with ``valid`` to mask
    the loss. The hidden state is not checkpointed, on purpose: a resume restarts the envs
    from a reset (see :class:`VectorRollout`), so the states at the checkpoint belong to
    episodes that no longer exist; every env restarts from the zero state with an episode
    start, as in a fresh run.

    Args:
        agent: the algorithm (see :class:`OnPolicyAgent`).
        env_spec: which env to build.
        memory: the algorithm's memory of one rollout, written here; its ``time_horizon``
            is the rollout's length.
        seed: seed of this process's first sub-env and of minibatch shuffling.
        training_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        world_size: processes rolling out in lockstep; the frame clock counts all of them.
        gamma: discount for reward normalisation.
        sequence_length: steps per training sequence of a recurrent policy; must divide the
            memory's time horizon. None: feed-forward.
    """

    def __init__(
        self,
        agent: OnPolicyAgent,
        env_spec: EnvSpec,
        memory: OnPolicyMemory,
        seed: int,
        training_epochs: int,
        num_minibatches: int,
        world_size: int = 1,
        gamma: float = 0.99,
        sequence_length: int | None = None,
    ) -> None:
        super().__init__(env_spec, seed, world_size, gamma)
        time_horizon = memory.time_horizon
        if sequence_length is not None and (sequence_length < 1 or time_horizon % sequence_length):
            raise ValueError(
                f"sequence_length must divide time_horizon {time_horizon}, got {sequence_length}"
            )
        self.sequence_length = sequence_length
        self.agent = agent
        self.memory = memory
        self.time_horizon = time_horizon
        self.training_epochs = training_epochs
        self.num_minibatches = num_minibatches
        self.rollouts = 0
        self.rng = np.random.default_rng(seed)
        # A recurrent policy's hidden state and episode-start flags between vector steps.
        self.policy_state: Tensor | None = None
        self.episode_starts: np.ndarray | None = None

    def __len__(self) -> int:
        # A known length stops Lightning from prefetching a batch, which would roll out
        # the next rollout before this one has been trained on.
        return 1

    def on_env_created(self, env: VectorEnv) -> None:
        # Fresh envs, fresh episodes: every env starts from the zero state (None: feed-forward).
        self.policy_state = self.agent.initial_state(env.num_envs)
        if self.policy_state is not None:
            self.episode_starts = np.ones(env.num_envs, dtype=bool)

    @torch.inference_mode()
    def collect(self) -> None:
        """Roll out ``time_horizon`` vector steps into memory, then compute its returns.

        The envs step group by group (one group unless the env is a :class:`SplitVectorEnv`):
        each step of a group receives the group's last step, stores it, acts on its new
        observations and starts its next step, so that with several groups the policy acts
        on one while the others step in the background. The memory ends up as an unsplit
        rollout's would: column ``i`` holds sub-env ``i``'s steps ``0 … T-1``.
        """
        if self.env is None:
            self.start()
        mem, agent, env, device = self.memory, self.agent, self.env, self.agent.device
        split = env if isinstance(env, SplitVectorEnv) else None
        groups = split.slices if split is not None else [slice(None)]
        obs, prev_done = self.obs, self.prev_done
        state, starts = self.policy_state, self.episode_starts
        recurrent = state is not None
        if recurrent and split is not None:
            state, starts = state.clone(), starts.copy()  # written group by group below
        starts_t = None
        steps: list[Any] = [None] * len(groups)  # each group's step under way (unsplit: done)
        for t in range(self.time_horizon + 1):
            for g, part in enumerate(groups):
                if t > 0:  # the group's step t - 1 (started last time round) comes back
                    step = split.recv(g) if split is not None else steps[g]
                    next_obs, rewards, terminated, truncated, info = step
                    mem.rewards[t - 1, part] = rewards
                    mem.terminated[t - 1, part] = terminated
                    mem.truncated[t - 1, part] = truncated
                    obs[part] = next_obs
                    self.record_step(obs[part], rewards, info, part.start or 0)
                    prev_done[part] = next_step_resets(terminated, truncated, info)
                if t == self.time_horizon:
                    continue
                obs_t = torch.as_tensor(obs[part], device=device)
                state_t = starts_t = None
                if recurrent:
                    mem.states[t, part] = state[part].cpu().numpy()
                    mem.episode_starts[t, part] = starts[part]
                    starts_t = torch.as_tensor(starts[part], device=device)
                    state_t = state[part]
                actions, log_probs, values, next_state = agent.act(obs_t, state_t, starts_t)
                if recurrent:
                    # The next observation starts an episode iff this step is the NEXT_STEP
                    # reset (after acting: starts_t may share starts' memory).
                    starts[part] = prev_done[part]
                    if split is None:
                        state = next_state
                    else:
                        state[part] = next_state
                actions = actions.cpu().numpy()
                mem.obs[t, part] = obs[part]
                mem.actions[t, part] = actions
                mem.log_probs[t, part] = log_probs.cpu().numpy()
                if values is not None:
                    mem.values[t, part] = values.cpu().numpy()
                # NEXT_STEP autoreset: the step after a done only resets; it is not a transition.
                mem.valid[t, part] = ~prev_done[part]
                env_actions = agent.env_actions(actions)
                if split is not None:
                    split.send(g, env_actions)
                else:
                    steps[g] = env.step(env_actions)
        obs_t = torch.as_tensor(obs, device=device)
        if recurrent:
            starts_t = torch.as_tensor(starts, device=device)
            self.policy_state, self.episode_starts = state, starts
        bootstrap = agent.bootstrap_values(obs_t, state, starts_t)
        if bootstrap is not None:
            mem.last_values[:] = bootstrap.cpu().numpy()
        self.obs, self.prev_done = obs, prev_done
        mem.compute_returns()
        self.rollouts += 1

    def __iter__(self) -> Iterator[Minibatches]:
        if self.frames >= self.agent.max_frames:
            return
        # Acting is one small forward pass per vector step, too small to split, while the
        # envs (ale-py's threads, worker processes) want the cores: one torch thread for the
        # rollout, the run's --torch_threads for its minibatch updates.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.collect()
        finally:
            torch.set_num_threads(threads)
        batch: OnPolicyBatch | RecurrentBatch
        if self.sequence_length is None:
            batch = self.memory.flat_batch()
            valid = np.flatnonzero(self.memory.valid.reshape(-1))
        else:
            batch = self.memory.sequence_batch(self.sequence_length)
            valid = np.flatnonzero(batch.valid.any(dim=1).numpy())  # sequences to train on
        # One copy of the rollout to the device; its minibatches are gathered there.
        batch = batch._make(field.to(self.agent.device, non_blocking=True) for field in batch)
        yield Minibatches(batch, valid, self.training_epochs, self.num_minibatches, self.rng)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the rollout count and the minibatch-shuffling generator."""
        return {
            **super().state_dict(),
            "rollouts": self.rollouts,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rollouts = int(state["rollouts"])
        self.rng.bit_generator.state = state["rng"]
