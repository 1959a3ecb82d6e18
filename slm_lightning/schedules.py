"""Hyperparameters that change with the frame clock (learning rate, entropy, clip range …)."""

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jsonargparse import Namespace

from slm_lightning.config_types import Count, PositiveCount
from slm_lightning.errors import ConfigError


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


def check_schedules(cls: type, init_args: Namespace | Mapping[str, Any], prefix: str) -> None:
    """Check every schedule given for a ``float | Schedule`` argument of ``cls`` before the
    class is instantiated, and name the key of a bad one.

    jsonargparse (4.53) checks a schedule's own rules (``end_frame`` after ``start_frame``,
    positive ends of an exponential schedule) only when it instantiates the class, and then
    reports the failure as a Union error that no longer names the argument.

    Args:
        cls: the algorithm class.
        init_args: its arguments as parsed (schedules still mappings).
        prefix: the keys' prefix as the user types it, e.g. ``model.init_args.``.
    """
    for name, hint in typing.get_type_hints(cls.__init__).items():
        value = init_args.get(name)
        if isinstance(value, Namespace):
            value = value.as_dict()
        if Schedule not in typing.get_args(hint) or not isinstance(value, Mapping):
            continue
        try:
            Schedule(**dict(value))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{prefix}{name}: {err}") from None
