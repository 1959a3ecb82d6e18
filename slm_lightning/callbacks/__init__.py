"""Lightning callbacks: metrics, frame-clock checkpoints, evaluation during fit, the run
summary, early stopping, video, W&B checkpoint artifacts, the frame-clock progress bar."""

from slm_lightning.callbacks.checkpoint import FrameCheckpoint
from slm_lightning.callbacks.early_stop import EarlyStopOnReturn
from slm_lightning.callbacks.evaluation import PeriodicEval
from slm_lightning.callbacks.metrics import MetricsTracker
from slm_lightning.callbacks.progress import FrameProgressBar
from slm_lightning.callbacks.run_summary import RunSummary
from slm_lightning.callbacks.video import VideoRecorder
from slm_lightning.callbacks.wandb_checkpoints import WandbCheckpoints

__all__ = [
    "EarlyStopOnReturn",
    "FrameCheckpoint",
    "FrameProgressBar",
    "MetricsTracker",
    "PeriodicEval",
    "RunSummary",
    "VideoRecorder",
    "WandbCheckpoints",
]
