"""The import report and the bookkeeping that puts every spec key in exactly one of its
lists: :class:`SpecKeys` holds the spec's leaves, and each mapping claims the leaves it reads
as exact, converted or unsupported; whatever is left unclaimed is reported as having no
equivalent. Nothing is dropped silently."""

import dataclasses
import difflib
import json
from typing import Any

# Keys SLM Lab's own code never reads, with what upstream meant.
DEAD_KEYS = {
    "clip_val_loss": "misspelt? not read by SLM Lab either; it reads clip_vloss",
    "num_gpus": "a legacy key SLM Lab no longer reads",
    "num_cpus": "a legacy key SLM Lab no longer reads",
}
# SLM Lab keys whose behaviour has no equivalent here.
NO_EQUIVALENT = (
    "symlog", "policy_loss_coef", "normalize_v_targets", "entropy_penalty_coef",
    "spectral_norm", "log_alpha_min", "log_alpha_max", "entropy_anneal", "alpha_anneal_frames",
    "actor_init_std", "critic_init_std", "out_layer_activation", "cuda_id",
)  # fmt: skip


@dataclasses.dataclass
class ImportReport:
    """What became of every key of the spec.

    Args:
        exact: keys carried over unchanged (``agent.algorithm.gamma 0.99 -> model.init_args.gamma``).
        converted: keys carried over with a change of unit or form, or implied by our design
            (the line says how).
        unsupported: keys with no equivalent (one warning each; ``--strict`` refuses them).
        notes: what the config does differently from SLM Lab although every key maps.
    """

    exact: list[str] = dataclasses.field(default_factory=list)
    converted: list[str] = dataclasses.field(default_factory=list)
    unsupported: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        """The printed report, one line each, grouped under ``exact:``, ``converted:``,
        ``no equivalent:`` and ``notes:`` (an empty group is left out)."""
        groups = [
            ("exact:", self.exact),
            ("converted:", self.converted),
            ("no equivalent:", self.unsupported),
            ("notes:", self.notes),
        ]
        return [
            line for title, items in groups if items for line in [title, *(f"  {i}" for i in items)]
        ]


def show(value: Any) -> str:
    """A spec value as a report line writes it: strings bare, the rest as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e4:
        return str(int(value))  # 1e7 floats are frame counts
    return json.dumps(value, separators=(", ", ": "))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf paths of nested mappings; lists and empty mappings are leaves."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested config, creating the mappings on the way."""
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


class SpecKeys:
    """The leaves of one spec, each to be claimed once, and the config built from them.

    Args:
        spec: the spec in v5 shape (``agent``, ``env`` mappings).
        report: where the claims are written.
    """

    def __init__(self, spec: dict[str, Any], report: ImportReport) -> None:
        self.spec = spec
        self.leaves = flatten(spec)
        self.claimed: set[str] = set()
        self.report = report
        self.config: dict[str, Any] = {}

    def _under(self, path: str) -> list[str]:
        return [k for k in self.leaves if k == path or k.startswith(f"{path}.")]

    def has(self, path: str) -> bool:
        """Whether the spec holds ``path`` (a leaf or a mapping), claimed or not."""
        return bool(self._under(path))

    def get(self, path: str, default: Any = None) -> Any:
        """The value at ``path`` (a mapping for a mapping), or ``default``."""
        node: Any = self.spec
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def unclaimed(self, path: str) -> bool:
        """Whether ``path`` is in the spec and some leaf under it is not yet claimed."""
        return any(k not in self.claimed for k in self._under(path))

    def _claim(self, path: str) -> None:
        leaves = self._under(path)
        if not leaves:
            raise KeyError(path)  # a mapping bug, never bad input
        self.claimed.update(leaves)

    def exact(self, path: str, target: str, value: Any = dataclasses.MISSING) -> None:
        """Claim ``path`` as carried over unchanged into config key ``target``.

        Args:
            path: the spec key.
            target: our dotted config key.
            value: the value to write (default: the spec's).
        """
        value = self.get(path) if value is dataclasses.MISSING else value
        self._claim(path)
        set_key(self.config, target, value)
        self.report.exact.append(f"{path} {show(self.get(path))} -> {target}")

    def converted(self, path: str, line: str, writes: dict[str, Any] | None = None) -> None:
        """Claim ``path`` as converted; ``line`` says into what and how.

        Args:
            path: the spec key.
            line: the report text after ``<path> <value> ->``.
            writes: config keys and values to set.
        """
        self._claim(path)
        for key, value in (writes or {}).items():
            set_key(self.config, key, value)
        self.report.converted.append(f"{path} {show(self.get(path))} -> {line}")

    def unsupported(self, path: str, why: str) -> None:
        """Claim ``path`` as having no equivalent, and say why."""
        self._claim(path)
        self.report.unsupported.append(f"{path}: {why}")

    def note(self, text: str) -> None:
        """Add a note to the report."""
        self.report.notes.append(text)

    def finish(self, known: dict[str, list[str]]) -> None:
        """Report every leaf no mapping claimed as having no equivalent key.

        Args:
            known: section (``agent.algorithm``) -> the keys the importer reads there, for
                "did you mean" hints.
        """
        for leaf in self.leaves:
            if leaf in self.claimed:
                continue
            # The key right below a known section (agent.net), however deep the leaf.
            sections = [s for s in known if leaf.startswith(f"{s}.")]
            section = max(sections, key=len) if sections else leaf.rpartition(".")[0]
            top = leaf[len(section) + 1 :].split(".")[0]
            if top in DEAD_KEYS:
                why = DEAD_KEYS[top]
            elif top in NO_EQUIVALENT:
                self.claimed.add(leaf)
                self.report.unsupported.append(f"{leaf}: SLM Lab's {top} has no equivalent here")
                continue
            elif top in known.get(section, []):
                why = "this algorithm has no equivalent here"
            else:
                close = difflib.get_close_matches(top, known.get(section, []), n=1, cutoff=0.8)
                why = f"misspelt {close[0]}?" if close else "not an SLM Lab key we know"
            self.claimed.add(leaf)
            self.report.unsupported.append(f"{leaf}: no equivalent key ({why})")
