"""Reading checkpoints for ``--ckpt_path`` and ``--warm_start``, checked against the model first.

``--ckpt_path last`` / ``best`` name the newest run's file (:func:`resolve_checkpoint_alias`);
a checkpoint that cannot be read or does not fit the configured model is reported as one
:class:`~slm_lightning.errors.ConfigError` line before fit writes anything
(:func:`check_resume`), and the copy read for the check is the one Lightning restores
(:func:`load_for_resume`). Warm start
(SLM Lab issue #444) begins a new run from another run's network weights, and normaliser
statistics where both runs normalise, with fresh counters, optimizers and replay memory.
"""

import zipfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from loguru import logger
from torch import Tensor
from typing_extensions import override

from slm_lightning.data.replay import ReplayLayout
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


def saved_rollout_state(
    checkpoint: dict[str, Any], path: str | Path | None = None
) -> dict[str, Any] | None:
    """The rollout state (frame clock, RNGs, normalisers, rollout count …) a checkpoint holds;
    None when it was written before the first rollout. The one place that knows where in the
    checkpoint it is: ``checkpoint["rollout"]``, written by ``RLAlgorithm.on_save_checkpoint``.

    Args:
        checkpoint: a loaded checkpoint.
        path: its file, for the message.

    Raises:
        ConfigError: the checkpoint has the older layout, whose rollout state Lightning 2.6
            kept under its private ``loops.fit_loop.state_dict.combined_loader``.
    """
    if "rollout" in checkpoint:
        state = checkpoint["rollout"]
        return state if isinstance(state, dict) else None
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    if fit_loop.get("combined_loader"):
        where = f"{path} was" if path is not None else "the checkpoint was"
        raise ConfigError(
            f"ckpt_path: {where} written by an older slm_lightning and cannot be resumed; "
            "its weights may still be loaded into a new run with --warm_start"
        )
    return None


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
            rollout.restore_normalizers(self.normalizers)


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


CHECKPOINT_ALIASES = ("last", "best")


def resolve_checkpoint_alias(config: Namespace, subcommand: str | None) -> None:
    """Turn ``--ckpt_path last`` / ``best`` into the file of the newest run of this config.

    The file is ``<dir>/last.ckpt`` (``best.ckpt``) where ``<dir>`` is ``--checkpoint.dirpath``,
    else ``<--trainer.default_root_dir>/checkpoints``, else the most recently written one of
    ``runs/<config name>/*/checkpoints/``. ``fit`` then continues that run in its own folder:
    ``metrics.csv`` keeps its rows up to the checkpoint's frame and grows from there, and the
    checkpoints, ``config.yaml``, ``summary.json`` and ``returns.png`` are rewritten for the
    whole run. ``fit --ckpt_path last`` with no checkpoint yet starts the run afresh (as
    Lightning's ``ckpt_path="last"`` does), so one command serves the first start and every
    restart of a preemptible job. ``fit --ckpt_path best`` and an explicit path resume into
    a new run folder instead, leaving the source run (and its later history) as it was;
    ``best`` is refused where the new session would write into the folder that holds it
    (``--trainer.default_root_dir`` or ``--checkpoint.dirpath`` given).

    Args:
        config: the subcommand's parsed config; ``ckpt_path`` and maybe
            ``trainer.default_root_dir`` are set in place.
        subcommand: ``fit``, ``validate`` or ``test``.
    """
    alias = config.get("ckpt_path")
    if alias not in CHECKPOINT_ALIASES:
        return
    trainer = config.trainer
    name = f"{alias}.ckpt"
    dirpath = config.get("checkpoint") and config.checkpoint.get("dirpath")
    if dirpath is not None:
        where, candidates = str(Path(dirpath) / name), [Path(dirpath) / name]
    elif trainer.default_root_dir is not None:
        where = str(Path(trainer.default_root_dir) / "checkpoints" / name)
        candidates = [Path(where)]
    else:
        configs = config.get("config") or []
        config_name = Path(str(configs[0])).stem if configs else "slmlabcli"
        where = str(Path("runs") / config_name / "*" / "checkpoints" / name)
        candidates = list(Path("runs", config_name).glob(f"*/checkpoints/{name}"))
    found = sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        if alias == "last" and subcommand == "fit":
            logger.warning(f"ckpt_path=last: no checkpoint at {where} yet; starting a new run")
            config.ckpt_path = None
            return
        raise ConfigError(f"ckpt_path={alias}: no checkpoint at {where}")
    ckpt = found[-1]
    config.ckpt_path = str(ckpt)
    if subcommand != "fit":
        logger.info(f"ckpt_path={alias}: evaluating {ckpt}")
        return
    if alias == "best":
        if trainer.default_root_dir is not None or dirpath is not None:
            raise ConfigError(
                f"ckpt_path=best: continuing from {ckpt} in its own folder would replace the "
                f"run's later history; pass --ckpt_path={ckpt} with another "
                "--trainer.default_root_dir (or checkpoint.dirpath) to continue it elsewhere"
            )
        logger.info(f"ckpt_path=best: resuming from {ckpt} into a new run folder")
        return
    if trainer.default_root_dir is None and dirpath is None:
        trainer.default_root_dir = str(ckpt.parent.parent)  # continue in the run's own folder
    logger.info(f"ckpt_path={alias}: resuming from {ckpt}")


def add_warm_start_argument(parser: ArgumentParser) -> None:
    """``--warm_start PATH``: start a new run from another run's weights (:func:`start_warm`).

    Args:
        parser: the CLI's parser (each subcommand's).
    """
    parser.add_argument(
        "--warm_start",
        type=str | None,
        default=None,
        help="start a new run from the network weights (and, where both runs normalise, "
        "the normaliser statistics) of this checkpoint; frames, optimizers, schedules and "
        "replay memory start fresh. To continue a run instead, use --ckpt_path.",
    )


def check_checkpoint_options(config: Namespace, subcommand: str | None) -> None:
    """Check ``--ckpt_path`` and ``--warm_start`` once aliases are resolved: the files exist
    and are zip archives, and warm start is a fit's alone and excludes ``--ckpt_path``. Sets
    ``weights_only`` to False where it was not given: torch's default (True) rejects the
    numpy RNG states the rollout saves.

    Args:
        config: the subcommand's parsed config (``weights_only`` may be set in place).
        subcommand: ``fit``, ``validate`` or ``test``.
    """
    if config.get("ckpt_path"):
        check_checkpoint_file(config.ckpt_path, "ckpt_path")
        if config.get("weights_only") is None:
            config.weights_only = False
    if config.get("warm_start"):
        if subcommand != "fit":
            raise ConfigError("warm_start: only fit starts a run; use --ckpt_path here")
        if config.get("ckpt_path"):
            raise ConfigError(
                "warm_start and ckpt_path exclude each other: --ckpt_path continues a run "
                "with its counters, --warm_start starts a new one from its weights"
            )
        check_checkpoint_file(config.warm_start, "warm_start")


@runtime_checkable
class ReplayOwner(Protocol):
    """An algorithm that owns a replay memory (the off-policy family), which it builds with
    :meth:`replay_layout`."""

    def replay_layout(self) -> ReplayLayout:
        """The layout of the memory this algorithm builds."""
        ...


def check_resume(model: L.LightningModule, checkpoint: dict[str, Any], path: str) -> None:
    """Raise a one-line ConfigError unless ``checkpoint`` can resume (or evaluate) ``model``:
    the same algorithm, the same network shapes (observation and action spaces), finite
    weights, the same observation and reward normalisation, and a replay memory of the same
    layout.

    Args:
        model: the configured algorithm.
        checkpoint: the loaded checkpoint.
        path: its file, for the message.
    """
    saved = saved_algorithm(checkpoint)
    ours = type(model).__name__
    if saved not in ("?", ours):
        raise ConfigError(
            f"ckpt_path: {path} was written by {describe(checkpoint)}; this config trains "
            f"{ours}: resume with the config of that run (or --warm_start for weights alone)"
        )
    check_weights(model, checkpoint["state_dict"], "ckpt_path", path, describe(checkpoint))
    check_finite(checkpoint["state_dict"], "ckpt_path", path)
    rollout = saved_rollout_state(checkpoint, path)
    normalizers = rollout.get("normalizers") if rollout is not None else None
    if normalizers is None:  # written before the first rollout, or for evaluation
        normalizers = checkpoint.get("normalizers")
    if normalizers is not None:
        # The rollout restores these into the env's wrappers when it first builds its envs,
        # after the run folder is written to; a mismatch must stop the command before.
        spec = model.env_spec
        for option, key in (("normalize_obs", "obs_rms"), ("normalize_reward", "return_rms")):
            trained = key in normalizers
            if getattr(spec, option) != trained:
                raise ConfigError(
                    f"ckpt_path: {path} was trained with env.{option}={str(trained).lower()}; "
                    f"this config has model.init_args.env.{option}={str(not trained).lower()}: "
                    "they must match to resume"
                )
    memory = saved_memory_state(checkpoint)
    if not memory or not isinstance(model, ReplayOwner):
        return
    # The fields a memory's load_state_dict requires to match; checked here, before the run
    # folder is written to, with the config keys that set them.
    layout = model.replay_layout()
    for field in ("capacity", "num_envs", "n_steps"):
        key, value = layout.config_keys[field], getattr(layout, field)
        if field in memory and memory[field] != value:
            raise ConfigError(
                f"ckpt_path: the replay memory in {path} has {key}={memory[field]}, this "
                f"config model.init_args.{key}={value}; they must match to resume"
            )


class PreloadedCheckpointIO(CheckpointIO):
    """Returns an already loaded checkpoint the first time its path is loaded, so a large
    checkpoint (a replay memory of gigabytes) is read once; everything else is delegated.

    Args:
        inner: the strategy's checkpoint IO.
        path: the checkpoint file.
        checkpoint: its content.
    """

    def __init__(self, inner: CheckpointIO, path: str, checkpoint: dict[str, Any]) -> None:
        self.inner = inner
        self.path = Path(path).resolve()
        self.checkpoint: dict[str, Any] | None = checkpoint

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None):
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None):
        if self.checkpoint is not None and Path(path).resolve() == self.path:
            checkpoint, self.checkpoint = self.checkpoint, None
            return checkpoint
        return self.inner.load_checkpoint(path, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def load_for_resume(trainer: L.Trainer, model: L.LightningModule, path: str) -> dict[str, Any]:
    """Read and check ``--ckpt_path`` against ``model`` (:func:`check_resume`), and have the
    trainer restore from the copy just read rather than reading the file again.

    Args:
        trainer: the instantiated trainer, before fit, validate or test.
        model: the configured algorithm.
        path: the checkpoint file.
    """
    checkpoint = read_checkpoint(path, "ckpt_path")
    check_resume(model, checkpoint, path)
    strategy = trainer.strategy
    strategy.checkpoint_io = PreloadedCheckpointIO(strategy.checkpoint_io, path, checkpoint)
    return checkpoint


def start_warm(trainer: L.Trainer, model: L.LightningModule, path: str) -> None:
    """``--warm_start``: load another run's weights into ``model`` (:func:`warm_start`) and
    hand its normaliser statistics to the rollout when fit starts.

    Args:
        trainer: the instantiated trainer, before fit.
        model: the configured algorithm.
        path: the source run's checkpoint.
    """
    normalizers = warm_start(model, path)
    if normalizers:
        trainer.callbacks.append(WarmStartNormalizers(normalizers))
