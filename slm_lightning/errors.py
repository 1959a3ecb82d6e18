"""The exception every bad setting raises, and the one-line explanation of any bad input.

A setting our code checks raises :class:`ConfigError` with a line naming the key as the user
types it. jsonargparse reports what it rejects (an unknown key, a value of the wrong type, an
unknown class) as a multi-line tree; :func:`explain` turns either into the one line the CLI
prints. This module imports nothing of the package: what it must know about the parser (the
model's base class, the classes behind the top-level sections) comes in a
:class:`ParserSchema`.
"""

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
import typing
from argparse import ArgumentError
from collections.abc import Mapping
from pathlib import Path

import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed.

    The CLI prints the message alone and exits with status 2.
    """


@dataclasses.dataclass(frozen=True)
class ParserSchema:
    """What :func:`explain` needs to know about the CLI's parser to name keys and classes.

    Args:
        model_base: the class ``model`` is configured as a subclass of; an error tree that
            tried this base class itself means no config named an algorithm.
        sections: the class behind each top-level section (``trainer``, ``metrics`` …), whose
            arguments are the accepted keys listed for a typo there.
        options: the subcommands' top-level options (``ckpt_path``, ``seed_everything`` …,
            without dashes), listed for a typo among them.
    """

    model_base: type | None = None
    sections: Mapping[str, type] = dataclasses.field(default_factory=dict)
    options: tuple[str, ...] = ()


def config_error_in_chain(err: BaseException) -> ConfigError | None:
    """The ConfigError that caused ``err`` (itself, or one in its ``__cause__``/``__context__``
    chain: jsonargparse wraps what a class raises while it is instantiated), or None.

    Args:
        err: the error the CLI caught.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# jsonargparse (4.x) reports a bad value as an indented tree: a `Parser key "x":` line per
# nesting level, a `Problem with given class_path 'C':` line where a class was tried, one
# line per alternative of a Union, and the failing check at the leaves.
_TREE_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_TREE_CLASS = re.compile(r"^Problem with given class_path '([\w.]+)':\s*(.*)$")
_TREE_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value"
    r"|Expected a <class 'NoneType'>|Expected a path but|Expected a dot import path string"
    r"|Expected a <class '\w+'>$)"
)
_UNKNOWN_KEY = (
    re.compile(r"^Option '([\w.]+)' is not accepted"),
    re.compile(r"^Group '([\w.]+)' does not accept option '([\w.]+)'"),
    re.compile(r"^Key ['\"]([\w.]+)['\"] is not expected"),
    re.compile(r"^unrecognized arguments: --([\w.]+)"),
)
_BAD_VALUE = re.compile(r"^Expected a (.+?)\. Got value: (.*)$")
_BAD_NUMBER = re.compile(r"^Not of type \w+: (.*)$")
_NO_CLASS = re.compile(r"^(module '[\w.]+' has no attribute '\w+'|No module named .*)$")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}

Segment = tuple[str, str]  # ("key", "env.num_envs") or ("class", "slm_lightning.algorithms.PPO")


def _tree_lines(text: str) -> list[tuple[tuple[Segment, ...], str]]:
    """Each line of a jsonargparse error tree, with the keys and classes above it."""
    stack: list[tuple[int, Segment]] = []
    lines: list[tuple[tuple[Segment, ...], str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        line = line.removeprefix("- ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = tuple(segment for _, segment in stack)
        if match := _TREE_KEY.match(line) or _TREE_CLASS.match(line):
            kind = "key" if line.startswith("Parser key") else "class"
            stack.append((indent, (kind, match.group(1))))
            path = (*path, (kind, match.group(1)))
            line = match.group(2)  # a message on the same line, as in `Parser key "x": ...`
        if line:
            lines.append((path, line))
    return lines


def _describe_value(value: str) -> str:
    """A value from the tree as the message shows it: 8.5 as is, a word quoted."""
    return value if re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", value) else repr(value)


def _type_name(name: str) -> str:
    """``an integer`` for ``int``, ``null`` for ``NoneType``, ``a Schedule`` for a class."""
    if name == "NoneType":
        return "null"
    return _TYPE_NAMES.get(name, f"a {name.rpartition('.')[2]}")


def _union_message(
    lines: list[tuple[tuple[Segment, ...], str]], schema: ParserSchema
) -> str | None:
    """``<key>: expected an integer or null, got 'foo'`` for the innermost Union whose every
    alternative rejected the value's type."""
    unions = [(path, line) for path, line in lines if line.startswith("Subtypes: ")]
    if not unions:
        return None
    path, subtypes = max(unions, key=lambda item: len(item[0]))
    given = [line for p, line in lines if p == path and line.startswith("Given value: ")]
    names = [_type_name(name) for name in re.findall(r"<class '([\w.]+)'>", subtypes)]
    value = _describe_value(given[-1].removeprefix("Given value: ")) if given else "?"
    return f"{_resolve_path(path, schema)[0]}: expected {' or '.join(names)}, got {value}"


def _leaf_rank(leaf: str) -> int:
    """How well a leaf explains the error when a Union tried several types (lower wins): an
    unknown key of the class the value was meant for; a check that failed on a value of the
    right type (a bound, our own validation); a value of the wrong type; a class that could
    not be imported."""
    if any(pattern.match(leaf) for pattern in _UNKNOWN_KEY):
        return 0
    if _NO_CLASS.match(leaf):
        return 3
    if _BAD_VALUE.match(leaf) or (
        (match := _BAD_NUMBER.match(leaf)) and match.group(1).startswith("expected")
    ):
        return 2
    return 1


def import_class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names, or None if it cannot be imported.

    Args:
        class_path: ``package.module.Class``.
    """
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if inspect.isclass(cls) else None


def _class_of_annotation(owner: type, name: str) -> type | None:
    """The class an ``__init__`` argument of ``owner`` is typed with (``EnvSpec`` for ``env``,
    ``MLPSpec`` for ``actor: MLPSpec | None``), or None."""
    try:
        hint = typing.get_type_hints(owner.__init__).get(name)
    except (NameError, TypeError):
        return None
    return next((t for t in typing.get_args(hint) or (hint,) if inspect.isclass(t)), None)


def _accepted_keys(owner: type) -> list[str]:
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = inspect.signature(owner).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind not in variadic]


def _resolve_path(
    path: tuple[Segment, ...], schema: ParserSchema, key: str = ""
) -> tuple[str, type | None]:
    """The key as the user types it (``model.init_args.actor.activation``) and the class that
    owns its last part.

    Args:
        path: the keys and classes above a leaf of the error tree.
        schema: the classes behind the parser's top-level sections.
        key: a dotted key below the path (an unknown key the leaf names).
    """
    parts: list[str] = []
    segments = [*path, ("key", key)] if key else list(path)
    top = segments[0][1].partition(".")[0] if segments and segments[0][0] == "key" else ""
    owner: type | None = schema.sections.get(top)
    if owner is not None:  # `metrics.log_frequency`: the section's class owns the rest
        rest = segments[0][1].partition(".")[2]
        segments = [*([("key", rest)] if rest else []), *segments[1:]]
        parts.append(top)
    for index, (kind, value) in enumerate(segments):
        if kind == "class":
            owner = import_class(value)
            # A subclass is configured as class_path + init_args; a dataclass by its fields.
            if owner is None or not dataclasses.is_dataclass(owner):
                parts.append("init_args")
            continue
        names = value.split(".")
        parts.extend(names)
        last = index == len(segments) - 1
        for name in names[:-1] if last else names:  # walk into dataclass-typed arguments
            owner = _class_of_annotation(owner, name) if owner is not None else None
    if parts == ["config"]:  # the config file option
        return "--config", None
    return ".".join(parts), owner


def _unknown_key_message(key: str, owner: type | None, options: tuple[str, ...] = ()) -> str:
    """``<key>: unknown key for <Class>; did you mean …? accepted: …``, or for a top-level
    option ``--<key>: unknown option; did you mean --…? options: …``."""
    if owner is None and "." not in key and options:
        close = difflib.get_close_matches(key, options, n=2)
        hint = f"did you mean {', '.join(f'--{name}' for name in close)}? " if close else ""
        return f"--{key}: unknown option; {hint}options: {', '.join(f'--{o}' for o in options)}"
    if owner is None:
        return f"{key}: unknown key"
    leaf = key.rpartition(".")[2]
    accepted = _accepted_keys(owner)
    close = difflib.get_close_matches(leaf, accepted, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else ""
    if not close or len(accepted) <= 12:  # a long list only when nothing is close
        hint = f"{hint} accepted: {', '.join(accepted)}".strip()
    return f"{key}: unknown key for {owner.__name__}; {hint}"


def _bad_value_message(key: str, expected: str, value: str) -> str:
    """``<key>: expected an integer, got 'sixteen'`` or, for a Literal, the allowed values."""
    if expected.startswith(("typing.Literal[", "Literal[")):
        choices = re.findall(r"'([^']*)'", expected)
        return f"{key}: {value!r} is not allowed; choose one of {', '.join(choices)}"
    name = re.fullmatch(r"<class '([\w.]+)'>", expected)
    wanted = _type_name(name.group(1)) if name else expected
    return f"{key}: expected {wanted}, got {_describe_value(value)}"


def _unknown_class_message(key: str, class_path: str, text: str) -> str:
    """``model: unknown class_path …; did you mean …? choose one of …`` from the Union's base."""
    base = re.search(r"Subtypes: \[<class '([\w.]+)'>", text)
    base_class = import_class(base.group(1)) if base else None
    if base_class is None:
        return f"{key}: unknown class_path {class_path}"
    package = base_class.__module__.rpartition(".")[0] or base_class.__module__
    names = sorted(
        name
        for name, value in vars(importlib.import_module(package)).items()
        if inspect.isclass(value) and issubclass(value, base_class) and value is not base_class
    )
    choices = [f"{package}.{name}" for name in names]
    close = difflib.get_close_matches(class_path, choices, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}: unknown class_path {class_path}; {hint}choose one of {', '.join(names)} (in {package})"


def _config_files(args: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    files = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def _no_algorithm_message(args: list[str]) -> str:
    """``model: no algorithm is set; …`` naming the presets given without a config."""
    presets = [f for f in _config_files(args) if Path(f).parent.name == "callbacks"]
    if not presets:
        return (
            "model: no algorithm is set; give a config (slm-lab fit --config "
            "configs/ppo_cartpole.yaml) or a class (--model slm_lightning.algorithms.PPO)"
        )
    given = " ".join(f"--config {f}" for f in presets)
    what = "is a preset that adds" if len(presets) == 1 else "are presets that add"
    return (
        f"model: no algorithm is set; {', '.join(presets)} {what} to a config: give the "
        f"config first, e.g. slm-lab fit --config configs/ppo_cartpole.yaml {given}"
    )


def _not_a_mapping_message(args: list[str]) -> str | None:
    """``--config <file>: …`` for the config file that is empty or not a YAML mapping."""
    for name in _config_files(args):
        try:
            content = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if content is None:
            return f"--config {name}: the file is empty; a config is a YAML mapping (model:, trainer:, …)"
        if not isinstance(content, dict):
            return (
                f"--config {name}: expected a YAML mapping (model:, trainer:, …), "
                f"got a {type(content).__name__}"
            )
    return None


def _explain_tree(text: str, args: list[str], schema: ParserSchema) -> str | None:
    """One line for a jsonargparse error tree, or None if it does not look like one."""
    lines = _tree_lines(text)
    leaves = [(path, line) for path, line in lines if not _TREE_NOISE.match(line)]
    if not leaves:
        return _union_message(lines, schema)
    classes = {value for path, _ in leaves for kind, value in path if kind == "class"}
    if schema.model_base is not None and any(
        import_class(value) is schema.model_base for value in classes
    ):
        return _no_algorithm_message(args)  # the base class: no config named an algorithm
    path, leaf = min(leaves, key=lambda item: (_leaf_rank(item[1]), -len(item[0])))
    for pattern in _UNKNOWN_KEY:
        if match := pattern.match(leaf):
            key, owner = _resolve_path(path, schema, ".".join(match.groups()))
            return _unknown_key_message(key, owner, schema.options)
    key, _ = _resolve_path(path, schema)
    if match := _BAD_VALUE.match(leaf):
        return _bad_value_message(key, match.group(1), match.group(2))
    if match := _BAD_NUMBER.match(leaf):
        return f"{key}: {match.group(1)}"
    if _NO_CLASS.match(leaf) and path and path[-1][0] == "class":
        return _unknown_class_message(_resolve_path(path[:-1], schema)[0], path[-1][1], text)
    if match := re.match(r"^(?:\w+Error: )?(.*)$", leaf):
        return f"{key}: {match.group(1)}" if key else match.group(1)
    return None


def explain(
    err: BaseException, args: list[str] | None = None, schema: ParserSchema | None = None
) -> str:
    """Condense a configuration error into one line naming the key and what is allowed.

    jsonargparse reports a bad value as a multi-line tree over the Unions it tried (the
    model's class, ``float | Schedule`` …); users need the key as they type it
    (``model.init_args.env.vectorization``) and what is allowed there: the accepted keys of
    the class that owns a typo'd key, the values of a ``Literal``, the type of a number.

    Args:
        err: the error raised while parsing or instantiating the config.
        args: the command line, to name the config file an error comes from (default
            ``sys.argv[1:]``).
        schema: what the parser configures (the CLI passes its own); without it, keys are
            named but a typo's accepted keys are not listed for the top-level sections.
    """
    args = list(sys.argv[1:] if args is None else args)
    schema = ParserSchema() if schema is None else schema
    config_error = config_error_in_chain(err)
    if config_error is not None:
        return str(config_error).replace("\n", " ")
    text = str(err)
    if isinstance(err, MisconfigurationException):
        return f"trainer: {text}"
    if isinstance(err, ArgumentError):
        if re.search(r"arguments are required: (\w+\.)?model\b", text):
            return _no_algorithm_message(args)
        if text.startswith("Unexpected config:") and (message := _not_a_mapping_message(args)):
            return message
        if (line := _explain_tree(text, args, schema)) is not None:
            return line
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__
