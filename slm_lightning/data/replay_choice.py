"""Which replay memory class stores an env's transitions, chosen from its observation space."""

import numpy as np

from slm_lightning.data.frame_replay import FrameReplay, PrioritizedFrameReplay
from slm_lightning.data.prioritized import PrioritizedReplay
from slm_lightning.data.replay import ReplayLayout, ReplayMemory


def stacks_frames(layout: ReplayLayout) -> bool:
    """Whether observations are channels-first stacks of uint8 frames, ``(stack, H, W[, C])``
    with ``1 < stack < min(H, W)``: ale-py's ``AtariVectorEnv`` and gymnasium's
    ``FrameStackObservation`` over images put the stack first. An unstacked image
    ``(H, W, C)`` has no such short leading axis.

    Args:
        layout: the memory's layout.
    """
    shape = layout.obs_shape
    return layout.obs_dtype == np.uint8 and len(shape) >= 3 and 1 < shape[0] < min(shape[1:3])


def make_replay(
    layout: ReplayLayout, prioritized: bool = False, alpha: float = 0.6, eps: float = 1e-6
) -> ReplayMemory:
    """The replay memory for ``layout``: prioritized or uniform, and for stacks of uint8 frames
    a frame memory, which stores each frame once (~7.5 instead of 56 GB for 1M Atari
    transitions) and returns the same batches, so the choice is no hyperparameter.

    Args:
        layout: capacity, shapes, dtypes, n-step and sampling settings.
        prioritized: prioritized replay (Schaul et al. 2016).
        alpha: the priority exponent of prioritized replay.
        eps: added to ``|TD error|`` in prioritized replay's priorities.
    """
    frames = stacks_frames(layout)
    if prioritized:
        return (PrioritizedFrameReplay if frames else PrioritizedReplay)(
            layout, alpha=alpha, eps=eps
        )
    return (FrameReplay if frames else ReplayMemory)(layout)
