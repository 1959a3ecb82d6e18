"""SLM Lab spec -> our config: :func:`import_spec` reads a spec (``load.py``), brings v4 into
v5's shape, maps every key (``env_meta.py``, ``algorithms.py``, ``nets.py``), translates the
search section (``search_keys.py``) and reports what became of each key (``report.py``)."""

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs import algorithms, env_meta
from slm_lightning.lab.specs.algorithms import Target
from slm_lightning.lab.specs.load import read_specs, select_spec
from slm_lightning.lab.specs.report import ImportReport, SpecKeys

__all__ = ["ImportReport", "SpecImport", "import_spec", "map_spec"]

# The keys the importer reads, by section, for "did you mean" hints on unknown ones.
KNOWN_KEYS = {
    "agent.algorithm": [
        "name", "action_pdtype", "action_policy", "explore_var_spec", "gamma", "lam",
        "num_step_returns", "entropy_coef_spec", "clip_eps_spec", "val_loss_coef", "clip_vloss",
        "time_horizon", "minibatch_size", "training_epoch", "training_frequency",
        "training_iter", "training_batch_iter", "training_start_step", "center_return",
        "normalize_advantages", "policy_delay", "alpha_lr", "target_entropy", "fixed_alpha",
    ],
    "agent.memory": ["name", "batch_size", "max_size", "use_cer", "alpha", "epsilon"],
    "agent.net": [
        "type", "shared", "hid_layers", "hid_layers_activation", "conv_hid_layers",
        "fc_hid_layers", "clip_grad_val", "loss_spec", "optim_spec", "actor_optim_spec",
        "critic_optim_spec", "use_same_optim", "lr_scheduler_spec", "update_type",
        "update_frequency", "polyak_coef", "init_fn", "normalize", "batch_norm", "gpu",
    ],
    "env": [
        "name", "num_envs", "max_t", "max_frame", "frame_op", "frame_op_len",
        "normalize_state", "normalize_obs", "normalize_reward", "clip_obs", "clip_reward",
        "reward_scale", "life_loss_info", "repeat_action_probability", "image_downsize",
    ],
    "meta": [
        "distributed", "eval_frequency", "rigorous_eval", "log_frequency", "max_session",
        "max_trial", "search_scheduler", "search_resources",
    ],
}  # fmt: skip
_HOGWILD = {"ActorCritic": "A3C", "PPO": "DPPO"}


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


def to_v5(spec: dict[str, Any], name: str) -> tuple[dict[str, Any], int]:
    """The spec in v5's shape (``agent`` and ``env`` mappings) and its version; a one-line
    refusal for several agents or envs (multi-agent bodies)."""
    spec = copy.deepcopy(spec)
    version = 4 if isinstance(spec.get("agent"), list) or "body" in spec else 5
    for section in ("agent", "env"):
        value = spec.get(section)
        if isinstance(value, list):
            if len(value) != 1:
                raise ConfigError(
                    f"{name}.{section}: {len(value)} {section}s (multi-agent bodies) are not "
                    "supported; a spec here has one agent in one env"
                )
            spec[section] = value[0]
        if not isinstance(spec.get(section), dict):
            raise ConfigError(f"{name}: a spec needs an {section} section (a mapping)")
    body = spec.get("body") or {}
    if body.get("product", "outer") != "outer" or body.get("num", 1) != 1:
        raise ConfigError(
            f"{name}.body: product {body.get('product')} num {body.get('num')} (multi-agent "
            "bodies) is not supported; a spec here has one agent in one env (outer, 1)"
        )
    return spec, version


def _max_episode_steps(spec: dict[str, Any]) -> int | None:
    from slm_lightning.envs.spec import EnvSpec

    if spec["env"].get("max_t"):
        return int(spec["env"]["max_t"])
    try:
        return EnvSpec(name=spec["env"]["name"]).registry_spec().max_episode_steps
    except ConfigError:
        return None


def map_spec(spec: dict[str, Any], version: int, name: str) -> tuple[SpecKeys, dict[str, Any]]:
    """Map one spec in v5 shape: the claimed keys (with the config and report) and the
    trial/search settings of meta.

    Args:
        spec: the spec (:func:`to_v5`), search section included (it is left to the caller).
        version: 4 or 5.
        name: SPEC_NAME, for messages.
    """
    spec = {k: v for k, v in spec.items() if k not in ("search", "name")}
    keys = SpecKeys(spec, ImportReport())
    algorithm = keys.get("agent.algorithm.name")
    distributed = keys.get("meta.distributed", False)
    if distributed not in (False, None):
        kind = _HOGWILD.get(algorithm, "Hogwild")
        raise ConfigError(
            f"{name}: agent.algorithm.name {algorithm} with meta.distributed {distributed} "
            f"(Hogwild {kind}) is not supported; set meta.distributed false"
        )
    if not isinstance(keys.get("env.name"), str):
        raise ConfigError(f"{name}.env.name: a gymnasium id is required")
    keys.config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu"},
        "model": {"class_path": None, "init_args": {"env": {}}},
    }
    cls, family = algorithms.target_of(keys)
    env_meta.env_name(keys)
    num_envs, max_frames = env_meta.budget(keys)
    steps = _max_episode_steps(spec) if family == "pg" else None
    target = Target(cls, family, num_envs, max_frames, steps)
    env_meta.env(keys, version)
    env_meta.body(keys)
    if keys.has("agent.name"):
        keys.converted("agent.name", "(implicit: the algorithm names the agent)")
    {
        "pg": algorithms.policy_gradient,
        "dqn": algorithms.q_learning,
        "sarsa": algorithms.q_learning,
        "sac": algorithms.soft_actor_critic,
        "random": lambda k, t: None,
    }[family](keys, target)
    settings = env_meta.meta(keys)
    keys.finish(KNOWN_KEYS)
    return keys, settings


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
    from slm_lightning.lab.specs.search_keys import translate_search

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
