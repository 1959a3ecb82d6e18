"""Adam with one learning rate per network and global-norm gradient clipping that works under
every Lightning precision: the pieces an algorithm's optimizer hooks are made of."""

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from slm_lightning.schedules import scheduled


def loss_scaling(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` scales the loss (``16-mixed``'s GradScaler; not ``bf16-mixed``).

    Args:
        trainer: the module's trainer, None outside fit.
    """
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def adam(
    param_groups: Sequence[Sequence[nn.Parameter]], lr: float, eps: float, scaled_loss: bool
) -> torch.optim.Adam:
    """One Adam with one parameter group per network (e.g. actor and a separate critic), so
    each gets its own learning rate; Adam keeps per-parameter moments anyway.

    Args:
        param_groups: the parameters of each network, in the order their rates are set.
        lr: the initial learning rate of every group.
        eps: Adam's epsilon.
        scaled_loss: the trainer scales the loss (see :func:`loss_scaling`).
    """
    groups = [{"params": list(params)} for params in param_groups]
    # fused: one kernel for all parameters, ~20% faster on the small nets of classic control.
    # Not under 16-mixed: a fused Adam unscales inside step(), after clipping would have
    # seen the scaled gradients (Lightning then refuses to clip).
    return torch.optim.Adam(groups, lr=lr, eps=eps, fused=not scaled_loss)


def set_learning_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
    """Set the learning rate of each parameter group, in order (a group beyond ``rates``
    keeps its rate; a rate beyond the groups is ignored).

    Args:
        optimizer: the optimizer.
        rates: one learning rate per parameter group.
    """
    for group, rate in zip(optimizer.param_groups, rates, strict=False):
        group["lr"] = rate


def clip_grad_norm(
    module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float | None
) -> None:
    """Clip the global gradient norm of ``optimizer``'s parameters to ``max_norm`` (None: no
    clipping); call from ``configure_gradient_clipping``.

    Args:
        module: the algorithm (its trainer tells whether the loss is scaled).
        optimizer: the optimizer about to step.
        max_norm: the largest global norm, or None.
    """
    if max_norm is None:
        return
    if not loss_scaling(module._trainer):
        # No loss scaling (32-true, bf16-mixed): the gradients are the true ones, so the
        # fused Adam may be clipped. Lightning 2.6's MixedPrecision.clip_gradients refuses any
        # optimizer that can unscale inside step() (fused Adam) even under bf16-mixed,
        # which has no GradScaler and nothing to unscale; clip here instead.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:  # 16-mixed: Lightning unscales first (adam() then avoids the fused kernel)
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


class PolicyAdam:
    """The optimizer hooks of an algorithm trained by one Adam over
    ``self.policy.param_groups()``; put it before the algorithm's base class
    (``class DQN(PolicyAdam, OffPolicyAlgorithm)``) so its hooks override
    ``LightningModule``'s.

    - ``configure_optimizers``: :func:`adam` at the first rate of :meth:`learning_rates`,
      with the class's ``adam_eps``, fused unless the trainer scales the loss (16-mixed);
    - ``on_train_epoch_start``: the rates of :meth:`learning_rates` at the current frame,
      set once per rollout and logged as ``train/lr`` (the first group's);
    - ``configure_gradient_clipping``: :func:`clip_grad_norm` to ``max_grad_norm``; the
      Trainer's ``gradient_clip_val``, when given, overrides it.

    The algorithm provides ``policy``, ``lr``, ``max_grad_norm`` and the frame clock
    (``frames``, ``max_frames``) of :class:`~slm_lightning.algorithms.base.RLAlgorithm`.
    """

    adam_eps: float = 1e-5

    def learning_rates(self, frames: int) -> tuple[float, ...]:
        """The learning rate of each parameter group at ``frames`` (here ``lr`` for the
        first group; later groups keep theirs).

        Args:
            frames: the frame clock.
        """
        return (scheduled(self.lr, frames, self.max_frames),)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam, every group at the first rate of :meth:`learning_rates` at frame 0."""
        lr = self.learning_rates(0)[0]
        return adam(self.policy.param_groups(), lr, self.adam_eps, loss_scaling(self._trainer))

    def on_train_epoch_start(self) -> None:
        """Set the scheduled learning rates before the rollout's updates and log them."""
        rates = self.learning_rates(self.frames)
        set_learning_rates(self.trainer.optimizers[0], rates)
        self.train_metrics.set({"train/lr": rates[0]})

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the global gradient norm to ``max_grad_norm`` (or ``gradient_clip_val``).

        Args:
            optimizer: the optimizer about to step.
            gradient_clip_val: the Trainer's clipping value; None uses ``max_grad_norm``.
            gradient_clip_algorithm: ignored: the norm is always clipped.
        """
        max_norm = self.max_grad_norm if gradient_clip_val is None else gradient_clip_val
        clip_grad_norm(self, optimizer, max_norm)
