"""The on-policy rollout dataset: roll out the vector env, fill memory, yield minibatches."""

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor

from slm_lightning.data.onpolicy import OnPolicyMemory
from slm_lightning.data.vector_rollout import EpisodeLog, VectorRollout
from slm_lightning.envs.factory import EnvSpec, next_step_resets

__all__ = ["EpisodeLog", "OnPolicyAgent", "OnPolicyRollout", "RecurrentAgent"]


class OnPolicyAgent(Protocol):
    """What the rollout needs from an on-policy algorithm."""

    device: torch.device
    max_frames: int
    stop_update: bool

    def act(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]: ...
    def bootstrap_values(self, obs: Tensor) -> Tensor | None: ...
    def env_actions(self, actions: np.ndarray) -> np.ndarray: ...
    def compute_returns(self, memory: OnPolicyMemory) -> None: ...


class RecurrentAgent(OnPolicyAgent, Protocol):
    """What the rollout needs on top from an algorithm with a recurrent policy.

    ``state`` is the flat ``(N, state_size)`` hidden state the envs carry into the step and
    ``episode_starts`` ``(N,)`` marks envs whose observation starts an episode (their state
    is zeroed before use).
    """

    def initial_state(self, num_envs: int) -> Tensor | None: ...
    def recurrent_act(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]: ...
    def recurrent_values(
        self, obs: Tensor, state: Tensor, episode_starts: Tensor
    ) -> Tensor | None: ...


class OnPolicyRollout(VectorRollout):
    """Each ``iter()`` collects one rollout with the agent's current policy, computes returns
    and advantages, then yields ``training_epochs x num_minibatches`` shuffled minibatches.

    With a recurrent policy (``sequence_length`` set) the rollout carries the policy's hidden
    state from step to step (across rollouts too), zeroes it where an episode starts, and
    stores the state each step began with; minibatches are then whole sequences of
    ``sequence_length`` steps of one sub-env (see :meth:`OnPolicyMemory.sequence_tensors`),
    shuffled over sequences, with ``valid`` to mask the loss. The hidden state is not
    checkpointed, on purpose: a resume restarts the envs from a reset (see
    :class:`VectorRollout`), so the states at the checkpoint belong to episodes that no longer
    exist; every env restarts from the zero state with an episode start, as in a fresh run.

    Args:
        agent: the algorithm (see :class:`OnPolicyAgent`).
        env_spec: which env to build.
        seed: seed of this process's first sub-env and of minibatch shuffling.
        time_horizon: vector steps per rollout.
        training_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        world_size: processes rolling out in lockstep; the frame clock counts all of them.
        gamma: discount for reward normalisation.
        sequence_length: steps per training sequence of a recurrent policy (the agent is then
            a :class:`RecurrentAgent`); must divide ``time_horizon``. None: feed-forward.
    """

    def __init__(
        self,
        agent: OnPolicyAgent,
        env_spec: EnvSpec,
        seed: int,
        time_horizon: int,
        training_epochs: int,
        num_minibatches: int,
        world_size: int = 1,
        gamma: float = 0.99,
        sequence_length: int | None = None,
    ) -> None:
        super().__init__(env_spec, seed, world_size, gamma)
        if sequence_length is not None and (sequence_length < 1 or time_horizon % sequence_length):
            raise ValueError(
                f"sequence_length must divide time_horizon {time_horizon}, got {sequence_length}"
            )
        self.sequence_length = sequence_length
        self.agent = agent
        self.time_horizon = time_horizon
        self.training_epochs = training_epochs
        self.num_minibatches = num_minibatches
        self.rollouts = 0
        self.rng = np.random.default_rng(seed)
        self.memory: OnPolicyMemory | None = None
        # A recurrent policy's hidden state and episode-start flags between vector steps.
        self.policy_state: Tensor | None = None
        self.episode_starts: np.ndarray | None = None

    def __len__(self) -> int:
        # A known length stops Lightning from prefetching a batch, which would roll out
        # the next rollout before the last minibatch of this one has been trained on.
        return self.training_epochs * self.num_minibatches

    def on_env_created(self, env: VectorEnv) -> None:
        obs_space, act_space = env.single_observation_space, env.single_action_space
        obs_dtype = np.float32 if np.issubdtype(obs_space.dtype, np.floating) else obs_space.dtype
        act_dtype = np.int64 if act_space.shape == () else np.float32
        state_size = 0
        if self.sequence_length is not None:
            # Fresh envs, fresh episodes: every env starts from the zero state.
            self.policy_state = self.agent.initial_state(env.num_envs)
            self.episode_starts = np.ones(env.num_envs, dtype=bool)
            state_size = self.policy_state.shape[-1]
        self.memory = OnPolicyMemory(
            self.time_horizon,
            env.num_envs,
            obs_space.shape,
            obs_dtype,
            act_space.shape,
            act_dtype,
            state_size,
        )

    @torch.inference_mode()
    def collect(self) -> None:
        """Roll out ``time_horizon`` vector steps into memory and compute returns."""
        if self.env is None:
            self.start()
        mem, agent, env = self.memory, self.agent, self.env
        obs, prev_done = self.obs, self.prev_done
        recurrent = self.sequence_length is not None
        state, starts = self.policy_state, self.episode_starts
        for t in range(self.time_horizon):
            obs_t = torch.as_tensor(obs, device=agent.device)
            if recurrent:
                mem.states[t] = state.cpu().numpy()
                mem.episode_starts[t] = starts
                starts_t = torch.as_tensor(starts, device=agent.device)
                actions, log_probs, values, state = agent.recurrent_act(obs_t, state, starts_t)
                # The next observation starts an episode iff this step is the NEXT_STEP reset.
                starts = prev_done
            else:
                actions, log_probs, values = agent.act(obs_t)
            actions = actions.cpu().numpy()
            next_obs, rewards, terminated, truncated, info = env.step(agent.env_actions(actions))
            mem.obs[t] = obs
            mem.actions[t] = actions
            mem.log_probs[t] = log_probs.cpu().numpy()
            if values is not None:
                mem.values[t] = values.cpu().numpy()
            mem.rewards[t] = rewards
            mem.terminated[t] = terminated
            mem.truncated[t] = truncated
            # NEXT_STEP autoreset: the step after a done only resets; it is not a transition.
            mem.valid[t] = ~prev_done
            obs = np.asarray(next_obs, dtype=mem.obs.dtype)
            self.record_step(obs, rewards, info)
            prev_done = next_step_resets(terminated, truncated, info)
        obs_t = torch.as_tensor(obs, device=agent.device)
        if recurrent:
            starts_t = torch.as_tensor(starts, device=agent.device)
            bootstrap = agent.recurrent_values(obs_t, state, starts_t)
            self.policy_state, self.episode_starts = state, starts
        else:
            bootstrap = agent.bootstrap_values(obs_t)
        if bootstrap is not None:
            mem.last_values[:] = bootstrap.cpu().numpy()
        self.obs, self.prev_done = obs, prev_done
        agent.compute_returns(mem)
        self.rollouts += 1

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.frames >= self.agent.max_frames:
            return
        self.agent.stop_update = False
        self.collect()
        if self.sequence_length is None:
            batch = self.memory.flat_tensors()
            valid = np.flatnonzero(self.memory.valid.reshape(-1))
        else:
            batch = self.memory.sequence_tensors(self.sequence_length)
            valid = np.flatnonzero(batch["valid"].any(dim=1).numpy())  # sequences to train on
        for _ in range(self.training_epochs):
            for chunk in np.array_split(self.rng.permutation(valid), self.num_minibatches):
                if self.agent.stop_update:  # e.g. PPO's target_kl early stop
                    return
                index = torch.from_numpy(chunk)
                yield {key: value[index] for key, value in batch.items()}

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
