"""Lightning callbacks: metrics, frame-clock checkpoints and the run summary."""

from slm_lightning.callbacks.checkpoint import FrameCheckpoint
from slm_lightning.callbacks.metrics import MetricsTracker
from slm_lightning.callbacks.run_summary import RunSummary

__all__ = ["FrameCheckpoint", "MetricsTracker", "RunSummary"]
