"""Evaluation episodes for ``slm-lab validate`` / ``test``: whole episodes, frozen normalisers."""

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from slm_lightning.envs.factory import EnvSpec, make_vector_env, next_step_resets
from slm_lightning.envs.normalization import freeze_normalizers, load_normalizer_state


class EvaluationBatch(NamedTuple):
    """The raw returns and lengths of the evaluation episodes, one entry per episode."""

    returns: Tensor
    lengths: Tensor


class EvaluationEpisodes:
    """Plays ``num_episodes`` complete episodes and yields their raw returns as one batch.

    Episodes are spread evenly over the envs (env ``i`` plays ``(n + i) // num_envs`` of
    them) so that short episodes, which finish first, do not crowd out long ones.

    The agent acts through ``eval_step(obs, state, episode_starts, greedy) -> (actions,
    state)``, starting from ``initial_state(num_envs)`` (None for a feed-forward policy); a
    recurrent policy's state is carried from step to step and zeroed where an episode starts.

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
        self.env_spec = replace(env_spec, num_envs=min(env_spec.num_envs, num_episodes))
        self.seed = seed
        self.num_episodes = num_episodes
        self.greedy = greedy
        self.normalizers = normalizers

    def __len__(self) -> int:
        return 1

    @torch.inference_mode()
    def play(self) -> tuple[np.ndarray, np.ndarray]:
        env = make_vector_env(self.env_spec, seed=self.seed)
        if self.normalizers:
            load_normalizer_state(env, self.normalizers)
        freeze_normalizers(env)
        n = env.num_envs
        targets = np.array([(self.num_episodes + i) // n for i in range(n)])
        counts = np.zeros(n, dtype=int)
        returns: list[float] = []
        lengths: list[int] = []
        device = self.agent.device
        state = self.agent.initial_state(n)
        starts = np.ones(n, dtype=bool)
        prev_done = np.zeros(n, dtype=bool)
        obs, _ = env.reset(seed=self.seed)
        try:
            while (counts < targets).any():
                obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
                starts_t = None if state is None else torch.as_tensor(starts, device=device)
                actions, state = self.agent.eval_step(obs_t, state, starts_t, self.greedy)
                # NEXT_STEP autoreset: the step after a done returns a first observation.
                starts = prev_done
                obs, _, terminated, truncated, info = env.step(
                    self.agent.env_actions(actions.cpu().numpy())
                )
                prev_done = next_step_resets(terminated, truncated, info)
                if "_episode" in info:
                    for i in np.flatnonzero(info["_episode"]):
                        if counts[i] < targets[i]:
                            counts[i] += 1
                            returns.append(float(info["episode"]["r"][i]))
                            lengths.append(int(info["episode"]["l"][i]))
        finally:
            env.close()
        return np.asarray(returns), np.asarray(lengths)

    def __iter__(self) -> Iterator[EvaluationBatch]:
        returns, lengths = self.play()
        yield EvaluationBatch(torch.as_tensor(returns), torch.as_tensor(lengths))
