"""Checkpointable state of gymnasium's observation / reward normalisation wrappers."""

from typing import Any

import numpy as np
from gymnasium.vector import VectorEnv
from gymnasium.wrappers.vector import NormalizeObservation, NormalizeReward


def _normalizers(env: VectorEnv) -> dict[str, NormalizeObservation | NormalizeReward]:
    found: dict[str, Any] = {}
    while env is not None:
        if isinstance(env, NormalizeObservation):
            found["obs_rms"] = env
        elif isinstance(env, NormalizeReward):
            found["return_rms"] = env
        env = getattr(env, "env", None)
    return found


def normalizer_state(env: VectorEnv) -> dict[str, dict[str, Any]]:
    """Running mean, variance and count of every normaliser wrapping ``env`` (empty if none)."""
    state = {}
    for key, wrapper in _normalizers(env).items():
        rms = getattr(wrapper, key)
        state[key] = {"mean": np.copy(rms.mean), "var": np.copy(rms.var), "count": float(rms.count)}
    return state


def load_normalizer_state(env: VectorEnv, state: dict[str, dict[str, Any]]) -> None:
    """Restore statistics saved by :func:`normalizer_state` into the wrappers of ``env``."""
    wrappers = _normalizers(env)
    if set(state) != set(wrappers):
        raise ValueError(
            f"checkpoint has normaliser state {sorted(state)} but the env has {sorted(wrappers)}; "
            "model.init_args.env.normalize_obs / normalize_reward must match the checkpointed run"
        )
    for key, saved in state.items():
        rms = getattr(wrappers[key], key)
        rms.mean = np.asarray(saved["mean"], dtype=rms.mean.dtype).copy()
        rms.var = np.asarray(saved["var"], dtype=rms.var.dtype).copy()
        rms.count = saved["count"]


def freeze_normalizers(env: VectorEnv, frozen: bool = True) -> None:
    """Stop (or resume) updating the running statistics, e.g. during evaluation."""
    for wrapper in _normalizers(env).values():
        wrapper.update_running_mean = not frozen
