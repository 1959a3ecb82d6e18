"""The optimizer an algorithm trains with (:class:`OptimizerSpec`: Adam, AdamW, RMSprop or SGD
and their keyword arguments), one learning rate per network, and global-norm gradient clipping
that works under every Lightning precision: the pieces an algorithm's optimizer hooks are made
of."""

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from slm_lightning.errors import ConfigError
from slm_lightning.schedules import scheduled

OptimizerName = Literal["Adam", "AdamW", "RMSprop", "SGD"]
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
    "SGD": torch.optim.SGD,
}
# The optimizers built fused here (one kernel for all parameters, ~20% faster on the small nets
# of classic control). torch 2.12 has a fused SGD as well, but SGD and RMSprop keep torch's
# defaults: their fused / foreach kernels were never measured here.
FUSED = ("Adam", "AdamW")
# The config key of the optimizer, as users type it.
OPTIMIZER_KEY = "model.init_args.optimizer"


@dataclass(frozen=True)
class OptimizerSpec:
    """Which torch optimizer trains the networks, with its keyword arguments.

    A field left None takes the algorithm's default where it has one (``eps`` 1e-5 for the
    policy-gradient family and SARSA, 1e-8 for DQN; CrossQ's ``betas`` from ``adam_beta1``),
    else torch's. A field the chosen optimizer does not take is an error. The learning rate
    is the algorithm's ``lr`` (and ``critic_lr`` …), scheduled over frames.

    Args:
        name: ``Adam``, ``AdamW`` (decoupled weight decay, Loshchilov & Hutter 2019),
            ``RMSprop`` or ``SGD``.
        eps: added to the denominator for numerical stability (Adam, AdamW, RMSprop).
        weight_decay: L2 penalty, decoupled for AdamW (torch's defaults: 0, AdamW 0.01).
        betas: decay rates of the first and second moment estimates (Adam, AdamW).
        amsgrad: the AMSGrad variant (Adam, AdamW).
        alpha: smoothing constant of the squared-gradient average (RMSprop).
        centered: normalise by the gradient's estimated variance (RMSprop).
        momentum: momentum factor (RMSprop, SGD).
        dampening: dampening of the momentum (SGD).
        nesterov: Nesterov momentum (SGD; needs momentum > 0 and dampening 0).
    """

    name: OptimizerName = "Adam"
    eps: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    amsgrad: bool | None = None
    alpha: float | None = None
    centered: bool | None = None
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"{OPTIMIZER_KEY}.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}"
            )
        if self.betas is not None:  # a list from Python or YAML; torch saves a tuple
            object.__setattr__(self, "betas", tuple(self.betas))
        taken = self.accepted()
        for key in self.given():
            if key not in taken:
                raise ConfigError(
                    f"{OPTIMIZER_KEY}.{key}: {self.name} takes no {key}; it takes "
                    f"{', '.join(taken)}"
                )
        self._check_values()

    def _check_values(self) -> None:
        """Raise a ConfigError naming the first value torch would reject or misuse."""
        bounds = {  # key: (test, what is allowed)
            "eps": (lambda v: v > 0, "> 0"),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "alpha": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "momentum": (lambda v: v >= 0, ">= 0"),
            "dampening": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        }
        for key, (ok, allowed) in bounds.items():
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"{OPTIMIZER_KEY}.{key} must be {allowed}, got {value}")
        if self.betas is not None and (
            len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas)
        ):
            raise ConfigError(
                f"{OPTIMIZER_KEY}.betas must be two numbers in [0, 1), got {list(self.betas)}"
            )
        if self.nesterov and not ((self.momentum or 0) > 0 and not self.dampening):
            raise ConfigError(
                f"{OPTIMIZER_KEY}.nesterov needs momentum > 0 and dampening 0, got momentum "
                f"{self.momentum} and dampening {self.dampening}"
            )

    def accepted(self) -> list[str]:
        """The fields of this spec that the chosen torch optimizer takes (read off its
        signature)."""
        parameters = inspect.signature(OPTIMIZERS[self.name]).parameters
        return [f.name for f in fields(self) if f.name != "name" and f.name in parameters]

    def defaults_of_optimizer(self, keys: Iterable[str]) -> dict[str, Any]:
        """The torch optimizer's own default of each of ``keys`` it takes: what a parameter
        group that should not follow an algorithm's defaults (``{"betas": ...}``) sets.

        Args:
            keys: keyword argument names.
        """
        parameters = inspect.signature(OPTIMIZERS[self.name]).parameters
        return {key: parameters[key].default for key in keys if key in parameters}

    def given(self) -> dict[str, Any]:
        """The keyword fields set (not None)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "name" and getattr(self, f.name) is not None
        }

    def kwargs(self, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The optimizer's keyword arguments: the algorithm's ``defaults`` that it takes, then
        the fields given, which win.

        Args:
            defaults: the algorithm's own defaults (``{"eps": 1e-5}``); keys the optimizer does
                not take are dropped (SGD has no ``eps``).
        """
        taken = self.accepted()
        chosen = {key: value for key, value in (defaults or {}).items() if key in taken}
        return {**chosen, **self.given()}

    def build(
        self,
        param_groups: Sequence[Iterable[nn.Parameter]],
        lr: float,
        defaults: Mapping[str, Any] | None = None,
        fused: bool = True,
    ) -> torch.optim.Optimizer:
        """The optimizer with one parameter group per network (e.g. actor and a separate
        critic), so each gets its own learning rate.

        Args:
            param_groups: the parameters of each network, in the order their rates are set.
            lr: the initial learning rate of every group.
            defaults: the algorithm's defaults for fields left None (see :meth:`kwargs`).
            fused: use the fused kernel (Adam, AdamW only; see :data:`FUSED`).
        """
        kwargs = self.kwargs(defaults)
        if self.name in FUSED:
            kwargs["fused"] = fused
        groups = [{"params": list(params)} for params in param_groups]
        return OPTIMIZERS[self.name](groups, lr=lr, **kwargs)


def loss_scaling(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` scales the loss (``16-mixed``'s GradScaler; not ``bf16-mixed``).

    Args:
        trainer: the module's trainer, None outside fit.
    """
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def set_learning_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
    """Set the learning rate of each parameter group, in order (a group beyond ``rates``
    keeps its rate; a rate beyond the groups is ignored).

    Args:
        optimizer: the optimizer.
        rates: one learning rate per parameter group.
    """
    for group, rate in zip(optimizer.param_groups, rates, strict=False):
        group["lr"] = rate


def clip_global_norm(grads: list[Tensor], max_norm: float) -> None:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does (scale ``max_norm / (norm + 1e-6)`` where below
    1), without a host sync.

    Four ops: torch 2.12's ``clip_grad_norm_`` takes its per-tensor path on CPUs (its
    ``foreach`` path is slower there still) and costs ~80 us on a 64-64 MLP against ~50 us
    here, a tenth of a small DQN update.

    Args:
        grads: the gradients (no None).
        max_norm: the largest global norm.
    """
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))


def clip_grad_norm(
    module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float | None
) -> None:
    """Clip the global gradient norm of ``optimizer``'s parameters to ``max_norm`` (None: no
    clipping), before the optimizer steps (every algorithm's update, under manual
    optimization).

    Args:
        module: the algorithm (its trainer tells whether the loss is scaled).
        optimizer: the optimizer about to step.
        max_norm: the largest global norm, or None.
    """
    if max_norm is None:
        return
    if not loss_scaling(module._trainer):
        # No loss scaling (32-true, bf16-mixed): the gradients are the true ones, so the
        # fused Adam / AdamW may be clipped. Lightning 2.6's MixedPrecision.clip_gradients refuses any
        # optimizer that can unscale inside step() (fused Adam) even under bf16-mixed,
        # which has no GradScaler and nothing to unscale; clip here instead.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        clip_global_norm([grad for grad in grads if grad is not None], max_norm)
    else:  # 16-mixed: Lightning unscales first (PolicyOptimizer then avoids the fused kernel)
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


class PolicyOptimizer:
    """The optimizer hooks of an algorithm trained by one optimizer over
    ``self.policy.param_groups()``; put it before the algorithm's base class
    (``class DQN(PolicyOptimizer, OffPolicyAlgorithm)``) so its hooks override
    ``LightningModule``'s.

    - ``configure_optimizers``: ``optimizer_spec`` (:class:`OptimizerSpec`, Adam by default)
      at the first rate of :meth:`learning_rates`, with the class's ``optimizer_defaults``
      for the fields left None, fused (Adam, AdamW) unless the trainer scales the loss;
    - ``on_train_epoch_start``: the rates of :meth:`learning_rates` at the current frame,
      set once per rollout and logged as ``train/lr`` (the first group's).

    The algorithms step under manual optimization and clip to ``max_grad_norm`` themselves
    (:func:`clip_grad_norm`); Lightning refuses the Trainer's ``gradient_clip_val`` there.

    The algorithm provides ``policy``, ``lr``, ``optimizer_spec``, ``max_grad_norm`` and the
    frame clock (``frames``, ``max_frames``) of
    :class:`~slm_lightning.algorithms.base.RLAlgorithm`.
    """

    # Keyword arguments of the optimizer where the config leaves them None: Adam's epsilon of
    # 1e-5 (PPO's reference implementations; torch's is 1e-8).
    optimizer_defaults: Mapping[str, Any] = {"eps": 1e-5}
    optimizer_spec: OptimizerSpec

    def learning_rates(self, frames: int) -> tuple[float, ...]:
        """The learning rate of each parameter group at ``frames`` (here ``lr`` for the
        first group; later groups keep theirs).

        Args:
            frames: the frame clock.
        """
        return (scheduled(self.lr, frames, self.max_frames),)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """``optimizer_spec``'s optimizer, every group at the first rate of
        :meth:`learning_rates` at frame 0."""
        lr = self.learning_rates(0)[0]
        # Fused, but not under 16-mixed: a fused Adam unscales inside step(), after clipping
        # would have seen the scaled gradients (Lightning then refuses to clip).
        fused = not loss_scaling(self._trainer)
        groups = self.policy.param_groups()
        return self.optimizer_spec.build(groups, lr, self.optimizer_defaults, fused)

    def on_train_epoch_start(self) -> None:
        """Set the scheduled learning rates before the rollout's updates and log them."""
        rates = self.learning_rates(self.frames)
        set_learning_rates(self.trainer.optimizers[0], rates)
        self.train_metrics.set({"train/lr": rates[0]})


# Settings of a parameter group that say how the step is computed, not what it computes: a
# resume may change them (fused depends on the precision; lr is set by the schedule).
_IMPLEMENTATION_KEYS = ("params", "lr", "initial_lr", "fused", "foreach", "capturable")


def check_resumed_optimizers(
    model: L.LightningModule, checkpoint: Mapping[str, Any], path: str
) -> None:
    """Raise a one-line ConfigError unless ``model`` configures the optimizers that
    ``checkpoint`` saved: the same class and the same keyword arguments.

    torch's ``Optimizer.load_state_dict`` would otherwise replace the configured settings
    (``eps``, ``weight_decay`` …) with the saved ones without a word, and turn an AdamW into
    the checkpoint's Adam (the flag ``decoupled_weight_decay`` is a group setting). A
    checkpoint without a saved ``optimizer`` hyperparameter was trained with Adam.

    Args:
        model: the configured algorithm, before fit.
        checkpoint: the loaded checkpoint of ``--ckpt_path``.
        path: its file, for the message.
    """
    spec = getattr(model, "optimizer_spec", None)
    saved_states = checkpoint.get("optimizer_states") or []
    if spec is None or not saved_states:
        return
    saved_spec = checkpoint.get("hyper_parameters", {}).get("optimizer")
    if saved_spec is None:
        saved_name = "Adam"
    elif isinstance(saved_spec, Mapping):
        saved_name = saved_spec.get("name", "Adam")
    else:
        saved_name = saved_spec.name
    if saved_name != spec.name:
        raise ConfigError(
            f"ckpt_path: {path} was trained with {saved_name}; this config has "
            f"{OPTIMIZER_KEY}.name={spec.name}: they must match to resume "
            "(or --warm_start for the weights alone)"
        )
    configured = model.configure_optimizers()
    configured = configured if isinstance(configured, list | tuple) else [configured]
    for optimizer, saved in zip(configured, saved_states, strict=False):
        ours, theirs = optimizer.param_groups[0], saved["param_groups"][0]
        for key, value in ours.items():
            if key not in _IMPLEMENTATION_KEYS and key in theirs and theirs[key] != value:
                raise ConfigError(
                    f"ckpt_path: {path} was trained with {spec.name} {key}={theirs[key]}; "
                    f"this config gives {key}={value} ({OPTIMIZER_KEY}): they must match "
                    "to resume (or --warm_start for the weights alone)"
                )
