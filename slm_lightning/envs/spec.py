"""The typed env settings a config holds: :class:`EnvSpec` and its Atari options."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym

# _find_spec is private in gymnasium 1.4.0: the id lookup of make/make_vec (see registry_spec).
from gymnasium.envs.registration import _find_spec

from slm_lightning.envs.names import migrate_env_id
from slm_lightning.errors import ConfigError


@dataclass
class AtariSpec:
    """Options of ale-py's vector env, used when ``env.name`` is an ``ALE/...`` id.

    The defaults are the ``-v5`` settings (Machado et al. 2018) with the DQN preprocessing.
    Rarer constructor arguments of ``AtariVectorEnv`` (``img_height``, ``img_width``,
    ``maxpool``, ``use_fire_reset``, ``thread_affinity_offset``) go in ``env.kwargs``.

    Args:
        repeat_action_probability: sticky actions: each emulator frame repeats the previous
            action with this probability (v5 default 0.25; 0 for the deterministic v4 setting,
            which legacy ``XNoFrameskip-v4`` ids always use, with the minimal action set).
        full_action_space: all 18 joystick actions instead of the game's minimal set.
        frameskip: emulator frames per agent step; observations max-pool the last two.
        stack_num: frames stacked into one observation.
        noop_max: a reset plays a random number of no-ops, at most this many.
        episodic_life: signal ``terminated`` when a life is lost (Mnih et al. 2015) so the
            value is not bootstrapped across it; the game goes on, and the reported episode
            still ends at game over. The step after a life loss is a real transition
            (the game is not reset) and is trained on.
        reward_clipping: train on ``sign(reward)``; reported returns are always raw scores.
        num_threads: C++ threads stepping the envs; 0 lets ale-py choose.
    """

    repeat_action_probability: float = 0.25
    full_action_space: bool = False
    frameskip: int = 4
    stack_num: int = 4
    noop_max: int = 30
    episodic_life: bool = False
    reward_clipping: bool = True
    num_threads: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.repeat_action_probability <= 1.0:
            raise ConfigError(
                "model.init_args.env.atari.repeat_action_probability must be in [0, 1], "
                f"got {self.repeat_action_probability}"
            )
        for key in ("frameskip", "stack_num"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"model.init_args.env.atari.{key} must be >= 1, got {getattr(self, key)}"
                )
        for key in ("noop_max", "num_threads"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"model.init_args.env.atari.{key} must be >= 0, got {getattr(self, key)}"
                )


def clip_bounds(value: float | Sequence[float] | None, key: str) -> tuple[float, float] | None:
    """A clipping range as ``(lo, hi)``: a number ``v > 0`` is ``(-v, v)``, a pair ``[lo, hi]``
    needs ``lo < hi`` (SLM Lab's ``clip_obs`` / ``clip_reward`` take both); None stays None.

    Args:
        value: the configured range.
        key: its config key, for the error.
    """
    if value is None:
        return None
    if isinstance(value, int | float):
        if not value > 0:  # NaN too
            raise ConfigError(f"{key} must be a number > 0 or a pair [lo, hi], got {value}")
        return -float(value), float(value)
    bounds = tuple(float(v) for v in value)
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ConfigError(
            f"{key} must be a number > 0 or a pair [lo, hi] with lo < hi, got {list(value)}"
        )
    return bounds


Vectorization = Literal["auto", "sync", "async", "blocks", "vector_entry_point"]

# The env spec's key as users type it on the command line and in configs.
ENV_KEY = "model.init_args.env"


@dataclass
class EnvSpec:
    """Which environment to roll out, how many copies, and how to wrap them.

    Args:
        name: gymnasium id (``CartPole-v1``, ``ALE/Pong-v5`` …); legacy ids are migrated.
        num_envs: parallel copies per process (per rank under DDP).
        vectorization: ``auto`` uses the env's native vectorised implementation when it
            has one, else sync for cheap envs, few envs or one core, else ``blocks``: one
            worker process per core, each stepping a contiguous block of sub-envs
            (:class:`~slm_lightning.envs.blocks.BlockVectorEnv`). ``async`` is gymnasium's
            one process per sub-env.
        num_workers: worker processes for ``blocks`` (at most ``num_envs``); default: the
            CPU cores, at most ``num_envs // 2``.
        num_splits: step the envs as this many equal groups in turn, so that the policy
            acts on one group while the others step in the background (double-buffered
            sampling); 1 steps all envs together. For envs that step in threads or worker
            processes (ALE, ``blocks``, ``async``), without normalisation or clipping; pays
            where acting and stepping cost about the same (Atari on a few cores).
        max_episode_steps: override the registered time limit (episodes are truncated there).
        normalize_obs: running mean/std observation normalisation (statistics checkpointed).
        normalize_reward: scale rewards by the running std of the discounted return.
        clip_obs: clip observations to ``[-clip_obs, clip_obs]`` (a number) or ``[lo, hi]``
            (a pair), after ``normalize_obs``; without normalisation the raw observations
            are clipped. None: no clipping.
        clip_reward: the same for the rewards the agent trains on, after
            ``normalize_reward`` (reported returns stay raw).
        frame_stack: stack the last N observations (gymnasium's FrameStackObservation,
            zero-padded after a reset); 1 disables it.
        kwargs: extra keyword arguments for the env constructor.
        atari: ale-py vector env options (sticky actions, episodic life, frame skip, stack
            size, threads …), used only for ``ALE/...`` ids, which always run in ale-py's
            native vector env; see :class:`~slm_lightning.envs.atari.AtariSpec`.
    """

    name: str = "CartPole-v1"
    num_envs: int = 8
    vectorization: Vectorization = "auto"
    num_workers: int | None = None
    num_splits: int = 1
    max_episode_steps: int | None = None
    normalize_obs: bool = False
    normalize_reward: bool = False
    clip_obs: float | tuple[float, float] | None = None
    clip_reward: float | tuple[float, float] | None = None
    frame_stack: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)
    atari: AtariSpec = field(default_factory=AtariSpec)

    def __post_init__(self) -> None:
        for key in ("num_envs", "num_workers", "num_splits", "frame_stack", "max_episode_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{ENV_KEY}.{key} must be >= 1, got {value}")
        if self.num_envs % self.num_splits:
            raise ConfigError(
                f"{ENV_KEY}.num_splits must divide num_envs {self.num_envs} (equal groups), "
                f"got {self.num_splits}"
            )
        for key in ("clip_obs", "clip_reward"):
            clip_bounds(getattr(self, key), f"{ENV_KEY}.{key}")

    def obs_bounds(self) -> tuple[float, float] | None:
        """``clip_obs`` as ``(lo, hi)``; None without clipping."""
        return clip_bounds(self.clip_obs, f"{ENV_KEY}.clip_obs")

    def reward_bounds(self) -> tuple[float, float] | None:
        """``clip_reward`` as ``(lo, hi)``; None without clipping."""
        return clip_bounds(self.clip_reward, f"{ENV_KEY}.clip_reward")

    @property
    def env_id(self) -> str:
        """The gymnasium id after legacy-name migration."""
        return migrate_env_id(self.name)[0]

    def registry_spec(self) -> gym.envs.registration.EnvSpec:
        """The registered gymnasium spec; a :class:`ConfigError` naming close matches if unknown.

        A ``module:EnvId`` name (gymnasium's convention for envs registered on import, e.g.
        ``my_package.envs:Corridor-v0``) imports ``module`` first. ``gym.make`` and
        ``gym.make_vec`` do that through ``gymnasium.envs.registration._find_spec``, but
        ``gym.spec`` does not (gymnasium 1.4.0), so the lookup uses the same helper; every
        process that builds an env (blocks and async workers included) goes through here.
        """
        env_id = self.env_id
        if env_id.startswith("ALE/"):
            import ale_py

            gym.register_envs(ale_py)
        try:
            return _find_spec(env_id)
        # NameNotFound / VersionNotFound / NamespaceNotFound, or a module: that does not import
        except (gym.error.Error, ModuleNotFoundError) as err:
            raise ConfigError(f"{ENV_KEY}.name: {err}".replace("\n", " ")) from None

    def reward_threshold(self) -> float | None:
        """The return at which gymnasium considers the task solved, if it defines one."""
        return self.registry_spec().reward_threshold
