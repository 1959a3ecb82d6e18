"""The search space: a YAML file of dotted config keys and the distribution each one is
sampled from, as ``slm-lab search --space`` reads it::

    model.init_args.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.init_args.gamma: {uniform: [0.95, 0.999]}
    model.init_args.num_minibatches: {int: [2, 8], step: 2}
    model.init_args.actor.hidden_sizes: {choice: [[64, 64], [128, 128]]}

Data path: space.py:load_space (file -> :class:`SearchSpace` of Optuna distributions) ->
space.py:check_space_keys (every key against the parsed config, before any trial starts) ->
the search asks Optuna for ``trial.params`` -> :meth:`SearchSpace.overrides` (the fit options
each session of the trial runs with).
"""

import dataclasses
import decimal
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from slm_lightning.errors import ConfigError

KINDS = ("loguniform", "uniform", "int", "choice")
MODIFIERS = ("log", "step")
# Keys the search sets itself: each session's seed and run folder, the config file.
OWNED_KEYS = ("seed_everything", "trainer.default_root_dir", "ckpt_path", "config")
_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MISSING = object()


class _SpaceLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` is a number as in YAML 1.2 (PyYAML, a YAML 1.1
    parser, reads a float without a dot as a string), the way jsonargparse reads configs."""


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value as the CLI reads it (YAML, with ``1e-4`` a number).

    Args:
        text: the text after ``--key=``.
    """
    return yaml.load(text, Loader=_SpaceLoader)  # a SafeLoader subclass


def _text(value: Any) -> str:
    """A value as a fit option writes it: a string as is; anything else as JSON, which the
    CLI's YAML parser reads back to the same value (floats by ``repr``, so never rounded)."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclasses.dataclass
class SearchSpace:
    """The distributions a search samples, one per dotted config key.

    Args:
        distributions: dotted key -> Optuna distribution, in file order; what
            ``study.ask(space.distributions)`` samples.
        source: the space file, named in messages.
        encoded: for a choice whose options are lists or dicts (which Optuna's
            ``CategoricalDistribution`` cannot store), the key -> {stored text -> option}.
    """

    distributions: dict[str, BaseDistribution]
    source: str
    encoded: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The config values of sampled params (a list choice's stored text decoded).

        Args:
            params: Optuna's ``trial.params``.
        """
        decoded = {}
        for key, value in params.items():
            table = self.encoded.get(key, {})
            decoded[key] = table[value] if isinstance(value, str) and value in table else value
        return decoded

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The fit options that set the sampled values: ``--model.init_args.lr=0.00123``.

        Args:
            params: Optuna's ``trial.params``.
        """
        return [f"--{key}={_text(value)}" for key, value in self.values(params).items()]

    def grid(self) -> dict[str, list[Any]]:
        """Every key's values, for ``optuna.samplers.GridSampler`` (choices as stored).

        Raises ConfigError for a continuous range, which has no finite grid.
        """
        grid: dict[str, list[Any]] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution):
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, FloatDistribution) and dist.step is not None:
                # Decimal steps, so 0.1 * 3 is 0.3 (Optuna checks grid values against the step).
                low, step = decimal.Decimal(str(dist.low)), decimal.Decimal(str(dist.step))
                count = int((decimal.Decimal(str(dist.high)) - low) / step) + 1
                grid[key] = [float(low + k * step) for k in range(count)]
            else:
                raise ConfigError(
                    f"--sampler grid: {self.source}: {key} is a continuous range; "
                    "use {choice: [...]} or {int: [...]} for a grid"
                )
        return grid

    def size(self) -> int | None:
        """The number of points of the grid, or None if a key is a continuous range."""
        try:
            return math.prod(len(values) for values in self.grid().values())
        except ConfigError:
            return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _distribution(kind: str, args: Any, modifiers: dict[str, Any], where: str) -> BaseDistribution:
    """The Optuna distribution of one entry; ``where`` (``<file>: <key>``) starts each message."""
    log, step = modifiers.get("log", kind == "loguniform"), modifiers.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if kind == "loguniform" and not log:
        raise ConfigError(f"{where}: loguniform is log-scaled; drop log: false or use uniform")
    if not (isinstance(args, list) and len(args) == 2 and all(map(_is_number, args))):
        raise ConfigError(f"{where}: {kind} takes two numbers [lo, hi], got {args!r}")
    lo, hi = args
    if kind == "int" and not all(isinstance(v, int) for v in (lo, hi, step or 1)):
        raise ConfigError(
            f"{where}: int takes whole-number bounds and step, got [{lo}, {hi}]"
            + (f", step {step}" if step is not None else "")
        )
    if lo >= hi:
        raise ConfigError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
    if log and step is not None:  # Optuna samples either on a log scale or on a grid of steps
        raise ConfigError(f"{where}: log and step cannot be combined; give one")
    if log and lo <= 0:
        raise ConfigError(f"{where}: a log-scaled range needs lo > 0, got [{lo}, {hi}]")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise ConfigError(f"{where}: step must be a number > 0, got {step!r}")
        # Optuna would silently lower hi to the last step below it; say so instead.
        span = decimal.Decimal(str(hi)) - decimal.Decimal(str(lo))
        if span % decimal.Decimal(str(step)) != 0:
            raise ConfigError(f"{where}: hi - lo ({span}) is not a multiple of step {step}")
    try:
        if kind == "int":
            return IntDistribution(lo, hi, log=log, step=step or 1)
        return FloatDistribution(float(lo), float(hi), log=log, step=step)
    except ValueError as err:  # anything Optuna checks that we did not
        raise ConfigError(f"{where}: {err}") from None


def _choice(
    options: Any, modifiers: dict[str, Any], where: str
) -> tuple[CategoricalDistribution, dict[str, Any]]:
    """The categorical distribution of a choice, and its list/dict options by stored text."""
    if modifiers:
        raise ConfigError(f"{where}: choice takes no {', '.join(modifiers)}; give only the options")
    if not isinstance(options, list) or not options:
        raise ConfigError(f"{where}: choice takes a non-empty list of options, got {options!r}")
    encoded = {_text(o): o for o in options if isinstance(o, (list, dict))}
    stored = [_text(o) if isinstance(o, (list, dict)) else o for o in options]
    for i, option in enumerate(stored):
        # Optuna finds an option by ==, so 1, 1.0 and true are one option to it.
        twin = next((other for other in stored[:i] if other == option), _MISSING)
        if twin is not _MISSING:
            raise ConfigError(
                f"{where}: choice repeats an option ({_text(twin)} and {_text(option)}); "
                "give each once"
            )
    return CategoricalDistribution(stored), encoded


def parse_space(raw: Any, source: str) -> SearchSpace:
    """A search space from a loaded YAML mapping of dotted keys to distributions.

    Args:
        raw: the loaded file: ``{"model.init_args.lr": {"loguniform": [1e-4, 1e-2]}, ...}``.
            Each entry holds one kind (``loguniform: [lo, hi]``, ``uniform: [lo, hi]``,
            ``int: [lo, hi]``, ``choice: [...]``) and, for ranges, ``log: true`` or
            ``step: s``.
        source: the file, named in every message.
    """
    if raw is None:
        raise ConfigError(
            f"{source}: the file is empty; a space maps dotted config keys to distributions"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of dotted config keys to distributions "
            f"(model.init_args.lr: {{loguniform: [1.0e-4, 1.0e-2]}}), got a {type(raw).__name__}"
        )
    if not raw:
        raise ConfigError(f"{source}: the space has no keys")
    space = SearchSpace(distributions={}, source=source)
    for key, entry in raw.items():
        if not isinstance(key, str) or not _DOTTED_KEY.fullmatch(key):
            raise ConfigError(f"{source}: {key!r} is not a dotted config key (model.init_args.lr)")
        where = f"{source}: {key}"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where}: expected a distribution such as {{uniform: [0.9, 0.99]}}, got {entry!r}"
            )
        kinds = [name for name in entry if name in KINDS]
        unknown = [name for name in entry if name not in KINDS and name not in MODIFIERS]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(str(name), [*KINDS, *MODIFIERS], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{where}: unknown {name!r}; {hint}kinds: {', '.join(KINDS)}; "
                f"modifiers: {', '.join(MODIFIERS)}"
            )
        if len(kinds) != 1:
            given = f"got {' and '.join(kinds)}" if kinds else "got none"
            raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}; {given}")
        kind = kinds[0]
        modifiers = {name: entry[name] for name in MODIFIERS if name in entry}
        if kind == "choice":
            space.distributions[key], encoded = _choice(entry[kind], modifiers, where)
            if encoded:
                space.encoded[key] = encoded
        else:
            space.distributions[key] = _distribution(kind, entry[kind], modifiers, where)
    return space


def load_space(path: Path) -> SearchSpace:
    """Read a search space file (see :func:`parse_space`).

    Args:
        path: the YAML file (``--space``).
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"--space {path}: cannot read the file ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_SpaceLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"--space {path}: not valid YAML{at}: {problem}") from None
    return parse_space(raw, str(path))


def check_space_keys(space: SearchSpace, values: dict[str, Any], config: str) -> None:
    """Every key of the space is a key of the config, before any trial starts.

    A key below a known key whose value is None or a dict (``model.init_args.recurrent.
    hidden_size`` where ``recurrent`` is None, ``model.init_args.env.kwargs.foo``) passes,
    as does a key above known keys (``model.init_args.lr`` where the config holds a schedule
    ``lr.start``, ``lr.end``): the value replaces the whole group, and fit's own parse of
    the overrides checks both.

    Args:
        space: the search space.
        values: ``ConfigFacts.values`` of the config: every dotted key and its value.
        config: the config file, named in messages.
    """
    groups = {key.rsplit(".", n)[0] for key in values for n in range(1, key.count(".") + 1)}
    for key in space.distributions:
        owned = next((k for k in OWNED_KEYS if key == k or key.startswith(f"{k}.")), None)
        if owned is not None:
            raise ConfigError(
                f"{space.source}: {key} is set by the search itself (each session's seed, "
                f"run folder and config); leave {owned} out of the space"
            )
        if key in values or key in groups:
            continue
        parents = [key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]
        if any(p in values and (values[p] is None or isinstance(values[p], dict)) for p in parents):
            continue
        close = difflib.get_close_matches(key, [*values, *groups], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{space.source}: {key} is not a key of {config}{hint}")
