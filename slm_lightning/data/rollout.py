"""The on-policy rollout dataset: roll out the vector env, fill memory, yield minibatches."""

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor

from slm_lightning.data.onpolicy import OnPolicyMemory
from slm_lightning.data.vector_rollout import EpisodeLog, VectorRollout
from slm_lightning.envs.factory import EnvSpec

__all__ = ["EpisodeLog", "OnPolicyAgent", "OnPolicyRollout"]


class OnPolicyAgent(Protocol):
    """What the rollout needs from an on-policy algorithm."""

    device: torch.device
    max_frames: int
    stop_update: bool

    def act(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]: ...
    def bootstrap_values(self, obs: Tensor) -> Tensor | None: ...
    def env_actions(self, actions: np.ndarray) -> np.ndarray: ...
    def compute_returns(self, memory: OnPolicyMemory) -> None: ...


class OnPolicyRollout(VectorRollout):
    """Each ``iter()`` collects one rollout with the agent's current policy, computes returns
    and advantages, then yields ``training_epochs x num_minibatches`` shuffled minibatches.

    Args:
        agent: the algorithm (see :class:`OnPolicyAgent`).
        env_spec: which env to build.
        seed: seed of this process's first sub-env and of minibatch shuffling.
        time_horizon: vector steps per rollout.
        training_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        world_size: processes rolling out in lockstep; the frame clock counts all of them.
        gamma: discount for reward normalisation.
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
    ) -> None:
        super().__init__(env_spec, seed, world_size, gamma)
        self.agent = agent
        self.time_horizon = time_horizon
        self.training_epochs = training_epochs
        self.num_minibatches = num_minibatches
        self.rollouts = 0
        self.rng = np.random.default_rng(seed)
        self.memory: OnPolicyMemory | None = None

    def __len__(self) -> int:
        # A known length stops Lightning from prefetching a batch, which would roll out
        # the next rollout before the last minibatch of this one has been trained on.
        return self.training_epochs * self.num_minibatches

    def on_env_created(self, env: VectorEnv) -> None:
        obs_space, act_space = env.single_observation_space, env.single_action_space
        obs_dtype = np.float32 if np.issubdtype(obs_space.dtype, np.floating) else obs_space.dtype
        act_dtype = np.int64 if act_space.shape == () else np.float32
        self.memory = OnPolicyMemory(
            self.time_horizon, env.num_envs, obs_space.shape, obs_dtype, act_space.shape, act_dtype
        )

    @torch.inference_mode()
    def collect(self) -> None:
        """Roll out ``time_horizon`` vector steps into memory and compute returns."""
        if self.env is None:
            self.start()
        mem, agent, env = self.memory, self.agent, self.env
        obs, prev_done = self.obs, self.prev_done
        for t in range(self.time_horizon):
            actions, log_probs, values = agent.act(torch.as_tensor(obs, device=agent.device))
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
            self.record_step(obs, info)
            prev_done = terminated | truncated
        bootstrap = agent.bootstrap_values(torch.as_tensor(obs, device=agent.device))
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
        batch = self.memory.flat_tensors()
        valid = np.flatnonzero(self.memory.valid.reshape(-1))
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
