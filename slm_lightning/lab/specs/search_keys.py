"""The spec's ``search`` section -> our search space (``slm_lightning/lab/space.py``).

A search key's path is translated with the same mapping as the config: the spec is mapped
again with the key set to each candidate value (or to a range's ends), and the config key
that changes is the key of the space. A key that changes nothing (the algorithm ignores it),
or several keys, or that has no bounded equivalent, is reported as unsupported."""

import copy
from typing import Any

from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs.mapping import map_spec
from slm_lightning.lab.specs.report import SpecKeys, flatten, show

# SLM Lab suffix -> our kind. randint's high end is exclusive, qrandint's inclusive.
_RANGES = {
    "uniform": "uniform",
    "loguniform": "loguniform",
    "randint": "int",
    "qrandint": "int",
    "quniform": "uniform",
}
_CHOICES = ("choice", "grid_search")
_UNBOUNDED = ("normal", "randn", "qrandn", "qnormal", "lognormal", "qloguniform", "lograndint")


def search_entries(search: Any, prefix: str = "") -> dict[str, Any]:
    """``{"agent.algorithm.gamma__uniform": [0.9, 0.99], ...}`` from a nested (v4, with
    ``agent[0]``), nested (v5) or dotted (v5) search section."""
    if isinstance(search, list) and len(search) == 1 and isinstance(search[0], dict):
        search = search[0]
    if isinstance(search, dict):
        out: dict[str, Any] = {}
        for key, value in search.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if "__" in str(key) or not isinstance(value, dict | list) or _is_leaf_list(value):
                out[path] = value
            else:
                out.update(search_entries(value, path))
        return out
    return {prefix: search}


def _is_leaf_list(value: Any) -> bool:
    return isinstance(value, list) and not (len(value) == 1 and isinstance(value[0], dict))


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    node = spec
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _mapped(spec: dict[str, Any], version: int, name: str, path: str, value: Any) -> dict[str, Any]:
    """The config's leaves (dotted) after mapping the spec with ``path`` set to ``value``."""
    trial = copy.deepcopy(spec)
    _set_path(trial, path, value)
    keys, _ = map_spec(trial, version, name)
    return flatten(keys.config)


def translate_search(
    spec: dict[str, Any], version: int, name: str, search: Any, keys: SpecKeys
) -> dict[str, dict] | None:
    """Our space for the spec's search section; each key's fate goes into the report.

    Args:
        spec: the spec in v5 shape.
        version: 4 or 5.
        name: SPEC_NAME.
        search: the spec's ``search`` section.
        keys: the spec's mapped keys (the base config and the report).
    """
    base = flatten(keys.config)
    report = keys.report
    space: dict[str, dict] = {}
    for key, args in search_entries(search).items():
        line = f"search.{key} {show(args)}"
        path, sep, suffix = key.rpartition("__")
        if not sep:
            report.unsupported.append(
                f"search.{key}: no __suffix (uniform, choice …); SLM Lab would fail on it too"
            )
            continue
        if suffix in _UNBOUNDED or (suffix not in _RANGES and suffix not in _CHOICES):
            report.unsupported.append(
                f"search.{key}: {suffix} has no bounded equivalent here (uniform, loguniform, int, choice)"
            )
            continue
        if suffix in _CHOICES:
            candidates = list(args)
        else:
            lo, hi, *step = args
            candidates = [lo, hi - 1 if suffix == "randint" else hi]
        try:
            results = [_mapped(spec, version, name, path, v) for v in candidates]
        except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as err:
            report.unsupported.append(f"search.{key}: its values do not map ({err})")
            continue
        changed = sorted(
            {k for r in results for k in set(r) | set(base) if r.get(k, ...) != base.get(k, ...)}
        )
        varying = [k for k in changed if len({repr(r.get(k)) for r in results}) > 1]
        if len(varying) != 1:
            why = (
                "the algorithm ignores it"
                if not varying
                else f"it sets several keys ({', '.join(varying)})"
            )
            report.unsupported.append(f"search.{key}: {why}")
            continue
        target = varying[0]
        values = [r.get(target) for r in results]
        same = values == candidates
        if suffix in _CHOICES:
            unique = [v for i, v in enumerate(values) if v not in values[:i]]
            entry: dict[str, Any] = {"choice": unique}
        else:
            entry = {_RANGES[suffix]: sorted(values)}
            if step and suffix in ("qrandint", "quniform"):
                if not same:
                    report.unsupported.append(f"search.{key}: a stepped range of a converted key")
                    continue
                entry["step"] = step[0]
        space[target] = entry
        exact = same and suffix in ("uniform", "loguniform", "choice")
        (report.exact if exact else report.converted).append(
            f"{line} -> space {target} {show(entry)}"
        )
    return space or None
