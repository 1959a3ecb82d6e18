"""What every algorithm shares: the env, the frame clock and budget, and the rollout dataloader."""

import math
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor
from typing_extensions import override

from slm_lightning.checkpoints import saved_rollout_state
from slm_lightning.config_types import PositiveCount
from slm_lightning.data.evaluation import EvaluationEpisodes
from slm_lightning.data.rollout import OnPolicyRollout
from slm_lightning.envs.factory import EnvSpec, probe_spaces
from slm_lightning.envs.normalization import normalizer_state
from slm_lightning.errors import ConfigError
from slm_lightning.schedules import Schedule, scheduled
from slm_lightning.train_metrics import TrainMetrics


def seed_global_rngs(seed: int) -> None:
    """Seed the global torch, numpy and python RNGs (action sampling, exploration)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class RLAlgorithm(L.LightningModule):
    """Base class of every algorithm: a LightningModule whose ``train_dataloader`` is a rollout.

    One Lightning epoch is one rollout-and-update cycle (on-policy: one rollout and its
    minibatch epochs). Training stops when the frame clock reaches ``max_frames``, counted
    over all envs and ranks; the last cycle may overshoot by less than one rollout.

    Subclasses set ``self.policy``, implement :meth:`build_rollout` and ``training_step``,
    and list the action spaces they support. The defaults below serve the policy-gradient
    family, whose ``policy`` is an :class:`~slm_lightning.nets.ActorCritic` and whose
    hyperparameters include ``lr``, ``critic_lr`` and ``max_grad_norm``.

    ``slm-lab validate`` / ``test`` play ``eval_episodes`` whole episodes with the
    trained policy (normalisers frozen at their checkpointed statistics) and report the
    mean, std, min and max raw return.

    Args:
        env: the environment spec.
        max_frames: training budget in environment frames (all envs, all ranks).
        gamma: discount factor.
        eval_episodes: episodes played by ``validate`` / ``test``.
        eval_greedy: evaluate the greedy policy (argmax / Gaussian mean) instead of sampling.
    """

    action_spaces: tuple[type[spaces.Space], ...] = (spaces.Discrete, spaces.Box)
    adam_eps: float = 1e-5

    def __init__(
        self,
        env: EnvSpec,
        max_frames: PositiveCount,
        gamma: float,
        eval_episodes: int = 10,
        eval_greedy: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if max_frames <= 0:
            raise ConfigError(f"model.init_args.max_frames must be > 0, got {max_frames}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"model.init_args.gamma must be in [0, 1], got {gamma}")
        if eval_episodes < 1:
            raise ConfigError(f"model.init_args.eval_episodes must be >= 1, got {eval_episodes}")
        self.env_spec = env
        self.max_frames = max_frames
        self.eval_episodes = eval_episodes
        self.eval_greedy = eval_greedy
        self._checkpoint_normalizers: dict | None = None
        self.gamma = gamma
        self.observation_space, self.action_space = probe_spaces(env)
        if not isinstance(self.action_space, self.action_spaces):
            allowed = ", ".join(space.__name__ for space in self.action_spaces)
            raise ConfigError(
                f"model: {name} supports {allowed} action spaces; "
                f"{env.env_id} has {type(self.action_space).__name__}"
            )
        if not isinstance(self.observation_space, spaces.Box):
            raise ConfigError(
                f"model: {name} needs a Box observation space; "
                f"{env.env_id} has {type(self.observation_space).__name__}"
            )
        self.rollout: Any = None
        self._rollout_state: dict[str, Any] | None = None
        self.stop_update = False
        # Training diagnostics; MetricsTracker logs their means over the updates of each row.
        self.train_metrics = TrainMetrics()

    @property
    def frames(self) -> int:
        """Environment frames so far (all envs, all ranks), restored on resume."""
        return 0 if self.rollout is None else self.rollout.frames

    def env_seed(self) -> int:
        """Seed of this rank's first sub-env: the run seed offset by rank, so ranks differ."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))
        return seed + self.global_rank * self.env_spec.num_envs

    def build_rollout(self) -> Any:
        """The training dataset; the default is the on-policy rollout over the
        ``time_horizon`` / ``training_epochs`` / ``num_minibatches`` hyperparameters."""
        hp = self.hparams
        return OnPolicyRollout(
            self,
            self.env_spec,
            self.env_seed(),
            hp.time_horizon,
            hp.get("training_epochs", 1),
            hp.get("num_minibatches", 1),
            world_size=self.trainer.world_size,
            gamma=self.gamma,
        )

    @staticmethod
    def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        """Raise a :class:`ConfigError` naming ``key`` and the allowed values."""
        if value not in allowed:
            raise ConfigError(
                f"model.init_args.{key} must be one of {', '.join(allowed)}, got {value!r}"
            )

    @staticmethod
    def check_positive(**values: int) -> None:
        """Raise a :class:`ConfigError` naming the first hyperparameter that is < 1."""
        for key, value in values.items():
            if value < 1:
                raise ConfigError(f"model.init_args.{key} must be >= 1, got {value}")

    @staticmethod
    def check_learning_rates(**rates: float | Schedule | dict | None) -> None:
        """Raise a :class:`ConfigError` naming the first learning rate (or an end of its
        schedule) that is negative; None (e.g. ``critic_lr`` following ``lr``) passes."""
        for key, rate in rates.items():
            if isinstance(rate, dict):
                rate = Schedule(**rate)
            ends = (rate.start, rate.end) if isinstance(rate, Schedule) else (rate,)
            bad = next((value for value in ends if value is not None and value < 0), None)
            if bad is not None:
                raise ConfigError(f"model.init_args.{key}: must be >= 0, got {bad}")

    def check_replay(self, learning_starts: int, batch_size: int, memory_size: int) -> None:
        """Raise a :class:`ConfigError` for replay settings under which nothing would train:
        no update before the budget ends, or a memory smaller than one batch."""
        if learning_starts >= self.max_frames:
            raise ConfigError(
                f"model.init_args.learning_starts ({learning_starts}) must be < max_frames "
                f"({self.max_frames}): no update would run"
            )
        if memory_size < batch_size:
            raise ConfigError(
                f"model.init_args.memory_size ({memory_size}) must be >= batch_size ({batch_size})"
            )

    @override
    def train_dataloader(self) -> Any:
        if self.rollout is None:
            self.rollout = self.build_rollout()
            if self._rollout_state is not None:
                self.rollout.load_state_dict(self._rollout_state)
                self._rollout_state = None
            if self.global_rank > 0:
                # seed_everything gave every rank the same global RNGs (and a resume restores
                # rank 0's): reseed from this rank's env seed and the clock, so ranks sample
                # different actions and exploration noise. Rank 0 keeps the run's own stream.
                seed_global_rngs(self.env_seed() + self.frames)
        return self.rollout

    def _evaluation(self) -> EvaluationEpisodes:
        normalizers = self._checkpoint_normalizers
        if self.rollout is not None and self.rollout.env is not None:
            normalizers = normalizer_state(self.rollout.env)
        # A seed apart from training's, so evaluation episodes are not training's first ones.
        seed = self.env_seed() + 1_000_003
        return EvaluationEpisodes(
            self, self.env_spec, seed, self.eval_episodes, self.eval_greedy, normalizers
        )

    @override
    def val_dataloader(self) -> EvaluationEpisodes:
        return self._evaluation()

    @override
    def test_dataloader(self) -> EvaluationEpisodes:
        return self._evaluation()

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        returns = batch["returns"].double()
        self.log_dict(
            {
                "eval/return_mean": returns.mean(),
                "eval/return_std": returns.std(unbiased=False),
                "eval/return_min": returns.min(),
                "eval/return_max": returns.max(),
                "eval/length_mean": batch["lengths"].double().mean(),
                "eval/episodes": float(len(returns)),
            },
            batch_size=1,
        )

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Also kept with the rollout state, but evaluation from a checkpoint has no rollout.
        if self.rollout is not None and self.rollout.env is not None:
            checkpoint["normalizers"] = normalizer_state(self.rollout.env)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_normalizers = checkpoint.get("normalizers")
        # Lightning reloads the dataloader (rollout) state only when resuming mid-epoch; from a
        # checkpoint written at the end of training the frame clock would restart at 0.
        self._rollout_state = saved_rollout_state(checkpoint)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return self.policy.env_actions(actions)

    def act(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.policy.act(obs)

    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        """Actions for evaluation: the most likely one, or a sample from the policy."""
        if greedy:
            dist, _ = self.policy(obs)
            return self.policy.greedy(dist)
        return self.policy.act(obs)[0]

    def bootstrap_values(self, obs: Tensor) -> Tensor | None:
        return self.policy.value(obs) if self.policy.has_critic else None

    @property
    def loss_scaling(self) -> bool:
        """Whether the trainer scales the loss (``16-mixed``'s GradScaler; not ``bf16-mixed``)."""
        trainer = self._trainer
        return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One Adam, one parameter group per network (e.g. actor and a separate critic): each
        # gets its own learning rate, and Adam keeps per-parameter moments anyway.
        groups = [{"params": params} for params in self.policy.param_groups()]
        lr = scheduled(self.hparams.lr, 0, self.max_frames)
        # fused: one kernel for all parameters, ~20% faster on the small nets of classic control.
        # Not under 16-mixed: a fused Adam unscales inside step(), after clipping would have
        # seen the scaled gradients (Lightning then refuses to clip).
        return torch.optim.Adam(groups, lr=lr, eps=self.adam_eps, fused=not self.loss_scaling)

    @override
    def on_train_epoch_start(self) -> None:
        if "lr" not in self.hparams:  # SAC / CrossQ: constant rates of their own optimizers
            return
        lr = scheduled(self.hparams.lr, self.frames, self.max_frames)
        critic_lr = self.hparams.get("critic_lr")
        critic_lr = lr if critic_lr is None else scheduled(critic_lr, self.frames, self.max_frames)
        optimizer = self.trainer.optimizers[0]
        for group, value in zip(optimizer.param_groups, (lr, critic_lr), strict=False):
            group["lr"] = value
        self.train_metrics.set({"train/lr": lr})

    @override
    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        max_norm = (
            self.hparams.get("max_grad_norm") if gradient_clip_val is None else gradient_clip_val
        )
        if max_norm is None:
            return
        if not self.loss_scaling:
            # No loss scaling (32-true, bf16-mixed): the gradients are the true ones, so the
            # fused Adam may be clipped. Lightning's MixedPrecision.clip_gradients refuses any
            # optimizer that can unscale inside step() (fused Adam) even under bf16-mixed,
            # which has no GradScaler and nothing to unscale; clip here instead.
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:  # 16-mixed: Lightning unscales first (configure_optimizers then avoids fused)
            self.clip_gradients(
                optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm"
            )

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        # Lightning calls this before every backward (automatic optimization, and
        # manual_backward): a non-finite loss stops the run before it reaches the weights, at
        # the cost of one device sync per update. Under 16-mixed the loss arrives scaled, and
        # an infinite scaled loss is the GradScaler's to handle (it skips that step).
        value = loss.item()  # a scalar: ~0.4 us on a CPU, against ~19 for isfinite().any()
        if math.isnan(value) or (math.isinf(value) and not self.loss_scaling):
            raise FloatingPointError(
                f"{type(self).__name__}: {self._loss_term(loss)} at step "
                f"{self.trainer.global_step} (frame {self.frames}); stopped before the "
                "optimizer step"
            )

    def _loss_term(self, loss: Tensor) -> str:
        """``train/value_loss is inf``: the non-finite terms among the ``train/*loss`` metrics,
        which every algorithm records before its backward (the parts before the total)."""
        bad = {
            key: float(value.detach().float().mean())
            for key, value in self.train_metrics.latest().items()
            if key.endswith("loss")
            and isinstance(value, Tensor)
            and not bool(torch.isfinite(value).all())
        }
        parts = [key for key in bad if key != "train/loss"] or list(bad)
        if not parts:
            return f"the loss is {loss.item()}"
        return ", ".join(f"{key} is {bad[key]}" for key in parts)

    @override
    def on_train_start(self) -> None:
        self._stop_at_budget()  # a resumed run may already have spent its budget
        # A checkpoint written on an exception is mid-epoch, and Lightning resumes such an epoch
        # without on_train_epoch_start, where algorithms set lr and per-rollout schedules.
        if self.trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start()

    @override
    def on_train_epoch_end(self) -> None:
        self._stop_at_budget()

    def _stop_at_budget(self) -> None:
        if self.frames >= self.max_frames:
            self.trainer.should_stop = True

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return [CloseEnvsOnException()]

    def close_envs(self) -> None:
        """Close the rollout's vector env, ending its worker processes (if any)."""
        if self.rollout is not None:
            self.rollout.close()

    @override
    def teardown(self, stage: str) -> None:
        # After a fit, validate or test that ended normally; CloseEnvsOnException covers the rest.
        self.close_envs()


class CloseEnvsOnException(L.Callback):
    """Closes an :class:`RLAlgorithm`'s envs when fit fails or is stopped by a signal.

    Lightning 2.6 calls no LightningModule hook then (``trainer/call.py``,
    ``_call_and_handle_interrupt``: the callbacks' ``on_exception``, no ``teardown``), and
    worker processes left running would keep the process from exiting. The algorithm returns
    this from ``configure_callbacks``, so it runs after the trainer's callbacks: FrameCheckpoint
    has saved the rollout (with the envs' normaliser statistics) by then.
    """

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, RLAlgorithm):
            pl_module.close_envs()
