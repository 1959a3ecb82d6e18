"""Hyperparameters that change with the frame clock (learning rate, entropy, clip range …)."""

from dataclasses import dataclass
from typing import Literal

from slm_lightning.config_types import Count, PositiveCount


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``start`` to ``end`` between two frame counts.

    In a config, any hyperparameter typed ``float | Schedule`` takes either a number or
    ``{start: 3.0e-4, end: 0.0}`` (linear decay over the whole frame budget).

    Args:
        start: value at ``start_frame`` and before.
        end: value at ``end_frame`` and after.
        start_frame: frame at which the change begins.
        end_frame: frame at which ``end`` is reached; ``None`` means the run's ``max_frames``.
        kind: ``linear`` interpolation or ``exponential`` (geometric; start and end > 0).
    """

    start: float
    end: float
    start_frame: Count = 0
    end_frame: PositiveCount | None = None
    kind: Literal["linear", "exponential"] = "linear"

    def __post_init__(self) -> None:
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError(
                f"an exponential schedule needs start and end > 0, got {self.start}, {self.end}"
            )
        if self.end_frame is not None and self.end_frame <= self.start_frame:
            raise ValueError(
                f"schedule end_frame ({self.end_frame}) must exceed start_frame ({self.start_frame})"
            )

    def value(self, frames: int, max_frames: int) -> float:
        end_frame = max_frames if self.end_frame is None else self.end_frame
        span = max(end_frame - self.start_frame, 1)
        progress = min(max((frames - self.start_frame) / span, 0.0), 1.0)
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** progress
        return self.start + (self.end - self.start) * progress


def scheduled(value: "float | Schedule | dict", frames: int, max_frames: int) -> float:
    """The current value of a hyperparameter that is either constant or a :class:`Schedule`.

    A ``dict`` is a schedule as it arrives from a config file (jsonargparse validates the
    keys against :class:`Schedule` but may hand the value over unconverted).
    """
    if isinstance(value, dict):
        value = Schedule(**value)
    return value.value(frames, max_frames) if isinstance(value, Schedule) else float(value)
