"""Build the gymnasium vector env an algorithm rolls out, from a typed :class:`EnvSpec`."""

import inspect
from copy import deepcopy
from dataclasses import replace
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import load_env_creator
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers import FrameStackObservation
from gymnasium.wrappers.vector import (
    NormalizeObservation,
    NormalizeReward,
    RecordEpisodeStatistics,
    TransformObservation,
    TransformReward,
)
from loguru import logger

from slm_lightning.envs.atari import LIFE_LOSS, is_atari, make_atari_env
from slm_lightning.envs.blocks import BlockVectorEnv
from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.spec import ENV_KEY, EnvSpec
from slm_lightning.envs.split import BackgroundStep, SplitVectorEnv
from slm_lightning.envs.workers import async_worker, usable_cores
from slm_lightning.errors import ConfigError

# Envs whose step costs microseconds: subprocess workers only add IPC overhead for them.
_CHEAP_ENTRY_POINTS = ("gymnasium.envs.classic_control", "gymnasium.envs.toy_text")


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


def resolve_vectorization(
    spec: EnvSpec, registry_spec: gym.envs.registration.EnvSpec, warn: bool = False
) -> str:
    """The vectorization mode to build ``spec`` with.

    ``auto`` picks the env's native vectorised implementation where it has one, else sync
    or ``blocks`` (see :class:`EnvSpec`). An explicit mode is kept, except
    ``vector_entry_point`` for an env that has none (or with ``frame_stack`` > 1, which it
    cannot wrap): that falls back to auto's choice, so a config written for CartPole still
    runs when pointed at another env from the command line.

    Args:
        spec: the environment spec.
        registry_spec: its registered gymnasium spec.
        warn: log a warning when an explicit mode falls back.
    """
    native = registry_spec.vector_entry_point is not None and spec.frame_stack == 1
    if spec.vectorization == "vector_entry_point" and not native:
        mode = resolve_vectorization(replace(spec, vectorization="auto"), registry_spec)
        if warn:
            why = "no vector_entry_point" if spec.frame_stack == 1 else "frame_stack > 1"
            logger.warning(
                f"{ENV_KEY}.vectorization=vector_entry_point: {spec.env_id} has {why}; "
                f"using {mode} (auto's choice)"
            )
        return mode
    if spec.vectorization != "auto":
        return spec.vectorization
    if native:
        return "vector_entry_point"
    entry = registry_spec.entry_point if isinstance(registry_spec.entry_point, str) else ""
    cheap = entry.startswith(_CHEAP_ENTRY_POINTS)
    # Worker processes pay only when one step is expensive and there are cores to spread the
    # blocks over. Blocks cost ~5-15 us of CPU per frame over sync where async (one process
    # per sub-env) costs ~250 (BipedalWalker, LunarLander, Hopper), so auto never picks async.
    if cheap or usable_cores() < 2 or spec.num_envs < 4:
        return "sync"
    return "blocks"


def check_env_kwargs(
    spec: EnvSpec, registry_spec: gym.envs.registration.EnvSpec, vectorized: bool
) -> None:
    """Raise a :class:`ConfigError` naming the ``env.kwargs`` the env's constructor does not
    take, with the ones it does; constructors with ``**kwargs`` are left to themselves.

    Args:
        spec: the environment spec.
        registry_spec: its registered gymnasium spec.
        vectorized: the env is built through its ``vector_entry_point``.
    """
    entry = registry_spec.vector_entry_point if vectorized else registry_spec.entry_point
    creator = load_env_creator(entry) if isinstance(entry, str) else entry
    try:
        parameters = inspect.signature(creator).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    takes = sorted({p.name for p in parameters} - {"self", "num_envs"})
    accepted = set(takes)
    if not vectorized:  # gym.make's own keywords (max_episode_steps, disable_env_checker …)
        accepted |= set(inspect.signature(gym.make).parameters) - {"id", "kwargs"}
    if unknown := sorted(set(spec.kwargs) - accepted):
        raise ConfigError(
            f"{ENV_KEY}.kwargs: {spec.env_id} does not take {', '.join(unknown)}; "
            f"its constructor takes {', '.join(takes) or 'no arguments'}"
        )


def block_workers(spec: EnvSpec) -> int:
    """Worker processes for ``blocks``: ``spec.num_workers``, else one per core with at least
    two sub-envs each (so a step's pipe round trip is shared by a block, not one env); never
    more than ``num_envs`` (evaluation runs fewer envs than training)."""
    if spec.num_workers is not None:
        return min(spec.num_workers, spec.num_envs)
    return max(1, min(usable_cores(), spec.num_envs // 2))


def make_vector_env(spec: EnvSpec, seed: int | None = None, gamma: float = 0.99) -> VectorEnv:
    """Create, wrap and reset the vector env described by ``spec``.

    Every sub-env autoresets in gymnasium's NEXT_STEP mode: the step after a ``done`` is a
    reset whose transition the rollout masks out (:func:`next_step_resets` says which: an
    Atari life lost with ``episodic_life`` is terminal, but the game goes on). Episode statistics are recorded before
    any normalisation, so reported returns are the raw game returns. With
    ``spec.num_splits`` > 1 the sub-envs come as a :class:`SplitVectorEnv` of equal groups.

    Args:
        spec: the environment spec.
        seed: seed of sub-env 0; sub-env ``i`` gets ``seed + i``.
        gamma: discount used by reward normalisation.
    """
    registry_spec = spec.registry_spec()
    route_mujoco_warnings(registry_spec)
    if spec.num_splits > 1:
        env: VectorEnv = _split_env(spec, registry_spec)
    else:
        env = _recorded_env(spec, registry_spec)
    return _wrap_and_reset(env, spec, seed, gamma)


def _recorded_env(
    spec: EnvSpec,
    registry_spec: gym.envs.registration.EnvSpec,
    background: bool = False,
    log: bool = True,
) -> VectorEnv:
    """The vector env of ``spec`` (registered as ``registry_spec``) recording raw episode
    statistics, before normalisation; with ``background``, a :class:`BackgroundStep` under
    the statistics."""
    if is_atari(spec.name):
        return make_atari_env(spec, registry_spec, background=background, log=log)
    env_id, migration_kwargs = migrate_env_id(spec.name)
    mode = resolve_vectorization(spec, registry_spec, warn=log)
    check_env_kwargs(spec, registry_spec, vectorized=mode == "vector_entry_point")
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
    except TypeError as err:  # a constructor with **kwargs that passes them on
        raise ConfigError(f"{ENV_KEY}.kwargs: {env_id} rejected {sorted(kwargs)}: {err}") from None
    autoreset = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if autoreset != AutoresetMode.NEXT_STEP:
        env.close()
        raise ConfigError(
            f"{ENV_KEY}.name: {env_id} autoresets in {autoreset}; only NEXT_STEP is supported"
        )
    if log:
        workers = f" in {env.num_workers} workers" if isinstance(env, BlockVectorEnv) else ""
        logger.info(f"env {env_id}: {spec.num_envs} envs, vectorization={mode}{workers}")
    return RecordEpisodeStatistics(BackgroundStep(env) if background else env)


def _split_env(spec: EnvSpec, registry_spec: gym.envs.registration.EnvSpec) -> SplitVectorEnv:
    """``spec.num_splits`` equal groups of ``spec``'s sub-envs, each stepping in the
    background (ale-py's threads, ``blocks`` or ``async`` workers; ``blocks`` share the
    workers ``spec`` would have among the groups)."""
    splits = spec.num_splits
    key = f"{ENV_KEY}.num_splits"
    wrapped = [
        name
        for name in ("normalize_obs", "normalize_reward", "clip_obs", "clip_reward")
        if getattr(spec, name) not in (False, None)
    ]
    if wrapped:
        raise ConfigError(
            f"{key}: {splits} steps the groups one by one, and {', '.join(wrapped)} need all "
            "envs at each step; use num_splits 1 with them"
        )
    atari = is_atari(spec.name)
    mode = "ale" if atari else resolve_vectorization(spec, registry_spec)
    if mode not in ("ale", "blocks", "async"):
        raise ConfigError(
            f"{key}: {splits} needs envs that step in the background (an ALE env, or "
            f"vectorization blocks or async); {spec.env_id} runs {mode}"
        )
    size = spec.num_envs // splits
    workers = max(1, block_workers(spec) // splits) if mode == "blocks" else spec.num_workers
    group_spec = replace(
        spec, num_envs=size, num_splits=1, num_workers=workers,
        vectorization=spec.vectorization if atari else mode,
    )  # fmt: skip
    if atari and not spec.atari.num_threads:  # the groups share the cores ale-py would use
        threads = max(1, usable_cores() // splits)
        group_spec = replace(group_spec, atari=replace(spec.atari, num_threads=threads))
    groups: list[VectorEnv] = []
    try:
        for _ in range(splits):
            groups.append(_recorded_env(group_spec, registry_spec, background=True, log=False))
    except BaseException:
        for group in groups:
            group.close()
        raise
    in_workers = f" in {workers} worker{'s' * (workers != 1)}" if mode == "blocks" else ""
    per_group = f"{size} envs{in_workers}"
    logger.info(
        f"env {spec.env_id}: {spec.num_envs} envs in {splits} groups stepped in turn "
        f"({per_group} each, {mode})"
    )
    return SplitVectorEnv(groups)


def next_step_resets(
    terminated: np.ndarray, truncated: np.ndarray, info: dict[str, Any]
) -> np.ndarray:
    """The sub-envs that NEXT_STEP autoreset resets at the next step, which is therefore no
    transition: those whose episode ended at this step, except Atari lives lost with
    ``episodic_life`` (``info[LIFE_LOSS]``), which are terminal for training while the game
    goes on.

    Args:
        terminated, truncated: ``(num_envs,)`` flags of this step.
        info: this step's info.
    """
    done = terminated | truncated
    return done & ~info[LIFE_LOSS] if LIFE_LOSS in info else done


def clip(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` clipped to ``[low, high]``, in their own dtype (numpy would turn uint8
    pixels clipped by float bounds into float64).

    Args:
        values: a batch of observations or rewards.
        low, high: the bounds.
    """
    return np.clip(values, low, high).astype(values.dtype, copy=False)


def _wrap_and_reset(env: VectorEnv, spec: EnvSpec, seed: int | None, gamma: float) -> VectorEnv:
    """Add the normalisers and clipping ``spec`` asks for on top of an env that records raw
    episode statistics, then reset and seed it. Clipping comes after normalisation, as in
    SB3's ``VecNormalize``; gymnasium's vector ``ClipReward`` clips sub-env by sub-env in
    Python, so one vectorised ``np.clip`` goes through ``TransformReward`` instead."""
    if spec.normalize_obs:
        env = NormalizeObservation(env)
    if (obs_bounds := spec.obs_bounds()) is not None:
        env = TransformObservation(env, partial(clip, low=obs_bounds[0], high=obs_bounds[1]))
    if spec.normalize_reward:
        env = NormalizeReward(env, gamma=gamma)
    if (reward_bounds := spec.reward_bounds()) is not None:
        env = TransformReward(env, partial(clip, low=reward_bounds[0], high=reward_bounds[1]))
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
    vectorized = resolve_vectorization(spec, registry_spec) == "vector_entry_point"
    check_env_kwargs(spec, registry_spec, vectorized)
    if vectorized:
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
        raise ConfigError(f"{ENV_KEY}.name: {spec.name} runs only in ale-py's native vector env")
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
