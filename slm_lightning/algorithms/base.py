"""What every algorithm shares: the env, the frame clock and budget, the rollout dataloader,
evaluation, and the rollout's place in the checkpoint."""

import math
import os
import random
from abc import ABC, abstractmethod
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from gymnasium import spaces
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor
from typing_extensions import override

from slm_lightning.checkpoints import saved_rollout_state
from slm_lightning.config_types import PositiveCount
from slm_lightning.data.evaluation import EvaluationBatch, EvaluationEpisodes
from slm_lightning.data.vector_rollout import RolloutBatches, VectorRollout
from slm_lightning.envs.factory import EnvSpec, probe_spaces
from slm_lightning.envs.normalization import normalizer_state
from slm_lightning.errors import ConfigError
from slm_lightning.optim import clip_grad_norm, loss_scaling
from slm_lightning.schedules import Schedule
from slm_lightning.train_metrics import TrainMetrics


def seed_global_rngs(seed: int) -> None:
    """Seed the global torch, numpy and python RNGs (action sampling, exploration)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# The hooks Lightning dispatches around each manual backward and optimizer step.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def direct_steps_possible(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether an update's backward and optimizer step may skip Lightning's dispatch: one
    device, full precision, and no callback (nor the module, besides its own loss check in
    ``on_before_backward``) implementing a hook that the dispatch would call.

    Lightning 2.6's ``manual_backward`` and ``LightningOptimizer.step`` cost ~50-100 us of
    hook dispatch per call with our callbacks, more than the arithmetic of a small update.
    """
    if type(trainer.strategy) is not SingleDeviceStrategy:  # DDP prepares each backward
        return False
    if type(trainer.precision_plugin) is not Precision:  # autocast, loss scaling
        return False
    for callback in trainer.callbacks:
        if any(getattr(type(callback), h) is not getattr(L.Callback, h) for h in STEP_HOOKS):
            return False
    own = ("on_after_backward", "on_before_optimizer_step", "backward")
    return all(getattr(type(module), h) is getattr(L.LightningModule, h) for h in own)


class NetSpec(Protocol):
    """A net's config (``MLPSpec``, ``ConvSpec``, ``RecurrentSpec`` …) that checks itself."""

    def check(self, key: str) -> None: ...


class RLAlgorithm(L.LightningModule, ABC):
    """Base class of every algorithm: a LightningModule whose ``train_dataloader`` is a rollout.

    One Lightning epoch is one rollout-and-update cycle (on-policy: one rollout and its
    minibatch epochs). Training stops when the frame clock reaches ``max_frames``, counted
    over all envs and ranks; the last cycle may overshoot by less than one rollout.

    Subclasses implement :meth:`build_rollout`, :meth:`eval_actions` (or :meth:`eval_step`),
    ``training_step`` and their optimizers, and list the action spaces they support. The
    rollout's state goes into ``checkpoint["rollout"]`` (:meth:`on_save_checkpoint`) and comes
    back on every resume (:func:`~slm_lightning.checkpoints.saved_rollout_state`).

    ``slm-lab validate`` / ``test`` play ``eval_episodes`` whole episodes with the
    trained policy (normalisers frozen at their checkpointed statistics) and report the
    mean, std, min and max raw return; :class:`~slm_lightning.callbacks.PeriodicEval` plays
    them during fit.

    Args:
        env: the environment spec.
        max_frames: training budget in environment frames (all envs, all ranks).
        gamma: discount factor.
        eval_episodes: episodes played by ``validate`` / ``test`` (and by each evaluation
            during fit, unless ``eval.episodes`` says otherwise).
        eval_greedy: evaluate the greedy policy (argmax / Gaussian mean) instead of sampling
            (also during fit, unless ``eval.greedy`` says otherwise).
    """

    action_spaces: tuple[type[spaces.Space], ...] = (spaces.Discrete, spaces.Box)

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
        # Whether a loss of this training_step was not finite, on the accelerator (see
        # on_before_backward); None on a CPU, where each loss is read at once.
        self._nonfinite: Tensor | None = None
        self._direct_steps = False  # see backward_step; decided when training starts
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

    @abstractmethod
    def build_rollout(self) -> VectorRollout:
        """The training dataset (called once, in ``train_dataloader``, when the trainer exists)."""

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

    @staticmethod
    def check_nets(**specs: NetSpec | None) -> None:
        """Raise a :class:`ConfigError` naming ``model.init_args.<name>.<field>`` for the first
        net spec (given by its argument name) no net can be built from; None passes."""
        for name, spec in specs.items():
            if spec is not None:
                spec.check(f"model.init_args.{name}")

    @override
    def train_dataloader(self) -> RolloutBatches:
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
        return RolloutBatches(self.rollout)  # not the rollout: its state is ours to save

    def training_normalizers(self) -> dict | None:
        """The observation / return normaliser statistics of training: the live rollout's,
        else the checkpoint's (None when there are none), for evaluation and videos."""
        if self.rollout is not None and self.rollout.env is not None:
            return normalizer_state(self.rollout.env)
        return self._checkpoint_normalizers

    def evaluation_seed(self) -> int:
        """Seed of the evaluation envs and of their sampled actions: apart from training's, so
        evaluation episodes are not training's first ones, and the same for every evaluation
        of a run (during fit and by ``validate`` / ``test``), so they differ by the policy
        alone."""
        return self.env_seed() + 1_000_003

    def _evaluation(self) -> EvaluationEpisodes:
        return EvaluationEpisodes(
            self,
            self.env_spec,
            self.evaluation_seed(),
            self.eval_episodes,
            self.eval_greedy,
            self.training_normalizers(),
        )

    @override
    def val_dataloader(self) -> EvaluationEpisodes:
        return self._evaluation()

    @override
    def test_dataloader(self) -> EvaluationEpisodes:
        return self._evaluation()

    @override
    def validation_step(self, batch: EvaluationBatch, batch_idx: int) -> None:
        returns = batch.returns.double()
        self.log_dict(
            {
                "eval/return_mean": returns.mean(),
                "eval/return_std": returns.std(unbiased=False),
                "eval/return_min": returns.min(),
                "eval/return_max": returns.max(),
                "eval/length_mean": batch.lengths.double().mean(),
                "eval/episodes": float(len(returns)),
            },
            batch_size=1,
        )

    @override
    def test_step(self, batch: EvaluationBatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The rollout's state (frame clock, RNGs, normalisers …), read back by
        # checkpoints.saved_rollout_state; one restored but not yet handed to a rollout is
        # passed on as it is. None: saved before the first rollout.
        rollout = self.rollout.state_dict() if self.rollout is not None else self._rollout_state
        checkpoint["rollout"] = rollout
        # Also kept with the rollout state, but evaluation from a checkpoint has no rollout.
        if self.rollout is not None and self.rollout.env is not None:
            checkpoint["normalizers"] = normalizer_state(self.rollout.env)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_normalizers = checkpoint.get("normalizers")
        # Restored on every resume, mid-epoch or not (Lightning would restore a dataloader's
        # state only mid-epoch; at the end of training the frame clock would restart at 0).
        self._rollout_state = saved_rollout_state(checkpoint)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        """Policy actions as the env takes them (e.g. rescaled onto a Box)."""
        return self.policy.env_actions(actions)

    def initial_state(self, num_envs: int) -> Tensor | None:
        """The hidden state of ``num_envs`` fresh episodes; None for a feed-forward policy."""
        return None

    def eval_actions(self, obs: Tensor, greedy: bool) -> Tensor:
        """Evaluation actions of a feed-forward policy: the most likely one, or a sample."""
        raise NotImplementedError(f"{type(self).__name__} implements eval_actions or eval_step")

    def eval_step(
        self, obs: Tensor, state: Tensor | None, episode_starts: Tensor | None, greedy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The step evaluation and videos take: actions and the next hidden state.

        Args:
            obs: ``(N, *obs_shape)`` observations.
            state: the state the envs carry into the step (None: feed-forward).
            episode_starts: ``(N,)`` bool, true where ``obs`` starts an episode (None
                without a state).
            greedy: the most likely action instead of a sample.
        """
        return self.eval_actions(obs, greedy), state

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        # Lightning calls this before every backward (automatic optimization, and
        # manual_backward): a non-finite loss stops the run. Under 16-mixed the loss arrives
        # scaled, and an infinite scaled loss is the GradScaler's to handle (it skips that step).
        scaled = loss_scaling(self._trainer)
        if self.defer_loss_checks:
            # Reading the loss waits for the accelerator, which would serialise the update
            # loop: keep a flag on the device, read once per training_step
            # (on_train_batch_end), before any checkpoint can be written.
            bad = torch.isnan(loss) if scaled else ~torch.isfinite(loss)
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            return
        # On a CPU the value is read before the backward, so that the bad update never
        # reaches the weights.
        value = loss.item()  # a scalar: ~0.4 us on a CPU, against ~19 for isfinite().any()
        if math.isnan(value) or (math.isinf(value) and not scaled):
            raise FloatingPointError(
                f"{type(self).__name__}: {self._loss_term(loss)} at step "
                f"{self.trainer.global_step} (frame {self.frames}); stopped before the "
                "optimizer step"
            )

    @property
    def defer_loss_checks(self) -> bool:
        """Whether the losses are checked once per training_step rather than before each
        backward: on an accelerator, where reading one waits for the device."""
        return self.device.type != "cpu"

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._nonfinite is None:
            return
        bad, self._nonfinite = bool(self._nonfinite), None  # the one device read of the step
        if bad:
            raise FloatingPointError(
                f"{type(self).__name__}: {self._loss_term(torch.tensor(math.nan))} in the "
                f"updates before step {self.trainer.global_step} (frame {self.frames}); "
                "stopped before any checkpoint of them"
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
        self._direct_steps = not self.automatic_optimization and direct_steps_possible(
            self.trainer, self
        )
        self._stop_at_budget()  # a resumed run may already have spent its budget
        # A checkpoint written on an exception is mid-epoch, and Lightning resumes such an epoch
        # without on_train_epoch_start, where algorithms set lr and per-rollout schedules.
        if self.trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start()

    def backward_step(
        self, loss: Tensor, optimizer: Any, max_grad_norm: float | None = None
    ) -> None:
        """One optimizer step on ``loss`` under manual optimization: zero the gradients,
        backward, clip the global norm to ``max_grad_norm`` (None: no clipping), step.

        Through Lightning's ``manual_backward`` and ``LightningOptimizer.step``; where
        :func:`direct_steps_possible`, the same calls without their hook dispatch (the loss
        check, the step counting behind ``global_step`` and the profiler are kept).

        Args:
            loss: the update's loss.
            optimizer: one of ``self.optimizers()``.
            max_grad_norm: the largest global gradient norm, or None.
        """
        optimizer.zero_grad(set_to_none=True)
        if self._direct_steps:
            self.on_before_backward(loss)
            loss.backward()
            clip_grad_norm(self, optimizer, max_grad_norm)
            optimizer._on_before_step()  # Lightning's step count and profiler (manual loop)
            optimizer.optimizer.step()
            optimizer._on_after_step()
        else:
            self.manual_backward(loss)
            clip_grad_norm(self, optimizer, max_grad_norm)
            optimizer.step()

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
