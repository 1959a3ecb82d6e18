"""Evaluation episodes: whole episodes with frozen normalisers, for ``slm-lab validate`` /
``test`` (:class:`EvaluationEpisodes`) and for evaluation during fit
(:class:`~slm_lightning.callbacks.PeriodicEval`), both played by :func:`play_episodes`."""

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor

from slm_lightning.envs.factory import (
    EnvSpec,
    make_vector_env,
    next_step_resets,
    resolve_vectorization,
)
from slm_lightning.envs.normalization import freeze_normalizers, load_normalizer_state


class EvaluationBatch(NamedTuple):
    """The raw returns and lengths of the evaluation episodes, one entry per episode."""

    returns: Tensor
    lengths: Tensor


def evaluation_env_spec(env_spec: EnvSpec, num_episodes: int, in_process: bool = False) -> EnvSpec:
    """The training env spec with ``num_envs`` capped at ``num_episodes`` (no env is started
    whose episode would not count), stepped unsplit (``num_splits`` serves rollouts).

    Args:
        env_spec: the training env spec.
        num_episodes: episodes each evaluation plays.
        in_process: step the envs in this process: ``sync`` where training's mode would
            start worker processes (``async``, ``blocks``), so that an env kept open between
            evaluations never leaves a child process behind.
    """
    spec = replace(env_spec, num_envs=min(env_spec.num_envs, num_episodes), num_splits=1)
    if in_process and resolve_vectorization(spec, spec.registry_spec()) in ("async", "blocks"):
        spec = replace(spec, vectorization="sync")
    return spec


def play_episodes(
    agent: Any, env: VectorEnv, seed: int, num_episodes: int, greedy: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Play ``num_episodes`` complete episodes on ``env`` reset with ``seed``; returns their raw
    returns and lengths (as recorded by ``RecordEpisodeStatistics``), in the order they ended.

    Episodes are spread evenly over the envs (env ``i`` plays ``(n + i) // num_envs`` of
    them) so that short episodes, which finish first, do not crowd out long ones.

    The agent acts through ``eval_step(obs, state, episode_starts, greedy) -> (actions,
    state)``, starting from ``initial_state(num_envs)`` (None for a feed-forward policy); a
    recurrent policy's state is carried from step to step and zeroed where an episode starts.
    Sampled actions draw from torch's global RNG seeded with ``seed`` inside a fork of it, so
    the same weights and seed play the same episodes, and the caller's RNG stream (training's
    action sampling) is left as it was.

    Args:
        agent: the algorithm; needs ``initial_state``, ``eval_step``, ``env_actions`` and
            ``device``.
        env: the evaluation env, with its normalisers (if any) set and frozen by the caller.
        seed: seed of the first sub-env (sub-env ``i`` gets ``seed + i``) and of the actions.
        num_episodes: episodes to play.
        greedy: act with the most likely action (the Gaussian mean) instead of sampling.
    """
    device = agent.device
    cuda = [device.index or 0] if device.type == "cuda" else []
    n = env.num_envs
    targets = np.array([(num_episodes + i) // n for i in range(n)])
    counts = np.zeros(n, dtype=int)
    returns: list[float] = []
    lengths: list[int] = []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode():
        torch.manual_seed(seed)
        state = agent.initial_state(n)
        starts = np.ones(n, dtype=bool)
        prev_done = np.zeros(n, dtype=bool)
        obs, _ = env.reset(seed=seed)
        while (counts < targets).any():
            obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
            starts_t = None if state is None else torch.as_tensor(starts, device=device)
            actions, state = agent.eval_step(obs_t, state, starts_t, greedy)
            # NEXT_STEP autoreset: the step after a done returns a first observation.
            starts = prev_done
            obs, _, terminated, truncated, info = env.step(agent.env_actions(actions.cpu().numpy()))
            prev_done = next_step_resets(terminated, truncated, info)
            if "_episode" in info:
                for i in np.flatnonzero(info["_episode"]):
                    if counts[i] < targets[i]:
                        counts[i] += 1
                        returns.append(float(info["episode"]["r"][i]))
                        lengths.append(int(info["episode"]["l"][i]))
    return np.asarray(returns), np.asarray(lengths)


class EvaluationEpisodes:
    """Plays ``num_episodes`` complete episodes (:func:`play_episodes`) in an env of its own,
    built for the evaluation and closed after it, and yields their raw returns as one batch.

    Args:
        agent: the algorithm; needs ``initial_state``, ``eval_step``, ``env_actions`` and
            ``device``.
        env_spec: the training env spec; ``num_envs`` is capped at ``num_episodes``.
        seed: seed of the first evaluation env.
        num_episodes: episodes to play.
        greedy: act with the most likely action (the Gaussian mean) instead of sampling.
        normalizers: observation statistics from training, frozen during evaluation.
    """

    def __init__(
        self,
        agent: Any,
        env_spec: EnvSpec,
        seed: int,
        num_episodes: int,
        greedy: bool,
        normalizers: dict | None = None,
    ) -> None:
        self.agent = agent
        self.env_spec = evaluation_env_spec(env_spec, num_episodes)
        self.seed = seed
        self.num_episodes = num_episodes
        self.greedy = greedy
        self.normalizers = normalizers

    def __len__(self) -> int:
        return 1

    def play(self) -> tuple[np.ndarray, np.ndarray]:
        """Build the env, play the episodes, close the env; returns their returns and lengths."""
        env = make_vector_env(self.env_spec, seed=self.seed)
        try:
            if self.normalizers:
                load_normalizer_state(env, self.normalizers)
            freeze_normalizers(env)
            return play_episodes(self.agent, env, self.seed, self.num_episodes, self.greedy)
        finally:
            env.close()

    def __iter__(self) -> Iterator[EvaluationBatch]:
        returns, lengths = self.play()
        yield EvaluationBatch(torch.as_tensor(returns), torch.as_tensor(lengths))
