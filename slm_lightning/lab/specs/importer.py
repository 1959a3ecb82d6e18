"""SLM Lab spec -> our config: :func:`import_spec` reads a spec (``load.py``), brings v4 into
v5's shape, maps every key (``env_meta.py``, ``algorithms.py``, ``nets.py``), translates the
search section (``search_keys.py``) and reports what became of each key (``report.py``)."""

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs.load import read_specs, select_spec
from slm_lightning.lab.specs.mapping import map_spec, to_v5
from slm_lightning.lab.specs.report import ImportReport
from slm_lightning.lab.specs.search_keys import translate_search

__all__ = ["ImportReport", "SpecImport", "import_spec"]


class _NoAliases(yaml.SafeDumper):
    """Writes a value met twice (actor and critic bodies) twice, not as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclasses.dataclass
class SpecImport:
    """One SLM Lab spec as our config, with what the lab's trial and search need.

    Args:
        source: the spec file.
        name: SPEC_NAME.
        version: 4 (lists of agents and envs, a body section) or 5.
        config: our config as a YAML tree (seed_everything, trainer, model, metrics, eval …).
        report: what became of every key.
        max_session: meta.max_session (4 when absent): the sessions of ``train``.
        max_trial: meta.max_trial: the trials of ``search``.
        search_scheduler: the name of meta.search_scheduler, if any (``--pruner halving``).
        space: the search section as our space (dotted key -> ``{uniform: [lo, hi]}`` …);
            None without a search section.
    """

    source: Path
    name: str
    version: int
    config: dict[str, Any]
    report: ImportReport
    max_session: int = 4
    max_trial: int | None = None
    search_scheduler: str | None = None
    space: dict[str, dict] | None = None

    def yaml_text(self) -> str:
        """The config as YAML, after a header comment naming the source spec file and name
        and listing the keys that have no equivalent."""
        header = [
            f"# Imported by `slm-lab import` from {self.source} ({self.name}, "
            f"SLM Lab v{self.version} spec).",
            f"# Keys: {len(self.report.exact)} exact, {len(self.report.converted)} converted, "
            f"{len(self.report.unsupported)} with no equivalent"
            + (":" if self.report.unsupported else "."),
            *(f"#   {line}" for line in self.report.unsupported),
        ]
        body = yaml.dump(
            self.config, Dumper=_NoAliases, sort_keys=False, default_flow_style=None, width=100
        )
        return "\n".join(header) + "\n" + body


def import_spec(path: Path, name: str, sets: dict[str, str] | None = None) -> SpecImport:
    """Read SPEC_FILE, pick SPEC_NAME, substitute ``${KEY}`` placeholders from ``sets`` and
    map the spec onto our config.

    An unsubstituted placeholder, an unsupported algorithm (SIL, PPOSIL, Hogwild A3C/DPPO)
    or several agents/envs is a one-line ConfigError; so is any other spec we cannot read.

    Args:
        path: the spec file (v4 JSON, v5 JSON or YAML).
        name: SPEC_NAME.
        sets: KEY -> VALUE for ``${KEY}`` placeholders (``-s KEY=VALUE``).
    """
    path = Path(path)
    raw = select_spec(read_specs(path, sets), name, path)
    spec, version = to_v5(raw, name)
    try:
        keys, settings = map_spec(spec, version, name)
    except (TypeError, AttributeError, KeyError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: {name}: a value of an unexpected type ({err})") from None
    space = None
    if raw.get("search"):
        space = translate_search(spec, version, name, raw["search"], keys)
    return SpecImport(
        source=path,
        name=name,
        version=version,
        config=_ordered(keys.config),
        report=keys.report,
        space=space,
        **settings,
    )


def _ordered(config: dict[str, Any]) -> dict[str, Any]:
    """The config's sections in the order of our shipped configs, env and budget first."""
    order = ["seed_everything", "trainer", "model", "metrics", "checkpoint", "eval"]
    out = {k: config[k] for k in order if k in config}
    out.update({k: v for k, v in config.items() if k not in out})
    args = out["model"]["init_args"]
    first = {k: args[k] for k in ("env", "max_frames") if k in args}
    out["model"]["init_args"] = first | {k: v for k, v in args.items() if k not in first}
    return out
