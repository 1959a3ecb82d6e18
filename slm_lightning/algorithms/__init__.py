"""Algorithms: each one a LightningModule."""

from slm_lightning.algorithms.a2c import A2C
from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.algorithms.crossq import CrossQ
from slm_lightning.algorithms.dqn import DQN
from slm_lightning.algorithms.ppo import PPO
from slm_lightning.algorithms.random_agent import RandomAgent
from slm_lightning.algorithms.reinforce import Reinforce
from slm_lightning.algorithms.sac import SAC
from slm_lightning.algorithms.sarsa import SARSA

__all__ = [
    "A2C",
    "DQN",
    "PPO",
    "SAC",
    "SARSA",
    "CrossQ",
    "RLAlgorithm",
    "RandomAgent",
    "Reinforce",
]
