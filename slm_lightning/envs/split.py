"""Double-buffered stepping: a vector env split into groups that step in the background in
turn, so the policy acts on one group while the others' envs step.

A rollout that acts on all ``num_envs`` observations and then steps all envs leaves the
env threads or workers idle while the policy runs, and the policy idle while they step.
With ``num_splits`` groups (Sample Factory's "double-buffered sampling", EnvPool's async
mode with fixed groups) the rollout acts on group 0 and starts its step, acts on group 1
while group 0 steps, and so on: acting and stepping overlap. Every group keeps its own
sub-envs, seeds and trajectories, and the policy is the same for the whole rollout, so the
data are those of an unsplit rollout. Actions are sampled group after group; torch 2.12's
CPU ``multinomial`` then draws the same random numbers in the same order as for all envs at
once (``ppo_pong`` split and unsplit: identical losses and returns over 300k frames).

:class:`SplitVectorEnv` holds the groups; each group is a full wrapper stack (episode
statistics, Atari game scores) over a :class:`BackgroundStep` adapter on the envs that step
in the background: ale-py's native vector env (``send`` / ``recv``), gymnasium's
``AsyncVectorEnv`` and our :class:`~slm_lightning.envs.blocks.BlockVectorEnv`
(``step_async`` / ``step_wait``). :meth:`SplitVectorEnv.send` starts a group's step at the
bottom of its stack; :meth:`SplitVectorEnv.recv` then steps the stack as usual, and the
adapter hands it the result of the step already under way, so every wrapper sees one
ordinary ``step``.
"""

from typing import Any

import numpy as np
from gymnasium.vector import VectorEnv, VectorWrapper
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate


def steps_in_background(env: VectorEnv) -> bool:
    """Whether ``env`` can start a step and return before it ends (see :class:`BackgroundStep`)."""
    return hasattr(env, "send") and hasattr(env, "recv") or hasattr(env, "step_async")


class BackgroundStep(VectorWrapper):
    """Lets the step of a vector env start before the wrappers above it ask for it.

    :meth:`start` hands the actions to the env, which steps in its threads or worker
    processes; the next :meth:`step` (called down through the wrappers with the same
    actions) waits for that step and returns it. A :meth:`step` with no step started is an
    ordinary one.

    Args:
        env: a vector env that :func:`steps_in_background`.
    """

    def __init__(self, env: VectorEnv) -> None:
        if not steps_in_background(env):
            raise TypeError(f"{type(env).__name__} cannot step in the background")
        super().__init__(env)
        native = hasattr(env, "send") and hasattr(env, "recv")
        self._start = env.send if native else env.step_async  # type: ignore[attr-defined]
        self._wait = env.recv if native else env.step_wait  # type: ignore[attr-defined]
        self.started = False

    def start(self, actions: Any) -> None:
        """Start stepping the envs with ``actions``; the next :meth:`step` returns the result."""
        if self.started:
            raise RuntimeError("a step is already under way")
        self._start(actions)
        self.started = True

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        if not self.started:
            self._start(actions)
        self.started = False
        return self._wait()


class SplitVectorEnv(VectorEnv):
    """``num_envs`` sub-envs as consecutive groups, each a vector env stepping in the
    background; group ``g`` holds sub-envs ``slices[g]``.

    As a vector env it behaves as the unsplit one: :meth:`reset` seeds sub-env ``i`` with
    ``seed + i``, and :meth:`step` steps every group and returns the batches concatenated,
    ``info`` merged as gymnasium merges it. The rollouts that overlap acting and stepping
    use :meth:`send` and :meth:`recv` group by group instead.

    Args:
        groups: the groups' vector envs, in sub-env order, each with a
            :class:`BackgroundStep` at the bottom of its wrappers; same spaces and
            autoreset mode.
    """

    def __init__(self, groups: list[VectorEnv]) -> None:
        if len(groups) < 2:
            raise ValueError(f"SplitVectorEnv needs at least two groups, got {len(groups)}")
        self.groups = groups
        self.starters = [_background_step(group) for group in groups]
        first = groups[0]
        self.num_envs = sum(group.num_envs for group in groups)
        self.single_observation_space = first.single_observation_space
        self.single_action_space = first.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = first.metadata
        self.spec = first.spec
        self.render_mode = first.render_mode
        bounds = np.cumsum([0] + [group.num_envs for group in groups])
        self.slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self._actions: list[Any] = [None] * len(groups)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset every group (or the sub-envs of ``options["reset_mask"]``); sub-env ``i``
        gets ``seed + i``."""
        results = []
        for group, part in zip(self.groups, self.slices, strict=True):
            group_options = dict(options or {})
            if "reset_mask" in group_options:
                mask = np.asarray(group_options["reset_mask"])[part]
                if not mask.any():
                    results.append(None)
                    continue
                group_options["reset_mask"] = mask
            group_seed = None if seed is None else int(seed) + part.start
            results.append(group.reset(seed=group_seed, options=group_options or None))
        if any(result is None for result in results):
            raise ValueError("SplitVectorEnv.reset: every group needs a sub-env to reset")
        obs = self._concatenate([obs for obs, _ in results])
        return obs, self._merge_infos([info for _, info in results])

    def send(self, group: int, actions: Any) -> None:
        """Start stepping group ``group`` with its actions (``(group size, …)``)."""
        self._actions[group] = actions
        self.starters[group].start(actions)

    def recv(self, group: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait for the step :meth:`send` started and return it, through the group's wrappers."""
        actions, self._actions[group] = self._actions[group], None
        return self.groups[group].step(actions)

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step all groups together (all are started before any is awaited)."""
        actions = np.asarray(actions)
        for group, part in enumerate(self.slices):
            self.send(group, actions[part])
        results = [self.recv(group) for group in range(len(self.groups))]
        obs = self._concatenate([result[0] for result in results])
        rewards, terminated, truncated = (
            np.concatenate([result[k] for result in results]) for k in (1, 2, 3)
        )
        return obs, rewards, terminated, truncated, self._merge_infos([r[4] for r in results])

    def close_extras(self, **kwargs: Any) -> None:
        for group in self.groups:
            group.close()

    def _concatenate(self, parts: list[Any]) -> Any:
        if all(isinstance(part, np.ndarray) for part in parts):
            return np.concatenate(parts)
        items = [
            item
            for group, part in zip(self.groups, parts, strict=True)
            for item in iterate(group.observation_space, part)
        ]
        out = create_empty_array(self.single_observation_space, self.num_envs)
        return concatenate(self.single_observation_space, items, out)

    def _merge_infos(self, infos: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_infos(infos, self.slices, self.num_envs)


def merge_infos(infos: list[dict[str, Any]], slices: list[slice], num_envs: int) -> dict[str, Any]:
    """One vector ``info`` of ``num_envs`` sub-envs from the infos of consecutive groups:
    arrays batched over a group's sub-envs (masks ``_key`` included) go to its slice of a
    zero-filled batch over all sub-envs, dicts are merged key by key, anything else keeps
    the last group's value.

    Args:
        infos: each group's vector info.
        slices: each group's sub-envs.
        num_envs: sub-envs in all.
    """
    merged: dict[str, Any] = {}
    keys = dict.fromkeys(key for info in infos for key in info)
    for key in keys:
        present = [
            (info[key], part) for info, part in zip(infos, slices, strict=True) if key in info
        ]
        first = present[0][0]
        if isinstance(first, dict):
            subs = [info.get(key, {}) for info in infos]
            merged[key] = merge_infos(subs, slices, num_envs)
        elif (
            isinstance(first, np.ndarray)
            and first.ndim >= 1
            and all(
                isinstance(value, np.ndarray) and len(value) == part.stop - part.start
                for value, part in present
            )
        ):
            batch = np.zeros((num_envs, *first.shape[1:]), dtype=first.dtype)
            for value, part in present:
                batch[part] = value
            merged[key] = batch
        else:
            merged[key] = present[-1][0]
    return merged


def _background_step(env: VectorEnv) -> BackgroundStep:
    """The :class:`BackgroundStep` at the bottom of ``env``'s wrappers."""
    while not isinstance(env, BackgroundStep):
        if not isinstance(env, VectorWrapper):
            raise TypeError("each group needs a BackgroundStep at the bottom of its wrappers")
        env = env.env
    return env
