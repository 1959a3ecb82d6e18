"""``slm-lab import SPEC_FILE SPEC_NAME [-o PATH] [--strict] [-s KEY=VALUE …]``: write the
config equivalent to an SLM Lab spec and print what became of each key."""

import argparse
import tempfile
from pathlib import Path

from loguru import logger

from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs.importer import SpecImport, import_spec
from slm_lightning.lab.specs.load import parse_sets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm-lab import",
        description="Write the config equivalent to an SLM Lab spec, and report every key: "
        "carried over exactly, converted, or with no equivalent.",
        exit_on_error=False,
    )
    parser.add_argument("spec_file", type=Path, help="the SLM Lab spec file (.json or .yaml)")
    parser.add_argument("spec_name", help="the spec's name in the file")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="the config to write (default configs/SPEC_NAME.yaml, never replaced; a path "
        "given here is replaced if it exists)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse (exit 2, write nothing) if any key has no equivalent",
    )
    parser.add_argument(
        "-s", "--set", action="append", default=[], metavar="KEY=VALUE", help="substitute ${KEY}"
    )
    return parser


def check_instantiates(imported: SpecImport) -> None:
    """Parse and instantiate the imported config through our CLI, as a fit would; a
    ConfigError in one line if it does not."""
    from slm_lightning.lab.trial import describe_config

    with tempfile.TemporaryDirectory(prefix="slm-lab-import-") as scratch:
        path = Path(scratch) / f"{imported.name}.yaml"
        path.write_text(imported.yaml_text())
        try:
            describe_config([str(path)], [])
        except (ConfigError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"{imported.source}: {imported.name}: the imported config does not "
                f"instantiate: {first}"
            ) from None


def import_main(argv: list[str]) -> None:
    """``slm-lab import``: see the module docstring. Bad input raises ConfigError (one line,
    exit 2), as the Trainer subcommands do.

    Args:
        argv: the arguments after ``import``.
    """
    try:
        args = _parser().parse_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"slm-lab import: {err}") from None
    output = args.output or Path("configs") / f"{args.spec_name}.yaml"
    if args.output is None and output.exists():
        raise ConfigError(f"{output} exists; pass -o {output} to replace it, or -o another path")
    imported = import_spec(args.spec_file, args.spec_name, parse_sets(args.set))
    for line in imported.report.lines():
        logger.info(line)
    for line in imported.report.unsupported:
        logger.warning(f"no equivalent: {line}")
    if args.strict and imported.report.unsupported:
        raise ConfigError(
            f"--strict: {len(imported.report.unsupported)} key(s) of {args.spec_name} have no "
            f"equivalent (first: {imported.report.unsupported[0]}); nothing written"
        )
    check_instantiates(imported)
    if imported.space:
        logger.info(
            f"search: {len(imported.space)} key(s) in the space "
            f"(slm-lab {args.spec_file} {args.spec_name} search runs it)"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(imported.yaml_text())
    logger.info(
        f"wrote {output}: slm-lab trial --config {output} --sessions {imported.max_session}"
    )
