"""What the replay-based algorithms' ``training_step`` needs outside ``fit``: rounds of
batches and Lightning's manual optimization."""

from types import SimpleNamespace

import lightning as L
import torch

from slm_lightning.data.replay import ReplayBatch


def stack(*batches: ReplayBatch) -> ReplayBatch:
    """One cycle's batches stacked on a first axis, as ``sample_batches`` returns them."""
    return ReplayBatch(
        *(None if parts[0] is None else torch.stack(parts) for parts in zip(*batches, strict=True))
    )


def one_round(*batches: ReplayBatch) -> list[ReplayBatch]:
    """A round of one cycle per batch, each cycle one update: what ``training_step`` iterates."""
    return [stack(batch) for batch in batches]


def manual_optimization(model, optimizers: list[torch.optim.Optimizer] | None = None) -> list:
    """What Lightning's manual optimization provides: the optimizers (the configured ones
    unless given), ``manual_backward``, and a trainer without loss scaling."""
    if optimizers is None:
        optimizers = model.configure_optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    model.optimizers = lambda: optimizers if len(optimizers) > 1 else optimizers[0]
    model.manual_backward = lambda loss: loss.backward()
    if getattr(model, "_trainer", None) is None:
        model.trainer = SimpleNamespace(
            optimizers=optimizers, world_size=1, precision_plugin=SimpleNamespace()
        )
    return optimizers


class CountBackwards(L.Callback):
    """A callback with a backward hook: Lightning must dispatch it after every backward."""

    def __init__(self) -> None:
        self.backwards = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backwards += 1
