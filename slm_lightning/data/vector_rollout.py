"""What every rollout dataset shares: the vector env, its current observations, the frame
clock, finished episodes, and the state a resume needs."""

import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch.utils.data import IterableDataset

from slm_lightning.envs.factory import EnvSpec, make_vector_env
from slm_lightning.envs.normalization import load_normalizer_state, normalizer_state


class FinishedEpisodes(NamedTuple):
    """Episodes as parallel lists: the frame clock when each ended, its return and length."""

    end_frames: list[int]
    returns: list[float]
    lengths: list[int]


class EpisodeLog:
    """Episodes finished since the last :meth:`drain`, as parallel lists."""

    def __init__(self) -> None:
        self.end_frames: list[int] = []
        self.returns: list[float] = []
        self.lengths: list[int] = []

    def add(self, end_frame: int, returns: np.ndarray, lengths: np.ndarray) -> None:
        """Log episodes that ended together.

        Args:
            end_frame: the frame clock after the vector step that ended them.
            returns: their returns.
            lengths: their lengths in steps.
        """
        self.end_frames.extend([end_frame] * len(returns))
        self.returns.extend(returns.tolist())
        self.lengths.extend(lengths.tolist())

    def drain(self) -> FinishedEpisodes:
        """The episodes logged since the last call; the log starts over."""
        out = FinishedEpisodes(self.end_frames, self.returns, self.lengths)
        self.end_frames, self.returns, self.lengths = [], [], []
        return out


class VectorRollout(IterableDataset):
    """Base of the on- and off-policy rollout datasets.

    Lightning calls ``iter()`` once per epoch, so everything that outlives one epoch (envs,
    current observations, the frame clock, RNGs) lives on this object. The envs are built
    lazily on the first ``iter()`` and rebuilt from a fresh reset after
    :meth:`load_state_dict`: env internals cannot be checkpointed, so a resumed run starts
    new episodes, seeded ``seed + frames`` so they differ from the first run's.

    Subclasses provide ``memory`` (with an ``obs_dtype`` attribute or an ``obs`` array whose
    dtype the observations are stored in) by the end of :meth:`on_env_created`.

    Args:
        env_spec: which env to build.
        seed: seed of this process's first sub-env.
        world_size: processes rolling out in lockstep; the frame clock counts all of them.
        gamma: discount for reward normalisation.
    """

    memory: Any

    def __init__(
        self, env_spec: EnvSpec, seed: int, world_size: int = 1, gamma: float = 0.99
    ) -> None:
        super().__init__()
        self.env_spec = env_spec
        self.seed = seed
        self.world_size = world_size
        self.gamma = gamma
        self.frames = 0
        self.episodes = EpisodeLog()
        self.env: VectorEnv | None = None
        self.obs: np.ndarray | None = None
        # Sub-envs whose last step ended the env's episode: NEXT_STEP autoreset resets them
        # at the next step, which is no transition (see envs.factory.next_step_resets).
        self.prev_done: np.ndarray | None = None
        self._saved_normalizers: dict | None = None

    def on_env_created(self, env: VectorEnv) -> None:
        """Hook: the env exists (normalisers restored) and is about to be reset."""

    def restore_normalizers(self, state: dict | None) -> None:
        """Normaliser statistics the envs start from when they are next built (a warm
        start's; a resume restores them with :meth:`load_state_dict`).

        Args:
            state: :func:`~slm_lightning.envs.normalization.normalizer_state` of another run.
        """
        self._saved_normalizers = state

    def start(self) -> None:
        """Build, seed and reset the envs (on first use and after a resume)."""
        seed = self.seed + self.frames
        self.env = make_vector_env(self.env_spec, seed=seed, gamma=self.gamma)
        if self._saved_normalizers is not None:
            load_normalizer_state(self.env, self._saved_normalizers)
        self.on_env_created(self.env)
        obs, _ = self.env.reset(seed=seed)
        # The dtype observations are stored in (a frame replay stores frame serial numbers).
        memory = self.memory
        obs_dtype = memory.obs_dtype if hasattr(memory, "obs_dtype") else memory.obs.dtype
        self.obs = np.array(obs, dtype=obs_dtype)  # owned: on-policy rollouts write into it
        self.prev_done = np.zeros(self.env.num_envs, dtype=bool)

    def record_step(
        self, next_obs: np.ndarray, rewards: np.ndarray, info: dict[str, Any], first_env: int = 0
    ) -> None:
        """Advance the frame clock by one step of the envs that stepped (all of them, or a
        group of a split env), log finished episodes, and stop on a non-finite observation
        or reward with the sub-env that produced it.

        Args:
            next_obs: the step's observations, ``(envs stepped, *obs_shape)``.
            rewards: the step's rewards, ``(envs stepped,)``.
            info: the info dict of the envs stepped.
            first_env: the index of the first env stepped (a group's first sub-env).
        """
        self.frames += len(rewards) * self.world_size
        if "_episode" in info:
            done = info["_episode"]
            self.episodes.add(self.frames, info["episode"]["r"][done], info["episode"]["l"][done])
        # A NaN that reached the returns would reach the weights, and from there every later
        # action (torch's "probability tensor contains either inf, nan or element < 0").
        self._check_finite(next_obs, "observation", first_env)
        self._check_finite(np.asarray(rewards), "reward", first_env)

    def _check_finite(self, values: np.ndarray, what: str, first_env: int = 0) -> None:
        if not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all():
            return
        bad = np.argwhere(~np.isfinite(values.reshape(len(values), -1)))
        env_index = first_env + int(bad[0][0])
        raise FloatingPointError(
            f"env {self.env_spec.name} (sub-env {env_index}) returned a non-finite {what} "
            f"at frame {self.frames}"
        )

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def state_dict(self) -> dict[str, Any]:
        """Frame clock, RNG states and normaliser statistics.

        The global torch / numpy / python RNGs drive action sampling and exploration;
        Lightning does not checkpoint them, so they are saved here with the clock.
        """
        return {
            "frames": self.frames,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "normalizers": normalizer_state(self.env)
            if self.env is not None
            else self._saved_normalizers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frames = int(state["frames"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        # None: saved before the first rollout built the env, so there is nothing to restore.
        self._saved_normalizers = state["normalizers"]
        self.close()  # envs restart from a fresh reset at the restored clock


class RolloutBatches:
    """What ``train_dataloader`` hands Lightning: the rollout's batches and their count, but
    not its ``state_dict``.

    Lightning 2.6 checkpoints any train dataloader that has ``state_dict`` and
    ``load_state_dict`` under its private ``loops.fit_loop.state_dict.combined_loader``
    (``lightning/pytorch/utilities/combined_loader.py::_state_dicts``) and restores it only on
    a mid-epoch resume. The algorithm saves the rollout's state under ``checkpoint["rollout"]``
    itself and restores it on every resume, so Lightning must not see it.

    Args:
        rollout: the algorithm's rollout dataset.
    """

    def __init__(self, rollout: VectorRollout) -> None:
        self.rollout = rollout

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rollout)

    def __len__(self) -> int:
        return len(self.rollout)
