"""Migration of legacy gym / Roboschool environment ids to their gymnasium 1.x successors."""

import re
from functools import cache

from loguru import logger

# Exact renames: ids that gymnasium dropped in favour of a newer version of the same task.
_RENAMES: dict[str, str] = {
    "CartPole-v0": "CartPole-v1",
    "LunarLander-v2": "LunarLander-v3",
    "LunarLanderContinuous-v2": "LunarLander-v3",
    "Pendulum-v0": "Pendulum-v1",
    "BipedalWalker-v2": "BipedalWalker-v3",
    "BipedalWalkerHardcore-v2": "BipedalWalkerHardcore-v3",
    "Acrobot-v0": "Acrobot-v1",
}
# Roboschool was archived; its locomotion tasks live on as MuJoCo v5 envs.
_ROBOSCHOOL = re.compile(r"^Roboschool(Ant|HalfCheetah|Hopper|Walker2d|Humanoid)-v1$")
# Old Atari ids: the raw-frame v4 variants map to ale-py's v5 namespace; the
# preprocessing (frame skip, max-pool, resize, stack) is applied by the vector env. v5 adds
# sticky actions (Machado et al. 2018); NoFrameskip-v4 had none and the minimal action set,
# so results stay comparable with papers and SLM Lab runs on the v4 ids.
_ATARI = re.compile(r"^(\w+?)NoFrameskip-v4$")
_ATARI_V4_SETTINGS = {"repeat_action_probability": 0.0, "full_action_space": False}


@cache
def migrate_env_id(name: str) -> tuple[str, dict]:
    """Return the current gymnasium id for a legacy one, with the kwargs the migration needs.

    Args:
        name: an environment id, legacy or current.

    Returns:
        ``(new_id, kwargs)``; ``kwargs`` holds extra constructor arguments the new id needs
        to behave like the old one (``continuous=True`` for LunarLanderContinuous; no sticky
        actions for ``XNoFrameskip-v4``, which override ``env.atari``).
    """
    kwargs: dict = {}  # cached: callers must not mutate it
    new = _RENAMES.get(name)
    if name == "LunarLanderContinuous-v2":
        kwargs["continuous"] = True
    if new is None and (match := _ROBOSCHOOL.match(name)):
        new = f"{match.group(1)}-v5"
    if new is None and (match := _ATARI.match(name)):
        new = f"ALE/{match.group(1)}-v5"
        kwargs.update(_ATARI_V4_SETTINGS)
    if new is None or new == name:
        return name, kwargs
    settings = " with " + ", ".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else ""
    logger.warning(f"env id {name} is a legacy name; using {new}{settings}")
    return new, kwargs
