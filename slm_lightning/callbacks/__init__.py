"""Lightning callbacks: metrics, frame-clock checkpoints, the run summary, early stopping,
video, W&B checkpoint artifacts."""

from slm_lightning.callbacks.checkpoint import FrameCheckpoint
from slm_lightning.callbacks.early_stop import EarlyStopOnReturn
from slm_lightning.callbacks.metrics import MetricsTracker
from slm_lightning.callbacks.run_summary import RunSummary
from slm_lightning.callbacks.video import VideoRecorder
from slm_lightning.callbacks.wandb_checkpoints import WandbCheckpoints

__all__ = [
    "EarlyStopOnReturn",
    "FrameCheckpoint",
    "MetricsTracker",
    "RunSummary",
    "VideoRecorder",
    "WandbCheckpoints",
]
