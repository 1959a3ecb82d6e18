"""Partially observable variants of classic-control tasks, for recurrent policies.

``slm_lightning/CartPoleNoVelocity-v1`` is CartPole-v1 whose observation keeps only the cart
position and the pole angle (indices 0 and 2): the velocities (indices 1 and 3) are hidden,
so a memoryless policy cannot tell which way the pole is falling, while a recurrent one can
infer the velocities from consecutive observations. It is registered with both a single-env
entry point and gymnasium's numpy-vectorised one, so every vectorization mode works.
"""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleEnv, CartPoleVectorEnv
from gymnasium.vector.utils import batch_space

CARTPOLE_NO_VELOCITY_ID = "slm_lightning/CartPoleNoVelocity-v1"
VISIBLE = np.array([0, 2])  # cart position, pole angle; velocities 1 and 3 are hidden


def _visible_space(space: spaces.Box) -> spaces.Box:
    return spaces.Box(space.low[VISIBLE], space.high[VISIBLE], dtype=np.float32)


class CartPoleNoVelocityEnv(CartPoleEnv):
    """CartPole with observations ``[cart position, pole angle]``; dynamics unchanged."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observation_space = _visible_space(self.observation_space)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[VISIBLE], reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = super().reset(**kwargs)
        return obs[VISIBLE], info


class CartPoleNoVelocityVectorEnv(CartPoleVectorEnv):
    """Gymnasium's numpy-vectorised CartPole with the velocities hidden (NEXT_STEP autoreset)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.single_observation_space = _visible_space(self.single_observation_space)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, ...]:
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[:, VISIBLE], reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = super().reset(**kwargs)
        return obs[:, VISIBLE], info


def register_pomdp_envs() -> None:
    """Register the ids above with gymnasium (idempotent: import in workers re-runs it)."""
    if CARTPOLE_NO_VELOCITY_ID not in gym.registry:
        gym.register(
            id=CARTPOLE_NO_VELOCITY_ID,
            entry_point="slm_lightning.envs.pomdp:CartPoleNoVelocityEnv",
            vector_entry_point="slm_lightning.envs.pomdp:CartPoleNoVelocityVectorEnv",
            max_episode_steps=500,
            reward_threshold=475.0,
        )
