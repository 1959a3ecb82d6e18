"""Rollout datasets, memories and return estimators."""

from slm_lightning.data.onpolicy_memory import OnPolicyBatch, OnPolicyMemory, RecurrentBatch
from slm_lightning.data.onpolicy_rollout import EpisodeLog, OnPolicyRollout
from slm_lightning.data.returns import GAE, MonteCarloReturns, NStepReturns

__all__ = [
    "GAE",
    "EpisodeLog",
    "MonteCarloReturns",
    "NStepReturns",
    "OnPolicyBatch",
    "OnPolicyMemory",
    "OnPolicyRollout",
    "RecurrentBatch",
]
