"""Reading checkpoints for ``--ckpt_path`` and ``--warm_start``, checked against the model first.

A checkpoint that cannot be read or does not fit the configured model is reported as one
:class:`~slm_lightning.envs.factory.ConfigError` line before fit writes anything. Warm start
(SLM Lab issue #444) begins a new run from another run's network weights, and normaliser
statistics where both runs normalise, with fresh counters, optimizers and replay memory.
"""

import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from loguru import logger
from torch import Tensor
from typing_extensions import override

from slm_lightning.errors import ConfigError

# Listed names of mismatching tensors in an error line, before "…".
SHOWN = 3


def check_checkpoint_file(path: str | Path, key: str) -> Path:
    """The checkpoint file at ``path``; a ConfigError naming ``key`` if it is missing or is not
    a zip archive (``torch.save``'s format: a truncated file has lost its zip directory).

    Args:
        path: the file given on the command line.
        key: the option it came from (``ckpt_path`` or ``warm_start``), for the message.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: no checkpoint file at {file}")
    if not zipfile.is_zipfile(file):
        raise ConfigError(f"{key}: {file} is not a readable checkpoint (corrupt or truncated)")
    return file


def read_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Load a Lightning checkpoint onto the CPU; a ConfigError names ``key`` if it is unreadable.

    ``weights_only=False``: the rollout state holds numpy RNG states and replay arrays. Only
    load checkpoints you trust (they are pickles).

    Args:
        path: checkpoint file.
        key: the option it came from, for the message.
    """
    file = check_checkpoint_file(path, key)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, …
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: {file} is not a readable checkpoint ({first})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{key}: {file} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def saved_algorithm(checkpoint: dict[str, Any]) -> str:
    """The class name of the algorithm that wrote ``checkpoint`` (``?`` if it is not recorded)."""
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path") or "?"
    return str(class_path).rsplit(".", 1)[-1]


def check_weights(
    model: L.LightningModule, saved: dict[str, Tensor], key: str, path: str | Path, source: str
) -> None:
    """Raise a one-line ConfigError unless ``saved`` has exactly the model's tensors and shapes.

    Args:
        model: the configured algorithm.
        saved: the checkpoint's ``state_dict``.
        key: the option the checkpoint came from, for the message.
        path: the checkpoint file, for the message.
        source: what wrote the checkpoint (its algorithm and env), for the message.
    """
    own = model.state_dict()
    missing = [name for name in own if name not in saved]
    unexpected = [name for name in saved if name not in own]
    shapes = [
        f"{name} {tuple(saved[name].shape)} vs {tuple(own[name].shape)}"
        for name in own
        if name in saved and tuple(saved[name].shape) != tuple(own[name].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listed(names: list[str]) -> str:
        return ", ".join(names[:SHOWN]) + (", …" if len(names) > SHOWN else "")

    problems = [
        f"{len(shapes)} shapes differ (checkpoint vs config): {listed(shapes)}" if shapes else "",
        f"missing {listed(missing)}" if missing else "",
        f"unexpected {listed(unexpected)}" if unexpected else "",
    ]
    target = f"{type(model).__name__} on {model.env_spec.env_id}"
    raise ConfigError(
        f"{key}: {path} holds a {source} checkpoint that does not fit {target}: "
        + "; ".join(p for p in problems if p)
    )


def check_finite(saved: dict[str, Tensor], key: str, path: str | Path) -> None:
    """Raise a one-line ConfigError if any floating tensor of ``saved`` holds a NaN or inf:
    such weights would only produce NaN actions (checkpoints written before the run checked
    for non-finite values could hold them).

    Args:
        saved: the checkpoint's ``state_dict``.
        key: the option the checkpoint came from, for the message.
        path: the checkpoint file, for the message.
    """
    bad = [
        name
        for name, tensor in saved.items()
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        listed = ", ".join(bad[:SHOWN]) + (", …" if len(bad) > SHOWN else "")
        raise ConfigError(
            f"{key}: {path} holds non-finite weights ({listed}); use an earlier checkpoint"
        )


def saved_rollout_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The rollout state (frame clock, RNGs, normalisers, replay memory) a checkpoint holds;
    None when it was written before the first rollout. The one place that knows where in the
    checkpoint it is.

    Lightning 2.6 saves the train dataloader's ``state_dict`` (our rollout) under its private
    ``loops.fit_loop.state_dict.combined_loader``.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    state = (fit_loop.get("combined_loader") or [None])[0]
    return state if isinstance(state, dict) else None


def saved_memory_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The replay memory's ``state_dict`` a checkpoint holds, which an off-policy algorithm
    writes under ``checkpoint["memory"]``; None without one (``checkpoint_memory: false``,
    written before the first rollout, or an on-policy algorithm). The one place that knows
    where in the checkpoint it is."""
    memory = checkpoint.get("memory")
    return memory if isinstance(memory, dict) else None


def checkpoint_frames(checkpoint: dict[str, Any]) -> int:
    """The frame clock saved in a checkpoint (0 if it holds no rollout state)."""
    state = saved_rollout_state(checkpoint)
    return 0 if state is None else int(state["frames"])


def describe(checkpoint: dict[str, Any]) -> str:
    """``DQN (CartPole-v1)``: the algorithm and env a checkpoint was trained with."""
    env = checkpoint.get("hyper_parameters", {}).get("env") or {}
    name = env.get("name") if isinstance(env, dict) else getattr(env, "name", None)
    return f"{saved_algorithm(checkpoint)} ({name or 'unknown env'})"


class WarmStartNormalizers(Callback):
    """Hands a warm start's normaliser statistics to the rollout before it builds its envs.

    Args:
        normalizers: :func:`~slm_lightning.envs.normalization.normalizer_state` of the source run.
    """

    def __init__(self, normalizers: dict[str, dict[str, Any]]) -> None:
        self.normalizers = normalizers

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The rollout exists (Lightning set up the dataloader) but builds its envs lazily on the
        # first iter(); it restores these statistics into the new envs' wrappers then.
        rollout = pl_module.rollout
        if rollout is not None and rollout.env is None:
            rollout._saved_normalizers = self.normalizers


def warm_start(model: L.LightningModule, path: str | Path) -> dict[str, dict[str, Any]]:
    """Load another run's network weights into ``model``; return the normaliser statistics
    that fit this run's env (empty when there are none to carry over).

    Nothing else is taken: frames, episodes, optimizer moments, schedules, replay memory and
    the moving averages all start fresh, and the run gets its own folder.

    Args:
        model: the configured algorithm, before fit.
        path: the source run's checkpoint.
    """
    checkpoint = read_checkpoint(path, "warm_start")
    check_weights(model, checkpoint["state_dict"], "warm_start", path, describe(checkpoint))
    check_finite(checkpoint["state_dict"], "warm_start", path)
    model.load_state_dict(checkpoint["state_dict"])
    saved = checkpoint.get("normalizers") or {}
    spec = model.env_spec
    wanted = {"obs_rms": spec.normalize_obs, "return_rms": spec.normalize_reward}
    normalizers = {k: v for k, v in saved.items() if wanted.get(k)}
    for name in saved.keys() - normalizers.keys():
        option = "normalize_obs" if name == "obs_rms" else "normalize_reward"
        logger.warning(
            f"warm_start: {path} was trained with env.{option}=true but this config has it off; "
            "its statistics are not used"
        )
    logger.info(
        f"warm_start: weights of {describe(checkpoint)} from {path}"
        + (f", normaliser statistics {sorted(normalizers)}" if normalizers else "")
        + "; frames, optimizers and memory start fresh"
    )
    return normalizers
