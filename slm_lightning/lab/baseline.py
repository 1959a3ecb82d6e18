"""The random baseline R_rand of an env: the mean return of uniformly random actions, which
SLM Lab's strength subtracts from a session's returns (s_i = R_i - R_rand).

Where a value comes from, in order (:func:`random_return`):

1. ``random_baselines.json`` next to this module, shipped with the package for the envs of our
   configs (written by ``benchmarks/random_baselines.py``), so a trial never waits minutes on
   an Atari baseline;
2. the user's cache, ``random_baselines.json`` in ``platformdirs.user_cache_dir("slm_lightning")``
   (or in ``$SLM_LAB_CACHE``);
3. a measurement (:func:`measure_random_return`) through the training env factory, written to
   that cache.

Values are looked up by :func:`baseline_key`: the env id and the settings that change what a
random agent scores, and nothing else (the number of envs, vectorization and normalisers do not).
"""

import json
import math
import os
import tempfile
from dataclasses import replace
from datetime import date
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
from loguru import logger

from slm_lightning.envs.atari import is_atari
from slm_lightning.envs.factory import make_vector_env, resolve_vectorization
from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.spec import EnvSpec
from slm_lightning.errors import ConfigError

# Episodes of a measurement (SLM Lab's and the figure) and the sub-envs playing them.
EPISODES = 100
MEASURE_ENVS = 10
BASELINES_FILE = "random_baselines.json"
# The environment variable naming the folder of the user's cache instead of platformdirs'.
CACHE_ENV_VAR = "SLM_LAB_CACHE"
# AtariSpec fields that change the game a random agent plays. Not stack_num (observations
# only), num_threads (speed), reward_clipping (reported returns are raw scores) or
# episodic_life (reported episodes still end at game over: envs/atari.py:AtariGameEpisodes).
_ATARI_GAME_FIELDS = ("repeat_action_probability", "full_action_space", "frameskip", "noop_max")


def baseline_key(spec: EnvSpec) -> str:
    """The key of ``spec``'s random baseline: canonical JSON (sorted keys) of the migrated env
    id, the constructor kwargs (the migration's included: ``LunarLanderContinuous-v2`` is
    ``LunarLander-v3`` with ``continuous=True``), the time limit (the registered one when
    ``max_episode_steps`` is not set) and, for ``ALE/`` ids, the Atari settings that change
    the game. ``num_envs``, vectorization, workers, normalisers and frame stacking are left
    out: episode statistics are recorded on raw rewards (envs/factory.py:make_vector_env).

    Args:
        spec: the environment spec.
    """
    env_id, migration = migrate_env_id(spec.name)
    settings: dict[str, Any] = {
        "env": env_id,
        "max_episode_steps": spec.max_episode_steps or spec.registry_spec().max_episode_steps,
    }
    if is_atari(env_id):
        # A legacy XNoFrameskip-v4 id overrides the sticky actions and action set, as in
        # envs/atari.py:_native_kwargs.
        atari = {field: getattr(spec.atari, field) for field in _ATARI_GAME_FIELDS}
        settings["atari"] = {**atari, **migration}
        settings["kwargs"] = dict(spec.kwargs)
    else:
        settings["kwargs"] = {**migration, **spec.kwargs}
    # repr for a kwarg JSON cannot write (a Python caller's object): a key that may miss the
    # cache, never a crash.
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=repr)


def measure_random_return(
    spec: EnvSpec, episodes: int = EPISODES, seed: int = 0, num_envs: int = MEASURE_ENVS
) -> float:
    """The mean return of ``episodes`` episodes of uniformly random actions on ``spec``'s env.

    The env comes from :func:`~slm_lightning.envs.factory.make_vector_env`, so the time limit,
    Atari preprocessing and the reported (raw) returns are training's; normalisers and frame
    stacking are off and the env is vectorised in-process (natively where gymnasium has a
    vector env, else sync). Actions are ``env.action_space.sample()`` seeded with ``seed``:
    ``RandomAgent``'s distribution on Discrete and bounded Box spaces.

    Every sub-env contributes its first episodes, ``episodes // num_envs`` each and one more
    for the first ``episodes % num_envs``: taking the first episodes to finish across the
    sub-envs would over-sample short episodes and bias the mean down.

    Args:
        spec: the environment spec.
        episodes: episodes to average.
        seed: seed of sub-env 0 (sub-env ``i`` gets ``seed + i``) and of the actions.
        num_envs: sub-envs playing them (at most ``episodes``).
    """
    if episodes < 1 or num_envs < 1:
        raise ConfigError(f"episodes and num_envs must be >= 1, got {episodes} and {num_envs}")
    num_envs = min(num_envs, episodes)
    measured = replace(
        spec,
        num_envs=num_envs,
        vectorization="auto",
        num_workers=None,
        num_splits=1,
        normalize_obs=False,
        normalize_reward=False,
        frame_stack=1,
    )
    native = resolve_vectorization(measured, spec.registry_spec()) == "vector_entry_point"
    measured = replace(measured, vectorization="vector_entry_point" if native else "sync")
    quota = np.full(num_envs, episodes // num_envs)
    quota[: episodes % num_envs] += 1
    returns: list[list[float]] = [[] for _ in range(num_envs)]
    env = make_vector_env(measured, seed=seed)
    try:
        while any(len(r) < q for r, q in zip(returns, quota, strict=True)):
            *_, info = env.step(env.action_space.sample())
            if "_episode" in info:
                for i in np.flatnonzero(info["_episode"]):
                    if len(returns[i]) < quota[i]:
                        returns[i].append(float(info["episode"]["r"][i]))
    finally:
        env.close()
    return float(np.mean([r for env_returns in returns for r in env_returns]))


def random_return(spec: EnvSpec, *, measure: bool = True) -> float:
    """R_rand of ``spec``'s env: the shipped value, else the user's cached one, else measured
    once over :data:`EPISODES` episodes and cached.

    Args:
        spec: the environment spec.
        measure: measure a value neither shipped nor cached; if False, return NaN instead.
    """
    key = baseline_key(spec)
    if key in shipped_baselines():
        return shipped_baselines()[key]["return"]
    path = cache_path()
    if key in read_baselines(path):
        return read_baselines(path)[key]["return"]
    if not measure:
        return math.nan
    logger.info(
        f"random baseline of {spec.env_id}: measuring {EPISODES} episodes of random actions "
        f"(cached in {path})"
    )
    value = measure_random_return(spec, EPISODES)
    entry = {"env": spec.env_id, "return": value, "episodes": EPISODES, "measured": today()}
    try:
        write_baselines(path, {key: entry})
    except OSError as err:  # a read-only cache costs a measurement next time, not the trial
        logger.warning(f"random baseline of {spec.env_id} not cached in {path}: {err}")
    return value


def today() -> str:
    """The date a value is measured, as the baselines files record it (ISO ``YYYY-MM-DD``)."""
    return date.today().isoformat()


def cache_path() -> Path:
    """The user's cache of measured baselines: ``$SLM_LAB_CACHE/random_baselines.json``, else
    in ``platformdirs.user_cache_dir("slm_lightning")``."""
    folder = os.environ.get(CACHE_ENV_VAR) or platformdirs.user_cache_dir("slm_lightning")
    return Path(folder) / BASELINES_FILE


@cache
def shipped_baselines() -> dict[str, dict[str, Any]]:
    """The baselines shipped with the package, by key (read once)."""
    shipped = resources.files("slm_lightning.lab") / BASELINES_FILE
    return _parse(shipped.read_text(), str(shipped)) if shipped.is_file() else {}


def read_baselines(path: Path, warn: bool = True) -> dict[str, dict[str, Any]]:
    """The baselines of a file by key; an absent file is empty, and so is an unreadable one,
    with one warning (it is rewritten by the next measurement).

    Args:
        path: a ``random_baselines.json``.
        warn: log the warning for an unreadable file.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        if warn:
            logger.warning(f"random baselines cache {path} unreadable ({err}); ignoring it")
        return {}
    return _parse(text, str(path), warn)


def _parse(text: str, where: str, warn: bool = True) -> dict[str, dict[str, Any]]:
    """Entries ``key -> {"env", "return", "episodes", "measured"}`` with a finite numeric
    return; anything else in the file is dropped (all of it if the file is not such a dict)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        data, reason = None, f"not JSON: {err}"
    else:
        reason = "not an object of baselines by key"
    if not isinstance(data, dict):
        if warn:
            logger.warning(f"random baselines cache {where} is {reason}; ignoring it")
        return {}
    return {
        key: {**entry, "return": float(entry["return"])}
        for key, entry in data.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("return"), int | float)
        and math.isfinite(entry["return"])
    }


def write_baselines(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Add ``entries`` to the baselines file ``path`` atomically.

    The file is re-read just before writing, so values another process wrote meanwhile (two
    trials measuring at once) are kept, and replaced in one ``os.replace``, so a reader never
    sees half a file. Two writers within the same few microseconds can still lose one value,
    which costs a measurement next time.

    Args:
        path: a ``random_baselines.json`` (its folder is created).
        entries: baselines by key (:func:`baseline_key`), each ``{"env", "return",
            "episodes", "measured"}``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_baselines(path, warn=False), **entries}
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as file:
        json.dump(merged, file, indent=2, sort_keys=True)
        file.write("\n")
    try:
        os.replace(file.name, path)
    except OSError:
        os.unlink(file.name)
        raise
