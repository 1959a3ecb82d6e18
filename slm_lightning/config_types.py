"""Number types for hyperparameters, registered with jsonargparse so configs are checked at parse time.

``max_frames: PositiveCount`` reads ``2e4`` or ``1.0e+7`` as an integer, as SLM Lab specs
write budgets, while ``--help`` and the saved config stay typed: jsonargparse calls the
registered deserializer for the command line and for YAML values alike, and rejects a bad
value (``2.5``, ``0``, ``sixteen``) while parsing, before anything is instantiated or written.
The deserializers return plain ``int`` / ``float``, so parsed values pickle, YAML-dump and
compare like any number (a subclass instance would not survive ``yaml.safe_dump``).
"""

import math
from typing import Any

from jsonargparse.typing import register_type


class Count(int):
    """An integer count >= 0 (frames, transitions); integral scientific notation like ``1e6``
    is accepted."""


class PositiveCount(int):
    """An integer count >= 1 (frames, transitions); integral scientific notation like ``1e6``
    is accepted."""


class NonNegativeFloat(float):
    """A real number >= 0 (a learning rate; 0 freezes the weights)."""


def _number(value: Any, what: str) -> float | int:
    """``value`` as given in a config or on the command line, as an int or a float."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {what}, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected {what}, got {value!r}") from None
    return value


def to_count(value: Any, positive: bool = False) -> int:
    """Parse an integer count; an integral float (``2e4`` → 20000) is accepted.

    Args:
        value: an int, a float or a string from a config or the command line.
        positive: reject 0 as well as negative counts.
    """
    bound = "> 0" if positive else ">= 0"
    what = f"an integer {bound} (1e6 notation allowed)"
    number = _number(value, what)
    if isinstance(number, float):
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"expected {what}, got {value!r}")
        number = int(number)
    if number < (1 if positive else 0):
        raise ValueError(f"must be {bound}, got {number}")
    return int(number)


def to_non_negative_float(value: Any) -> float:
    """Parse a real number >= 0.

    Args:
        value: an int, a float or a string from a config or the command line.
    """
    number = float(_number(value, "a number >= 0"))
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"must be >= 0, got {number:g}")
    return number


# type_check is never true, so every value (defaults included) passes through the deserializer
# and comes out a plain int / float.
register_type(Count, serializer=int, deserializer=to_count, type_check=lambda v, t: False)
register_type(
    PositiveCount,
    serializer=int,
    deserializer=lambda value: to_count(value, positive=True),
    type_check=lambda v, t: False,
)
register_type(
    NonNegativeFloat,
    serializer=float,
    deserializer=to_non_negative_float,
    type_check=lambda v, t: False,
)
