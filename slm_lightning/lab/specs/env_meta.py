"""``env``, ``body`` and ``meta`` of a spec onto ``model.init_args.env``, the budget, the
trainer, metrics and evaluation, and the trial/search settings of :class:`SpecImport`."""

from typing import Any

from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.spec import AtariSpec
from slm_lightning.lab.specs.nets import ARGS
from slm_lightning.lab.specs.report import SpecKeys, show

ENV = f"{ARGS}.env"
_ATARI_FIELDS = set(AtariSpec.__dataclass_fields__)
# Env keys passed on to the env constructor as they are.
_ENV_KWARGS = ("continuous",)
# SLM Lab's runtime bookkeeping, filled in by the lab, not configuration.
_RUNTIME = (
    "experiment", "trial", "session", "cuda_offset", "resume", "experiment_ts", "prepath",
    "ckpt", "git_sha", "eval_model_prepath", "predir", "training_eval",
)  # fmt: skip


def env_name(keys: SpecKeys) -> str:
    """Map ``env.name`` (legacy ids migrated as EnvSpec migrates them at run time); return
    the id written."""
    name = keys.get("env.name")
    new, kwargs = migrate_env_id(name)
    if new == name:
        keys.exact("env.name", f"{ENV}.name")
        return new
    writes: dict[str, Any] = {f"{ENV}.name": new}
    for key, value in kwargs.items():
        writes[f"{ENV}.atari.{key}" if key in _ATARI_FIELDS else f"{ENV}.kwargs.{key}"] = value
    extra = "".join(
        f", {k.rsplit('.', 2)[-2]}.{k.rsplit('.', 1)[1]} {show(v)}"
        for k, v in writes.items()
        if k != f"{ENV}.name"
    )
    keys.converted("env.name", f"{ENV}.name {new}{extra} (legacy id)", writes)
    keys.note(f"env {name} is a legacy id: {new}{extra.replace(', ', ' with ', 1)}")
    return new


def env(keys: SpecKeys, version: int) -> None:
    """Every ``env`` key but ``name``, ``num_envs`` and ``max_frame`` (read first)."""
    atari = keys.config["model"]["init_args"]["env"]["name"].startswith("ALE/")
    if keys.has("env.max_t"):
        if keys.get("env.max_t") is None:
            keys.converted("env.max_t", "(none: the env's registered time limit)")
        else:
            keys.exact("env.max_t", f"{ENV}.max_episode_steps")
    op, length = keys.get("env.frame_op"), keys.get("env.frame_op_len")
    if keys.has("env.frame_op"):
        if op in ("concat", "stack") and length:
            target = f"{ENV}.atari.stack_num" if atari else f"{ENV}.frame_stack"
            keys.converted("env.frame_op", f"{target} (the last frame_op_len observations)")
            keys.exact("env.frame_op_len", target)
        elif op is None:
            keys.converted("env.frame_op", "(none)")
        else:
            keys.unsupported("env.frame_op", f"{op}: frames here are stacked (concat or stack)")
    for source, target in (
        ("normalize_state", "normalize_obs"),
        ("normalize_obs", "normalize_obs"),
        ("normalize_reward", "normalize_reward"),
        ("clip_obs", "clip_obs"),
        ("clip_reward", "clip_reward"),
    ):
        if keys.has(f"env.{source}"):
            keys.exact(f"env.{source}", f"{ENV}.{target}")
    if keys.has("env.reward_scale"):
        scale = keys.get("env.reward_scale")
        if scale in (None, 1, 1.0):
            keys.converted("env.reward_scale", "(none: rewards unscaled here too)")
        elif scale == "sign" and atari:
            keys.converted(
                "env.reward_scale",
                f"{ENV}.atari.reward_clipping true",
                {f"{ENV}.atari.reward_clipping": True},
            )
        else:
            keys.unsupported(
                "env.reward_scale", f"{scale}: only sign clipping of Atari rewards here"
            )
    if keys.has("env.life_loss_info"):
        keys.exact("env.life_loss_info", f"{ENV}.atari.episodic_life")
    if keys.has("env.repeat_action_probability"):
        keys.exact("env.repeat_action_probability", f"{ENV}.atari.repeat_action_probability")
    if keys.has("env.image_downsize"):
        width, height = keys.get("env.image_downsize")
        keys.converted(
            "env.image_downsize",
            f"{ENV}.kwargs img_width {width}, img_height {height}",
            {f"{ENV}.kwargs.img_width": width, f"{ENV}.kwargs.img_height": height},
        )
    for key in _ENV_KWARGS:
        if keys.has(f"env.{key}"):
            keys.exact(f"env.{key}", f"{ENV}.kwargs.{key}")
    if atari and version == 4:
        atari_config = keys.config["model"]["init_args"]["env"].setdefault("atari", {})
        atari_config.setdefault("repeat_action_probability", 0.0)
        atari_config.setdefault("episodic_life", True)
        keys.note(
            "v4 Atari defaults kept: no sticky actions (repeat_action_probability 0.0), life loss as terminal (episodic_life true)"
        )
    if keys.has("env.save_frequency"):  # the oldest v4 files
        keys.exact("env.save_frequency", "checkpoint.every_n_frames")


def budget(keys: SpecKeys) -> tuple[int, int]:
    """``env.num_envs`` and ``env.max_frame`` (or the oldest files' ``max_tick``); returns
    (num_envs, max_frames)."""
    num_envs = int(keys.get("env.num_envs") or 1)
    if keys.has("env.num_envs"):
        keys.exact("env.num_envs", f"{ENV}.num_envs", num_envs)
    else:
        keys.config["model"]["init_args"]["env"]["num_envs"] = 1
        keys.note(f"env.num_envs absent: {ENV}.num_envs 1, as in SLM Lab (our default is 8)")
    frames = keys.get("env.max_frame", keys.get("env.max_tick"))
    path = "env.max_frame" if keys.has("env.max_frame") else "env.max_tick"
    if frames is None:
        return num_envs, 0
    if isinstance(frames, int) and path == "env.max_frame":
        keys.exact(path, f"{ARGS}.max_frames")
    else:
        keys.converted(
            path, f"{ARGS}.max_frames {int(frames)}", {f"{ARGS}.max_frames": int(frames)}
        )
    if keys.has("env.max_tick_unit"):
        unit = keys.get("env.max_tick_unit")
        if unit == "total_t":
            keys.converted("env.max_tick_unit", "(frames, as max_frames)")
        else:
            keys.unsupported("env.max_tick_unit", f"{unit}: budgets here are frames")
    return num_envs, int(frames)


def body(keys: SpecKeys) -> None:
    """The v4 ``body`` section of a single agent in a single env."""
    for key in ("product", "num"):
        if keys.has(f"body.{key}"):
            keys.converted(f"body.{key}", "(implicit: one agent in one env)")


def meta(keys: SpecKeys) -> dict[str, Any]:
    """``meta``; returns max_session, max_trial and search_scheduler for SpecImport."""
    out: dict[str, Any] = {"max_session": 4, "max_trial": None, "search_scheduler": None}
    if keys.has("meta.distributed"):
        keys.converted(
            "meta.distributed",
            "(implicit: each session is one process; DDP through trainer.strategy)",
        )
    if keys.has("meta.max_session"):
        out["max_session"] = int(keys.get("meta.max_session"))
        keys.converted(
            "meta.max_session",
            f"slm-lab trial with {out['max_session']} sessions (seeds 0..{out['max_session'] - 1})",
        )
    if keys.has("meta.max_trial"):
        value = keys.get("meta.max_trial")
        out["max_trial"] = None if value is None else int(value)
        keys.converted("meta.max_trial", f"slm-lab search --n-trials {show(out['max_trial'])}")
    if keys.has("meta.search_scheduler"):
        sched = keys.get("meta.search_scheduler")
        if sched:
            out["search_scheduler"] = (
                str(sched.get("name", "ASHA")) if isinstance(sched, dict) else str(sched)
            )
        keys.converted("meta.search_scheduler", "slm-lab search --pruner halving")
    for key, line in (
        ("search", "slm-lab search --sampler random"),
        ("search_resources", "slm-lab search --workers / --gpus-per-trial"),
        ("resources", "slm-lab search --workers / --gpus-per-trial"),
    ):
        if keys.has(f"meta.{key}"):
            keys.converted(f"meta.{key}", line)
    if keys.has("meta.log_frequency"):
        keys.exact("meta.log_frequency", "metrics.log_frequency")
    rigorous = keys.get("meta.rigorous_eval")
    if keys.has("meta.eval_frequency"):
        if rigorous:
            keys.exact("meta.eval_frequency", "eval.frequency")
        else:
            keys.converted(
                "meta.eval_frequency",
                "(none: without rigorous_eval SLM Lab's eval read training's episodes; our metrics rows hold them)",
            )
    if keys.has("meta.rigorous_eval"):
        if rigorous:
            keys.converted(
                "meta.rigorous_eval",
                f"eval.episodes {int(rigorous)} (one episode per eval env)",
                {"eval.episodes": int(rigorous)},
            )
        else:
            keys.converted("meta.rigorous_eval", "(off: no evaluation episodes during fit)")
    if keys.has("meta.random_seed") and keys.get("meta.random_seed") is not None:
        keys.exact("meta.random_seed", "seed_everything")
    for key in (*_RUNTIME, "random_seed"):
        if keys.unclaimed(f"meta.{key}"):
            keys.converted(f"meta.{key}", "(runtime bookkeeping of SLM Lab, not configuration)")
    return out
