"""The on-policy rollout dataset: roll out the vector env, fill memory, yield minibatches."""

import random
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor
from torch.utils.data import IterableDataset

from slm_lightning.data.onpolicy import OnPolicyMemory
from slm_lightning.envs.factory import EnvSpec, make_vector_env
from slm_lightning.envs.normalization import load_normalizer_state, normalizer_state


class OnPolicyAgent(Protocol):
    """What the rollout needs from an on-policy algorithm."""

    device: torch.device
    max_frames: int
    stop_update: bool

    def act(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]: ...
    def bootstrap_values(self, obs: Tensor) -> Tensor | None: ...
    def env_actions(self, actions: np.ndarray) -> np.ndarray: ...
    def compute_returns(self, memory: OnPolicyMemory) -> None: ...


class EpisodeLog:
    """Episodes finished since the last :meth:`drain`, as parallel lists."""

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.returns: list[float] = []
        self.lengths: list[int] = []

    def add(self, frames: int, returns: np.ndarray, lengths: np.ndarray) -> None:
        self.frames.extend([frames] * len(returns))
        self.returns.extend(returns.tolist())
        self.lengths.extend(lengths.tolist())

    def drain(self) -> tuple[list[int], list[float], list[int]]:
        out = self.frames, self.returns, self.lengths
        self.frames, self.returns, self.lengths = [], [], []
        return out


class OnPolicyRollout(IterableDataset):
    """Each ``iter()`` collects one rollout with the agent's current policy, computes returns
    and advantages, then yields ``training_epochs x num_minibatches`` shuffled minibatches.

    Lightning calls ``iter()`` once per epoch, so everything that lasts longer than one
    rollout (envs, current observations, the frame clock, RNGs) lives on this object, and
    :meth:`state_dict` puts what must survive a resume into the checkpoint.

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
        super().__init__()
        self.agent = agent
        self.env_spec = env_spec
        self.seed = seed
        self.time_horizon = time_horizon
        self.training_epochs = training_epochs
        self.num_minibatches = num_minibatches
        self.world_size = world_size
        self.gamma = gamma
        self.frames = 0
        self.rollouts = 0
        self.episodes = EpisodeLog()
        self.rng = np.random.default_rng(seed)
        self.env: VectorEnv | None = None
        self.memory: OnPolicyMemory | None = None
        self.obs: np.ndarray | None = None
        self.prev_done: np.ndarray | None = None
        self._saved_normalizers: dict | None = None
        self.explained_variance = float("nan")

    def __len__(self) -> int:
        # A known length stops Lightning from prefetching a batch, which would roll out
        # the next rollout before the last minibatch of this one has been trained on.
        return self.training_epochs * self.num_minibatches

    def _start(self) -> None:
        # After a resume, a different env seed avoids replaying the first run's episodes.
        seed = self.seed + self.frames
        self.env = make_vector_env(self.env_spec, seed=seed, gamma=self.gamma)
        if self._saved_normalizers is not None:
            load_normalizer_state(self.env, self._saved_normalizers)
        obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        obs_dtype = np.float32 if np.issubdtype(obs_space.dtype, np.floating) else obs_space.dtype
        act_dtype = np.int64 if act_space.shape == () else np.float32
        n = self.env.num_envs
        self.memory = OnPolicyMemory(
            self.time_horizon, n, obs_space.shape, obs_dtype, act_space.shape, act_dtype
        )
        obs, _ = self.env.reset(seed=seed)
        self.obs = np.asarray(obs, dtype=obs_dtype)
        self.prev_done = np.zeros(n, dtype=bool)

    @torch.inference_mode()
    def collect(self) -> None:
        """Roll out ``time_horizon`` vector steps into memory and compute returns."""
        if self.env is None:
            self._start()
        mem, agent, env = self.memory, self.agent, self.env
        obs, prev_done = self.obs, self.prev_done
        frames_per_step = env.num_envs * self.world_size
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
            mem.valid[t] = ~prev_done
            self.frames += frames_per_step
            if "_episode" in info:
                done = info["_episode"]
                self.episodes.add(
                    self.frames, info["episode"]["r"][done], info["episode"]["l"][done]
                )
            prev_done = terminated | truncated
            obs = np.asarray(next_obs, dtype=mem.obs.dtype)
        bootstrap = agent.bootstrap_values(torch.as_tensor(obs, device=agent.device))
        if bootstrap is not None:
            mem.last_values[:] = bootstrap.cpu().numpy()
        self.obs, self.prev_done = obs, prev_done
        if np.issubdtype(mem.obs.dtype, np.floating) and not np.isfinite(mem.obs).all():
            env_index = int(np.argwhere(~np.isfinite(mem.obs))[0][1])
            raise FloatingPointError(
                f"env {self.env_spec.name} (sub-env {env_index}) returned a non-finite observation "
                f"before frame {self.frames}"
            )
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

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def state_dict(self) -> dict[str, Any]:
        """Frame clock, RNG states and normaliser statistics: what a resume needs.

        The global torch / numpy / python RNGs drive action sampling and weight init;
        Lightning does not checkpoint them, so they are saved here with the clock.
        """
        return {
            "frames": self.frames,
            "rollouts": self.rollouts,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "normalizers": normalizer_state(self.env)
            if self.env is not None
            else self._saved_normalizers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frames = int(state["frames"])
        self.rollouts = int(state["rollouts"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        # None: saved before the first rollout built the env, so there is nothing to restore.
        self._saved_normalizers = state["normalizers"]
        if self.env is not None:  # envs restart from a fresh reset at the restored clock
            self.close()
