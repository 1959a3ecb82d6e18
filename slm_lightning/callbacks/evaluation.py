"""PeriodicEval: evaluation episodes every N frames during fit, logged as ``eval/*`` rows."""

from typing import Any

import lightning as L
import numpy as np
from gymnasium.vector import VectorEnv
from loguru import logger
from typing_extensions import override

from slm_lightning.callbacks.metrics import MetricsTracker
from slm_lightning.config_types import Count, PositiveCount
from slm_lightning.data.evaluation import evaluation_env_spec, play_episodes
from slm_lightning.envs.factory import make_vector_env
from slm_lightning.envs.normalization import freeze_normalizers, load_normalizer_state
from slm_lightning.errors import ConfigError


class PeriodicEval(L.Callback):
    """Plays whole evaluation episodes every ``frequency`` frames of the frame clock, as SLM
    Lab's ``meta.eval_frequency`` / ``rigorous_eval`` do, and once more when training ends
    (unless the last evaluation was at the last frame).

    An evaluation plays ``episodes`` episodes (:func:`~slm_lightning.data.evaluation.play_episodes`,
    the player of ``slm-lab validate``) with the current policy in eval mode, on an env of its
    own built from the training spec (stepped in-process, observation normalisers set to
    training's statistics and frozen) and reset with the algorithm's ``evaluation_seed()``
    each time: every evaluation starts from the same states, the last one plays what
    ``validate`` plays on the final checkpoint, and training's envs and RNG streams are left
    untouched (a run trains exactly as it would without evaluation). It then sends one row
    to the loggers (``metrics.csv``) with the frame clock as the step, ``rollout/frames`` and
    ``eval/return_mean``, ``eval/return_std`` (population), ``eval/length_mean``, and prints
    ``eval: frames=… return_mean=…`` when the metrics rows are printed
    (``metrics.print_metrics`` / ``LOG_METRICS=true``). Rank 0 alone evaluates.

    The next evaluation's frame and the last evaluated frame survive ``--ckpt_path``; the
    evaluation env is closed when fit ends, fails or is stopped by a signal.

    Args:
        frequency: frames between two evaluations; 0 or None evaluates never (the default).
        episodes: episodes per evaluation; None uses the algorithm's ``eval_episodes``.
        greedy: act greedily; None follows the algorithm's ``eval_greedy``.
    """

    def __init__(
        self,
        frequency: Count | None = None,
        episodes: PositiveCount | None = None,
        greedy: bool | None = None,
    ) -> None:
        if frequency is not None and frequency < 0:
            raise ConfigError(
                f"eval.frequency must be >= 0 (0 or null: no evaluation), got {frequency}"
            )
        if episodes is not None and episodes < 1:
            raise ConfigError(
                f"eval.episodes must be >= 1 (null: model.init_args.eval_episodes), got {episodes}"
            )
        self.frequency = frequency or 0
        self.episodes = episodes
        self.greedy = greedy
        self.next_eval = 0  # the frame of the next evaluation; 0 until training starts
        self.last_eval: int | None = None  # the frame of the last evaluation
        self.env: VectorEnv | None = None  # built at the first evaluation, on rank 0

    # The state key is the class name (Callback's default), not built from the arguments as
    # FrameCheckpoint's is: a resume may change any of them (turn evaluation on, change its
    # frequency) and must keep the schedule; two instances would log the same keys, and
    # Lightning refuses two stateful callbacks with one key.

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.frequency:
            return
        # The next multiple of frequency after the clock; a resumed run keeps an evaluation
        # that was due when its checkpoint was written (played at the first epoch end).
        due = (pl_module.frames // self.frequency + 1) * self.frequency
        self.next_eval = min(self.next_eval, due) if self.next_eval > 0 else due

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.frequency and pl_module.frames >= self.next_eval:
            self.next_eval = (pl_module.frames // self.frequency + 1) * self.frequency
            self.evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.frequency and self.last_eval != pl_module.frames:
            self.evaluate(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.close()  # also after SIGTERM / SIGINT, which end fit through an exception

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Close the evaluation env (if one was built)."""
        if self.env is not None:
            self.env.close()
            self.env = None

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float] | None:
        """Play one evaluation now and log its row; returns the row (None off rank 0).

        Args:
            trainer: the trainer.
            pl_module: the algorithm (an :class:`~slm_lightning.algorithms.RLAlgorithm`).
        """
        frames = pl_module.frames
        self.last_eval = frames
        if not trainer.is_global_zero:
            return None
        episodes = self.episodes or pl_module.eval_episodes
        greedy = pl_module.eval_greedy if self.greedy is None else self.greedy
        seed = pl_module.evaluation_seed()
        if self.env is None:
            spec = evaluation_env_spec(pl_module.env_spec, episodes, in_process=True)
            self.env = make_vector_env(spec, seed=seed)
            freeze_normalizers(self.env)
        normalizers = pl_module.training_normalizers()
        if normalizers:
            load_normalizer_state(self.env, normalizers)
        was_training = pl_module.training
        pl_module.eval()
        try:
            returns, lengths = play_episodes(pl_module, self.env, seed, episodes, greedy)
        finally:
            pl_module.train(was_training)
        row: dict[str, float] = {
            "rollout/frames": frames,
            "eval/return_mean": float(np.mean(returns)),
            "eval/return_std": float(np.std(returns)),
            "eval/length_mean": float(np.mean(lengths)),
        }
        for lg in trainer.loggers:
            lg.log_metrics(row, step=frames)
            lg.save()
        tracker = next((c for c in trainer.callbacks if isinstance(c, MetricsTracker)), None)
        if tracker is not None and tracker.print_metrics:
            logger.info(
                f"eval: frames={frames} episodes={episodes} greedy={greedy} "
                f"return_mean={row['eval/return_mean']:.4g} std={row['eval/return_std']:.4g} "
                f"length_mean={row['eval/length_mean']:.4g}"
            )
        return row

    @override
    def state_dict(self) -> dict[str, Any]:
        # Nothing when off: Lightning leaves an empty state out of the checkpoint, so a run
        # that does not evaluate writes the checkpoints it wrote before this callback existed.
        if not self.frequency:
            return {}
        return {"next_eval": self.next_eval, "last_eval": self.last_eval}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_eval = state_dict["next_eval"]
        self.last_eval = state_dict["last_eval"]
