"""A user's own env, registered when this module is imported: ``tests.envs_fixture:Corridor-v0``
is gymnasium's ``module:EnvId`` form, which imports the module before looking the id up."""

import os
import time
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
        step_seconds: wall time each step takes (a slow simulator, for tests that act while a
            run is under way).
    """

    observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(
        self, length: int = 4, render_mode: str | None = None, step_seconds: float = 0.0
    ) -> None:
        self.length = length
        self.step_seconds = step_seconds
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
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.position = max(0, self.position + (1 if int(action) == 1 else -1))
        done = self.position >= self.length
        return self._obs(), float(done), done, False, {}


if CORRIDOR_ID not in gym.registry:
    gym.register(CORRIDOR_ID, entry_point="tests.envs_fixture:Corridor", max_episode_steps=32)


FAULTY_ID = "FaultyCorridor-v0"


class FaultyCorridor(Corridor):
    """A Corridor whose sensor fails: while ``crash_file`` exists, the copy first reset with
    seed ``crash_seed`` raises after ``fail_after`` steps (a session that crashes mid-run, and
    runs again once the file is gone).

    Args:
        crash_seed: the reset seed of the copy that fails.
        crash_file: the failure happens only while this file exists.
        fail_after: steps of that copy before it fails.
    """

    def __init__(
        self, crash_seed: int = -1, crash_file: str = "", fail_after: int = 300, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.crash_seed, self.crash_file, self.fail_after = crash_seed, crash_file, fail_after
        self.first_seed: int | None = None
        self.steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        if self.first_seed is None:
            self.first_seed = seed
        return super().reset(seed=seed, options=options)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.steps += 1
        failing = self.first_seed == self.crash_seed and os.path.exists(self.crash_file)
        if failing and self.steps > self.fail_after:
            raise RuntimeError(f"corridor sensor failed at step {self.steps}")
        return super().step(action)


if FAULTY_ID not in gym.registry:
    gym.register(FAULTY_ID, entry_point="tests.envs_fixture:FaultyCorridor", max_episode_steps=32)
