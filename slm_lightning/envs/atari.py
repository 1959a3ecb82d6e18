"""Atari through ale-py's native C++ vector env, with raw full-game scores as episode returns.

``ale_py.vector_env.AtariVectorEnv`` steps its sub-envs in C++ threads and does the standard
preprocessing itself (Mnih et al. 2015; Machado et al. 2018): frame skip with a max-pool over
the last two frames, 84x84 grayscale, a stack of the last frames, up to ``noop_max`` no-ops
and FIRE after a reset. Observations are uint8 ``(num_envs, stack_num, 84, 84)``; the nets
convert them to float and divide by 255 on the training device.

:class:`AtariGameEpisodes` sits directly on the native env and

* records each episode's raw game score and length, summed over all lives, into
  ``info["episode"]`` / ``info["_episode"]`` at game over (what gymnasium's
  ``RecordEpisodeStatistics`` would write), so the reported return is the game score;
* then clips the training reward to its sign (ale-py's own clipping would hide the raw score);
* with ``episodic_life`` also signals ``terminated`` on each life lost while the game goes on,
  and marks those steps in ``info[LIFE_LOSS]``: the game is not reset after them, so the
  rollouts keep the next step as a real transition (:func:`~slm_lightning.envs.factory.next_step_resets`).
"""

import inspect
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper
from loguru import logger

from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.spec import AtariSpec, EnvSpec
from slm_lightning.envs.split import BackgroundStep
from slm_lightning.errors import ConfigError

# info key: sub-envs whose ``terminated`` only marks a lost life (episodic_life); the game goes
# on, so their next step is a real transition, not a NEXT_STEP reset.
LIFE_LOSS = "life_loss"

# Constructor arguments of AtariVectorEnv that AtariSpec or the wrapper own, or that our
# rollout cannot work with; every other keyword may be given through env.kwargs.
_RESERVED_KWARGS = {
    "game": "it comes from env.name",
    "num_envs": "use env.num_envs",
    "autoreset_mode": "the rollout needs NEXT_STEP",
    "batch_size": "the rollout steps all envs together",
    "reward_clipping": "use env.atari.reward_clipping",
    "episodic_life": "use env.atari.episodic_life",
    "life_loss_info": "use env.atari.episodic_life",
    "max_num_frames_per_episode": "use env.max_episode_steps",
    "continuous": "only discrete Atari actions are supported",
    "grayscale": "the conv nets take (stack, height, width) grayscale frames",
    "stack_num": "use env.atari.stack_num",
    "frameskip": "use env.atari.frameskip",
    "noop_max": "use env.atari.noop_max",
    "num_threads": "use env.atari.num_threads",
    "repeat_action_probability": "use env.atari.repeat_action_probability",
    "full_action_space": "use env.atari.full_action_space",
}


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` (after migration) is an ale-py id built by :func:`make_atari_env`."""
    return migrate_env_id(env_id)[0].startswith("ALE/")


class AtariGameEpisodes(VectorWrapper):
    """Raw full-game episode statistics, sign-clipped training rewards and life-loss signals.

    Must wrap the native env directly: it reads the raw rewards and ``info["lives"]``, and
    relies on NEXT_STEP autoreset (the step after a game over is the reset; its reward is 0
    and it is not counted in the episode length).

    Args:
        env: an ``AtariVectorEnv`` created with ``reward_clipping=False``.
        episodic_life: also set ``terminated`` on steps where a life was lost, and mark the
            ones where the game goes on in ``info[LIFE_LOSS]``.
        reward_clipping: return ``sign(reward)`` instead of the raw reward.
    """

    def __init__(self, env: VectorEnv, episodic_life: bool, reward_clipping: bool) -> None:
        super().__init__(env)
        self.episodic_life = episodic_life
        self.reward_clipping = reward_clipping
        n = env.num_envs
        self.episode_returns = np.zeros(n, dtype=np.float64)
        self.episode_lengths = np.zeros(n, dtype=np.int64)
        self.lives = np.zeros(n, dtype=np.int64)
        self.prev_game_over = np.zeros(n, dtype=bool)

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if isinstance(seed, np.integer):  # AtariVectorEnv accepts a python int, not np.int64
            seed = int(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        mask = (options or {}).get("reset_mask", np.ones(self.num_envs, dtype=bool))
        self.episode_returns[mask] = 0.0
        self.episode_lengths[mask] = 0
        self.lives[mask] = info["lives"][mask]
        self.prev_game_over[mask] = False
        return obs, info

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        playing = ~self.prev_game_over  # the others were reset by this step (NEXT_STEP)
        self.episode_returns[self.prev_game_over] = 0.0
        self.episode_lengths[self.prev_game_over] = 0
        self.episode_returns[playing] += rewards[playing]
        self.episode_lengths[playing] += 1
        lives = info["lives"]
        life_lost = playing & (lives < self.lives)
        self.lives[:] = lives
        game_over = terminated | truncated
        if game_over.any():
            info["episode"] = {
                "r": np.where(game_over, self.episode_returns, 0.0),
                "l": np.where(game_over, self.episode_lengths, 0),
            }
            info["_episode"] = game_over
        self.prev_game_over = game_over
        if self.episodic_life:
            # The native env resets only at game over or its frame limit (ale-py 0.12.1, with
            # its own episodic_life off), so after a life lost short of that the stacks go on:
            # the rollouts must not mask the next step as an autoreset.
            info[LIFE_LOSS] = life_lost & ~game_over
            terminated = terminated | life_lost
        rewards = np.sign(rewards) if self.reward_clipping else rewards
        return obs, rewards.astype(np.float32), terminated, truncated, info


def _game(registry_spec: gym.envs.registration.EnvSpec) -> str:
    return str(registry_spec.kwargs["game"])


def _native_kwargs(spec: EnvSpec, registry_spec: gym.envs.registration.EnvSpec) -> dict[str, Any]:
    """AtariVectorEnv keyword arguments for ``spec`` (an :class:`EnvSpec`), validated."""
    from ale_py.vector_env import AtariVectorEnv

    allowed = set(inspect.signature(AtariVectorEnv.__init__).parameters) - {"self"}
    for key in spec.kwargs:
        if key in _RESERVED_KWARGS:
            raise ConfigError(
                f"model.init_args.env.kwargs.{key} is not allowed for ALE envs: {_RESERVED_KWARGS[key]}"
            )
        if key not in allowed:
            extra = sorted(allowed - set(_RESERVED_KWARGS))
            raise ConfigError(
                f"model.init_args.env.kwargs.{key}: unknown AtariVectorEnv argument; allowed: {extra}"
            )
    if spec.frame_stack != 1:
        raise ConfigError(
            f"model.init_args.env.frame_stack must be 1 for ALE envs (got {spec.frame_stack}); "
            "frames are stacked natively, set env.atari.stack_num"
        )
    atari: AtariSpec = spec.atari
    max_frames = registry_spec.kwargs.get("max_num_frames_per_episode", 108_000)
    if spec.max_episode_steps is not None:
        max_frames = spec.max_episode_steps * atari.frameskip
    return {
        "repeat_action_probability": atari.repeat_action_probability,
        "full_action_space": atari.full_action_space,
        "frameskip": atari.frameskip,
        "stack_num": atari.stack_num,
        "noop_max": atari.noop_max,
        "num_threads": atari.num_threads,
        "max_num_frames_per_episode": max_frames,
        **migrate_env_id(spec.name)[1],  # XNoFrameskip-v4: no sticky actions, as in v4
        **spec.kwargs,
        # Clipping happens in AtariGameEpisodes, after the raw score has been recorded, and
        # life losses are signalled there: ale-py's episodic_life restarts the whole game at
        # each life lost (ale-py 0.12), which would cap the score at one life.
        "reward_clipping": False,
        "episodic_life": False,
        "life_loss_info": False,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }


def make_atari_env(
    spec: EnvSpec,
    registry_spec: gym.envs.registration.EnvSpec,
    num_envs: int | None = None,
    background: bool = False,
    log: bool = True,
) -> AtariGameEpisodes:
    """Build ale-py's vector env for ``spec`` (an :class:`EnvSpec` with an ``ALE/`` id),
    wrapped in :class:`AtariGameEpisodes`; not yet reset.

    Args:
        spec: the environment spec; its ``atari`` field holds the Atari options.
        registry_spec: the registered gymnasium spec of ``spec.name`` (gives the ROM name).
        num_envs: override ``spec.num_envs`` (e.g. 1 to probe the spaces).
        background: put a :class:`~slm_lightning.envs.split.BackgroundStep` between the
            native env and the wrapper (a group of a split env).
        log: log the env's settings (unless ``num_envs`` is given).
    """
    from ale_py.vector_env import AtariVectorEnv

    kwargs = _native_kwargs(spec, registry_spec)
    env = AtariVectorEnv(_game(registry_spec), num_envs or spec.num_envs, **kwargs)
    if background:
        env = BackgroundStep(env)
    if num_envs is None and log:
        legacy = migrate_env_id(spec.name)[1]  # the settings in force, not the spec's
        logger.info(
            f"env {registry_spec.id}: {spec.num_envs} envs, ale-py AtariVectorEnv "
            f"(num_threads={spec.atari.num_threads or 'auto'}, {replace(spec.atari, **legacy)})"
        )
    return AtariGameEpisodes(
        env, episodic_life=spec.atari.episodic_life, reward_clipping=spec.atari.reward_clipping
    )


class FireReset(gym.Wrapper):
    """Press FIRE for one emulator frame after each reset, as ale-py's vector env does with
    ``use_fire_reset`` (games such as Breakout wait for FIRE to serve). For an env with
    ``frameskip=1``, under gymnasium's ``AtariPreprocessing``, which then plays its no-ops."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        self.env.reset(seed=seed, options=options)
        fire = self.env.unwrapped.get_action_meanings().index("FIRE")
        obs, _, terminated, truncated, info = self.env.step(fire)
        if terminated or truncated:  # never seen; ale-py's vector env would not notice either
            return self.env.reset(options=options)
        return obs, info


def make_atari_render_env(spec: EnvSpec) -> gym.Env:
    """One ALE env rendering ``rgb_array`` frames whose observations match the vector env's
    of :func:`make_atari_env` (to record videos of a policy: ale-py's vector env does not render).

    gymnasium's ``AtariPreprocessing`` and ``FrameStackObservation`` (zero padding) redo the
    native preprocessing on a ``frameskip=1`` ALE env with the same game, sticky actions,
    action set and frame limit: FIRE after a reset, no-ops, frame skip with a max-pool over
    the last two frames, grayscale from ALE's palette, OpenCV's area resize, frame stack.
    Without no-ops and sticky actions the observations equal the vector env's, pixel for
    pixel, over whole games (measured with ale-py 0.12.1 on Breakout, Pong and Space
    Invaders). The rest differs only in draws and counting: the no-op count comes from
    1..``noop_max`` here and 0..``noop_max - 2`` after a FIRE there, and the frame limit
    counts the FIRE and no-op frames here, not there. Rewards are raw, and a life lost is
    no terminal: an episode is one whole game.

    Args:
        spec: the environment spec (an ``ALE/`` id, or a legacy id that migrates to one).
    """
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    registry_spec = spec.registry_spec()
    native = _native_kwargs(spec, registry_spec)
    if not native.get("maxpool", True):
        raise ValueError(
            "model.init_args.env.kwargs.maxpool=false: gymnasium's AtariPreprocessing max-pools"
        )
    env = gym.make(
        registry_spec.id,
        render_mode="rgb_array",
        frameskip=1,
        repeat_action_probability=native["repeat_action_probability"],
        full_action_space=native["full_action_space"],
        max_num_frames_per_episode=native["max_num_frames_per_episode"],
    )
    if native.get("use_fire_reset", True) and "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env)
    env = AtariPreprocessing(
        env,
        noop_max=native["noop_max"],
        frame_skip=native["frameskip"],
        screen_size=(native.get("img_width", 84), native.get("img_height", 84)),
    )
    env = FrameStackObservation(env, native["stack_num"], padding_type="zero")
    # One rendered frame per agent step: real time is the console's 60 Hz over the skip.
    env.metadata = {**env.metadata, "render_fps": max(1, round(60 / native["frameskip"]))}
    return env
