"""Algorithms: each one a LightningModule."""

from slm_lightning.algorithms.a2c import A2C
from slm_lightning.algorithms.base import RLAlgorithm
from slm_lightning.algorithms.ppo import PPO
from slm_lightning.algorithms.reinforce import Reinforce

__all__ = ["A2C", "PPO", "RLAlgorithm", "Reinforce"]
