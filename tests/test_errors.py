"""``explain``: jsonargparse's error trees (as jsonargparse 4.53 writes them) to one line,
without building a CLI. Through the CLI, tests/test_bad_input.py covers each kind of input."""

from argparse import ArgumentError
from typing import Literal

from slm_lightning.errors import ConfigError, ParserSchema, explain


class Toy:
    """A class a config could name: its arguments are the accepted keys."""

    def __init__(self, clip_eps: float = 0.2, mode: Literal["sync", "async"] = "sync") -> None:
        self.clip_eps, self.mode = clip_eps, mode


class Base:
    """Stands for the model's base class (RLAlgorithm in the CLI)."""


def tree(leaf: str, class_path: str = "tests.test_errors.Toy") -> ArgumentError:
    """The error jsonargparse raises for ``--model.init_args.…`` when ``leaf`` went wrong."""
    text = f"""Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'tests.test_errors.Base'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path '{class_path}':
        {leaf}
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>"""
    return ArgumentError(None, text)


def test_an_error_tree_becomes_the_key_as_typed_and_what_is_allowed() -> None:
    assert (
        explain(tree("Option 'clip_epz' is not accepted"), [])
        == "model.init_args.clip_epz: unknown key for Toy; did you mean clip_eps? "
        "accepted: clip_eps, mode"
    )
    literal = """Parser key "mode":
          Expected a typing.Literal['sync', 'async']. Got value: fast"""
    assert (
        explain(tree(literal), [])
        == "model.init_args.mode: 'fast' is not allowed; choose one of sync, async"
    )
    number = """Parser key "clip_eps":
          Expected a <class 'float'>. Got value: wide"""
    assert explain(tree(number), []) == "model.init_args.clip_eps: expected a number, got 'wide'"


def test_the_schema_names_sections_and_the_missing_algorithm() -> None:
    typo = ArgumentError(None, "unrecognized arguments: --metrics.mdoe=async")
    assert explain(typo, []) == "metrics.mdoe: unknown key"  # nothing known of `metrics`
    schema = ParserSchema(model_base=Base, sections={"metrics": Toy})
    assert (
        explain(typo, [], schema)
        == "metrics.mdoe: unknown key for Toy; did you mean mode? accepted: clip_eps, mode"
    )
    # jsonargparse tried the base class itself: no config named an algorithm.
    base = tree("Option 'env' is not accepted", class_path="tests.test_errors.Base")
    args = ["fit", "--config", "callbacks/wandb.yaml"]
    assert explain(base, args, schema).startswith(
        "model: no algorithm is set; callbacks/wandb.yaml is a preset that adds to a config"
    )
    assert explain(base, args) == "model.init_args.env: unknown key for Base; accepted:"


def test_a_config_error_raised_inside_instantiation_is_the_line() -> None:
    try:
        try:
            raise ConfigError("model.init_args.clip_eps must be in (0, 1),\ngot 1.5")
        except ConfigError as err:
            raise ValueError("Problem with given class_path 'Toy':\n  a long tree") from err
    except ValueError as wrapped:
        line = explain(wrapped, [])
    assert line == "model.init_args.clip_eps must be in (0, 1), got 1.5"
