"""Reading an SLM Lab spec file: ``${KEY}`` substitution, parsing (v4 JSON with trailing
commas, v5 JSON, v5 YAML with anchors), picking SPEC_NAME, and bringing v4's lists into
v5's shape.

Data path: :func:`read_specs` (text -> :func:`substitute` -> parse) -> :func:`select_spec`
(one spec, its version) -> the mapping in ``importer.py``.
"""

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from slm_lightning.errors import ConfigError

# A string literal, or a comma followed only by whitespace and a closing bracket: the trailing
# commas SLM Lab's v4 files carry (upstream read them with ujson, which allows them).
_JSON_TRAILING_COMMA = re.compile(r'"(?:\\.|[^"\\])*"|,(\s*[}\]])')
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader (anchors and ``<<`` merge keys included), with ``3e6`` read as a
    number as YAML 1.2 and JSON read it (PyYAML, a YAML 1.1 parser, keeps it a string)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def substitute(text: str, sets: dict[str, str]) -> str:
    """Replace ``${KEY}`` in the spec text, as SLM Lab's ``spec_util.set_variables`` does:
    a numeric value also replaces a quoted ``"${KEY}"`` so that it becomes a number.

    Args:
        text: the spec file's text.
        sets: KEY -> VALUE, from ``-s KEY=VALUE``.
    """
    for key, value in sets.items():
        try:
            float(value)
            for quote in ('"', "'"):
                text = text.replace(f"{quote}${{{key}}}{quote}", value)
        except ValueError:
            pass
        text = text.replace(f"${{{key}}}", value)
    return text


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["env=Hopper-v5", "max_frame=3e6"]`` -> a dict; a ConfigError names a bad item.

    Args:
        items: the ``-s`` values.
    """
    sets: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-s {item}: expected KEY=VALUE, e.g. -s env=Hopper-v5")
        sets[key] = value
    return sets


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    text = _JSON_TRAILING_COMMA.sub(lambda m: m.group(1) if m.group(1) is not None else m[0], text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON at line {err.lineno}: {err.msg}") from None


def _placeholders(tree: Any, path: str = "") -> list[tuple[str, str]]:
    """(key, placeholder name) of every string value still holding ``${...}``."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _placeholders(v, f"{path}.{k}".lstrip("."))]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in _placeholders(v, f"{path}[{i}]")]
    if isinstance(tree, str) and (match := _PLACEHOLDER.search(tree)):
        return [(path, match.group(1))]
    return []


def read_specs(path: Path, sets: dict[str, str] | None = None) -> dict[str, Any]:
    """Every spec of a spec file, after ``${KEY}`` substitution, by name.

    Args:
        path: the spec file (``.json``, ``.yaml`` or ``.yml``).
        sets: KEY -> VALUE substitutions.
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"SPEC_FILE {path}: cannot read the file ({err.strerror})") from None
    tree = _parse(substitute(text, sets or {}), Path(path))
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of spec names to specs")
    # Keys starting with "_" hold YAML anchors (``_net: &net``), not specs.
    return {k: v for k, v in tree.items() if not str(k).startswith("_")}


def select_spec(specs: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The spec ``name`` of the file; a ConfigError lists the names when it is missing, and
    names any ``${KEY}`` left unsubstituted.

    Args:
        specs: the file's specs by name (:func:`read_specs`).
        name: SPEC_NAME.
        path: the spec file, named in messages.
    """
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"SPEC_NAME {name} is not in {path}; {hint}it holds: {', '.join(specs) or 'none'}"
        )
    spec = specs[name]
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: {name} is not a spec (a mapping with agent, env, meta)")
    left = _placeholders(spec)
    if left:
        key, placeholder = left[0]
        raise ConfigError(
            f"{name}.{key}: placeholder ${{{placeholder}}} is not substituted; "
            f"pass -s {placeholder}=VALUE"
        )
    return spec
