"""One spec in v5 shape -> our config and the claimed keys: the order in which the sections
are mapped (algorithm, env, budget, agent by family, meta), and the refusals of what cannot be
imported at all (multi-agent bodies, Hogwild training)."""

import copy
from typing import Any

from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs import algorithms, env_meta, soft_actor_critic
from slm_lightning.lab.specs.algorithms import Target
from slm_lightning.lab.specs.report import ImportReport, SpecKeys

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
        "sac": soft_actor_critic.soft_actor_critic,
        "random": lambda k, t: None,
    }[family](keys, target)
    settings = env_meta.meta(keys)
    keys.finish(KNOWN_KEYS)
    return keys, settings
