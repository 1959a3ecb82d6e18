"""A user's own env, registered when this module is imported: ``tests.envs_fixture:Corridor-v0``
is gymnasium's ``module:EnvId`` form, which imports the module before looking the id up."""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

CORRIDOR_ID = "Corridor-v0"


class Corridor(gym.Env):
    """A corridor of ``length`` cells: action 1 steps right, 0 left; reaching the far end
    pays 1 and ends the episode. The observation is the position as a fraction of the length.

    Args:
        length: cells from the start to the goal.
        render_mode: accepted for gymnasium's API; nothing is rendered.
    """

    observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, length: int = 4, render_mode: str | None = None) -> None:
        self.length = length
        self.render_mode = render_mode
        self.position = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.position / self.length], dtype=np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.position = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.position = max(0, self.position + (1 if int(action) == 1 else -1))
        done = self.position >= self.length
        return self._obs(), float(done), done, False, {}


if CORRIDOR_ID not in gym.registry:
    gym.register(CORRIDOR_ID, entry_point="tests.envs_fixture:Corridor", max_episode_steps=32)
