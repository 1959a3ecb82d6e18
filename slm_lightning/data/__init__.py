"""Rollout datasets, memories and return estimators."""

from slm_lightning.data.onpolicy import OnPolicyMemory
from slm_lightning.data.rollout import EpisodeLog, OnPolicyRollout

__all__ = ["EpisodeLog", "OnPolicyMemory", "OnPolicyRollout"]
