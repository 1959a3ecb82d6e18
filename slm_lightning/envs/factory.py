"""Build the gymnasium vector env an algorithm rolls out, from a typed :class:`EnvSpec`."""

import os
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import gymnasium as gym
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers import FrameStackObservation
from gymnasium.wrappers.vector import NormalizeObservation, NormalizeReward, RecordEpisodeStatistics
from loguru import logger

from slm_lightning.envs.atari import AtariSpec, is_atari, make_atari_env
from slm_lightning.envs.blocks import BlockVectorEnv
from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.workers import async_worker

Vectorization = Literal["auto", "sync", "async", "blocks", "vector_entry_point"]

# Envs whose step costs microseconds: subprocess workers only add IPC overhead for them.
_CHEAP_ENTRY_POINTS = ("gymnasium.envs.classic_control", "gymnasium.envs.toy_text")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


@dataclass
class EnvSpec:
    """Which environment to roll out, how many copies, and how to wrap them.

    Args:
        name: gymnasium id (``CartPole-v1``, ``ALE/Pong-v5`` …); legacy ids are migrated.
        num_envs: parallel copies per process (per rank under DDP).
        vectorization: ``auto`` uses the env's native vectorised implementation when it
            has one, else sync for cheap envs, few envs or one core, else ``blocks``: one
            worker process per core, each stepping a contiguous block of sub-envs
            (:class:`~slm_lightning.envs.blocks.BlockVectorEnv`). ``async`` is gymnasium's
            one process per sub-env.
        num_workers: worker processes for ``blocks`` (at most ``num_envs``); default: the
            CPU cores, at most ``num_envs // 2``.
        max_episode_steps: override the registered time limit (episodes are truncated there).
        normalize_obs: running mean/std observation normalisation (statistics checkpointed).
        normalize_reward: scale rewards by the running std of the discounted return.
        frame_stack: stack the last N observations (gymnasium's FrameStackObservation,
            zero-padded after a reset); 1 disables it.
        kwargs: extra keyword arguments for the env constructor.
        atari: ale-py vector env options (sticky actions, episodic life, frame skip, stack
            size, threads …), used only for ``ALE/...`` ids, which always run in ale-py's
            native vector env; see :class:`~slm_lightning.envs.atari.AtariSpec`.
    """

    name: str = "CartPole-v1"
    num_envs: int = 8
    vectorization: Vectorization = "auto"
    num_workers: int | None = None
    max_episode_steps: int | None = None
    normalize_obs: bool = False
    normalize_reward: bool = False
    frame_stack: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)
    atari: AtariSpec = field(default_factory=AtariSpec)

    def __post_init__(self) -> None:
        if self.num_envs < 1:
            raise ConfigError(f"env.num_envs must be >= 1, got {self.num_envs}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"env.num_workers must be >= 1, got {self.num_workers}")
        if self.frame_stack < 1:
            raise ConfigError(f"env.frame_stack must be >= 1, got {self.frame_stack}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError(f"env.max_episode_steps must be >= 1, got {self.max_episode_steps}")

    @property
    def env_id(self) -> str:
        """The gymnasium id after legacy-name migration."""
        return migrate_env_id(self.name)[0]

    def registry_spec(self) -> gym.envs.registration.EnvSpec:
        """The registered gymnasium spec; a :class:`ConfigError` naming close matches if unknown."""
        env_id = self.env_id
        if env_id.startswith("ALE/"):
            import ale_py

            gym.register_envs(ale_py)
        try:
            return gym.spec(env_id)
        except gym.error.Error as err:  # NameNotFound / VersionNotFound / NamespaceNotFound
            raise ConfigError(f"env.name: {err}".replace("\n", " ")) from None

    def reward_threshold(self) -> float | None:
        """The return at which gymnasium considers the task solved, if it defines one."""
        return self.registry_spec().reward_threshold


def route_mujoco_warnings(registry_spec: gym.envs.registration.EnvSpec) -> None:
    """Send MuJoCo's compiler warnings to the log instead of a ``MUJOCO_LOG.TXT`` that MuJoCo
    would otherwise write into the working directory (e.g. HalfCheetah-v5's deprecated
    ``settotalmass``). Fork-started workers inherit the handler."""
    entry = registry_spec.entry_point if isinstance(registry_spec.entry_point, str) else ""
    if not entry.startswith("gymnasium.envs.mujoco"):
        return
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(lambda message: logger.debug(f"MuJoCo: {message}"))


def resolve_vectorization(spec: EnvSpec, registry_spec: gym.envs.registration.EnvSpec) -> str:
    """Pick the vectorization mode for ``auto`` (explicit modes are returned unchanged)."""
    if spec.vectorization != "auto":
        return spec.vectorization
    if registry_spec.vector_entry_point is not None and spec.frame_stack == 1:
        return "vector_entry_point"
    entry = registry_spec.entry_point if isinstance(registry_spec.entry_point, str) else ""
    cheap = entry.startswith(_CHEAP_ENTRY_POINTS)
    # Worker processes pay only when one step is expensive and there are cores to spread the
    # blocks over. Blocks cost ~5-15 us of CPU per frame over sync where async (one process
    # per sub-env) costs ~250 (BipedalWalker, LunarLander, Hopper), so auto never picks async.
    if cheap or (os.cpu_count() or 1) < 2 or spec.num_envs < 4:
        return "sync"
    return "blocks"


def block_workers(spec: EnvSpec) -> int:
    """Worker processes for ``blocks``: ``spec.num_workers``, else one per core with at least
    two sub-envs each (so a step's pipe round trip is shared by a block, not one env); never
    more than ``num_envs`` (evaluation runs fewer envs than training)."""
    if spec.num_workers is not None:
        return min(spec.num_workers, spec.num_envs)
    return max(1, min(os.cpu_count() or 1, spec.num_envs // 2))


def make_vector_env(spec: EnvSpec, seed: int | None = None, gamma: float = 0.99) -> VectorEnv:
    """Create, wrap and reset the vector env described by ``spec``.

    Every sub-env autoresets in gymnasium's NEXT_STEP mode: the step after a ``done`` is a
    reset whose transition the rollout masks out. Episode statistics are recorded before
    any normalisation, so reported returns are the raw game returns.

    Args:
        spec: the environment spec.
        seed: seed of sub-env 0; sub-env ``i`` gets ``seed + i``.
        gamma: discount used by reward normalisation.
    """
    registry_spec = spec.registry_spec()
    route_mujoco_warnings(registry_spec)
    if is_atari(spec.name):
        return _wrap_and_reset(make_atari_env(spec, registry_spec), spec, seed, gamma)
    env_id, migration_kwargs = migrate_env_id(spec.name)
    mode = resolve_vectorization(spec, registry_spec)
    if mode == "vector_entry_point" and registry_spec.vector_entry_point is None:
        raise ConfigError(
            f"env.vectorization: {env_id} has no vector_entry_point; use auto, sync or async"
        )
    if mode == "vector_entry_point" and spec.frame_stack > 1:
        raise ConfigError(
            "env.frame_stack needs vectorization sync, async or auto, not vector_entry_point"
        )
    wrappers = (
        []
        if spec.frame_stack == 1
        else [partial(FrameStackObservation, stack_size=spec.frame_stack)]
    )
    kwargs = {**migration_kwargs, **spec.kwargs}
    if spec.max_episode_steps is not None:
        kwargs["max_episode_steps"] = spec.max_episode_steps
    vector_kwargs = (
        {} if mode == "vector_entry_point" else {"autoreset_mode": AutoresetMode.NEXT_STEP}
    )
    if mode == "async":
        vector_kwargs["worker"] = async_worker  # workers leave SIGINT / SIGTERM to the trainer
    try:
        if mode == "blocks":
            env = BlockVectorEnv(
                [partial(make_single_env, spec)] * spec.num_envs, num_workers=block_workers(spec)
            )
            env.spec = deepcopy(registry_spec)
            env.spec.kwargs = {**env.spec.kwargs, **kwargs}
        else:
            env = gym.make_vec(
                env_id,
                spec.num_envs,
                vectorization_mode=mode,
                vector_kwargs=vector_kwargs,
                wrappers=wrappers or None,
                **kwargs,
            )
    except TypeError as err:
        raise ConfigError(f"env.kwargs: {env_id} rejected {sorted(kwargs)}: {err}") from None
    autoreset = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if autoreset != AutoresetMode.NEXT_STEP:
        raise ConfigError(
            f"env.name: {env_id} autoresets in {autoreset}; only NEXT_STEP is supported"
        )
    workers = f" in {env.num_workers} workers" if isinstance(env, BlockVectorEnv) else ""
    logger.info(f"env {env_id}: {spec.num_envs} envs, vectorization={mode}{workers}")
    return _wrap_and_reset(RecordEpisodeStatistics(env), spec, seed, gamma)


def _wrap_and_reset(env: VectorEnv, spec: EnvSpec, seed: int | None, gamma: float) -> VectorEnv:
    """Add the normalisers ``spec`` asks for on top of an env that records raw episode
    statistics, then reset and seed it."""
    if spec.normalize_obs:
        env = NormalizeObservation(env)
    if spec.normalize_reward:
        env = NormalizeReward(env, gamma=gamma)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def probe_spaces(spec: EnvSpec) -> tuple[gym.Space, gym.Space]:
    """The single-env observation and action spaces of ``spec``, read off a throwaway env."""
    registry_spec = spec.registry_spec()
    route_mujoco_warnings(registry_spec)
    if is_atari(spec.name):
        env = make_atari_env(spec, registry_spec, num_envs=1)
        spaces = env.single_observation_space, env.single_action_space
        env.close()
        return spaces
    env_id, migration_kwargs = migrate_env_id(spec.name)
    kwargs = {**migration_kwargs, **spec.kwargs}
    if resolve_vectorization(spec, registry_spec) == "vector_entry_point":
        if registry_spec.vector_entry_point is None:
            raise ConfigError(
                f"env.vectorization: {env_id} has no vector_entry_point; use auto, sync or async"
            )
        env = gym.make_vec(env_id, 1, vectorization_mode="vector_entry_point", **kwargs)
        spaces = env.single_observation_space, env.single_action_space
    else:
        env = make_single_env(spec)
        spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def make_single_env(spec: EnvSpec) -> gym.Env:
    """One sub-env of ``spec`` as the sync and async vector envs build each of theirs
    (migrated id, constructor kwargs, time limit, frame stacking), unseeded and not reset.
    Not for ``ALE/...`` ids, which only run in ale-py's native vector env."""
    if is_atari(spec.name):
        raise ConfigError(f"env.name: {spec.name} runs only in ale-py's native vector env")
    registry_spec = spec.registry_spec()
    route_mujoco_warnings(registry_spec)
    env_id, migration_kwargs = migrate_env_id(spec.name)
    kwargs = {**migration_kwargs, **spec.kwargs}
    if spec.max_episode_steps is not None:
        kwargs["max_episode_steps"] = spec.max_episode_steps
    env = gym.make(env_id, **kwargs)
    if spec.frame_stack > 1:
        env = FrameStackObservation(env, stack_size=spec.frame_stack)
    return env
