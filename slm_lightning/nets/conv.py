"""Convolutional bodies for image observations (the Nature DQN CNN by default)."""

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import _ACTIVATIONS, Activation, orthogonal_init


@dataclass
class ConvSpec:
    """Shape of a conv body: ``Conv2d`` layers (no padding), flatten, then one linear layer.

    The default is the Nature DQN network (Mnih et al. 2015): 32 8x8 filters stride 4,
    64 4x4 stride 2, 64 3x3 stride 1, then 512 units, ReLU throughout.

    Args:
        channels: output channels of each conv layer.
        kernel_sizes: square kernel size of each conv layer.
        strides: stride of each conv layer.
        hidden_size: width of the linear layer after the convs; 0 for none (the body then
            outputs the flattened conv features).
        activation: non-linearity after every layer.
        precision: compute dtype of the conv body. ``bfloat16`` runs it under autocast, in the
            rollout and in training alike (the heads stay float32, see :func:`full_precision`):
            about 2x faster conv training on CPUs with AVX512-BF16 or AMX, tensor cores on
            GPUs, but slow where bf16 is emulated. ``auto`` picks bfloat16 where the device
            supports it natively, else float32. Lightning's ``trainer.precision`` covers only
            ``training_step`` (not the rollout) and rejects gradient clipping with our fused
            Adam, hence this switch.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    kernel_sizes: list[int] = field(default_factory=lambda: [8, 4, 3])
    strides: list[int] = field(default_factory=lambda: [4, 2, 1])
    hidden_size: int = 512
    activation: Activation = "relu"
    precision: Literal["auto", "float32", "bfloat16"] = "float32"

    def check(self, key: str) -> None:
        """Raise a :class:`ConfigError` naming ``key`` (e.g. ``model.init_args.conv``) for
        layers no net can be built from.

        Args:
            key: where the user typed this spec.
        """
        if not len(self.channels) == len(self.kernel_sizes) == len(self.strides):
            raise ConfigError(
                f"{key}.channels, kernel_sizes and strides must have the same length, got "
                f"{len(self.channels)}, {len(self.kernel_sizes)} and {len(self.strides)}"
            )
        if min([*self.channels, *self.kernel_sizes, *self.strides], default=1) < 1:
            raise ConfigError(f"{key}.channels, kernel_sizes and strides must all be >= 1")
        if self.hidden_size < 0:
            raise ConfigError(f"{key}.hidden_size must be >= 0, got {self.hidden_size}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(
                f"{key}.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ConfigError(
                f"{key}.precision must be one of ['auto', 'bfloat16', 'float32'], "
                f"got {self.precision!r}"
            )


@cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 convolutions natively (not emulated)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        try:  # oneDNN's check for AVX512-BF16 / AMX; private, hence the fallback
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def is_image_space(space: spaces.Space) -> bool:
    """A channel-first image Box: ``(channels, height, width)``, e.g. stacked Atari frames."""
    return isinstance(space, spaces.Box) and len(space.shape) == 3


class ConvBody(nn.Module):
    """Scales uint8 pixels to ``[0, 1]`` floats, then runs the convs and the linear layer.

    The cast and the /255 happen here, on the net's device, so rollouts and replay memories
    keep (and transfer) observations as uint8.

    Args:
        obs_shape: ``(channels, height, width)`` of one observation.
        spec: the layers.
        scale: multiplies the input after the float cast (``1/255`` for uint8 pixels).
        hidden: include ``spec.hidden_size``'s linear layer (a dueling head builds its own).
    """

    def __init__(
        self, obs_shape: tuple[int, ...], spec: ConvSpec, scale: float, hidden: bool = True
    ) -> None:
        super().__init__()
        if len(obs_shape) != 3:
            raise ConfigError(
                f"model.init_args.conv needs (channels, height, width) observations, got {obs_shape}"
            )
        self.scale = scale
        self.precision = spec.precision
        layers: list[nn.Module] = []
        in_channels = obs_shape[0]
        for out_channels, kernel, stride in zip(
            spec.channels, spec.kernel_sizes, spec.strides, strict=True
        ):
            conv = nn.Conv2d(in_channels, out_channels, kernel, stride)
            layers += [orthogonal_init(conv, math.sqrt(2)), _ACTIVATIONS[spec.activation]()]
            in_channels = out_channels
        layers.append(nn.Flatten())
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, *obs_shape)).shape[1]
        if flat == 0:
            raise ConfigError(
                f"model.init_args.conv layers reduce a {obs_shape} observation to nothing"
            )
        self.linear: nn.Module = nn.Identity()
        self.out_features = flat
        if hidden and spec.hidden_size:
            self.linear = nn.Sequential(
                orthogonal_init(nn.Linear(flat, spec.hidden_size), math.sqrt(2)),
                _ACTIVATIONS[spec.activation](),
            )
            self.out_features = spec.hidden_size

    def forward(self, obs: Tensor) -> Tensor:
        device = obs.device.type
        if self.precision == "bfloat16" or (self.precision == "auto" and native_bf16(device)):
            with torch.autocast(device, dtype=torch.bfloat16):
                # Straight to bf16, which holds the integers 0..255 exactly: a float32 copy
                # of a 256-frame-stack minibatch would cost as much as a conv layer.
                x = obs.to(torch.bfloat16, copy=True).mul_(self.scale)
                return self.linear(self.convs(x)).float()
        # The features leave as float32 also under an outer autocast (trainer.precision).
        return self.linear(self.convs(obs.float() * self.scale)).float()


class FlatBody(nn.Module):
    """Flattens each observation to a float vector (the input of an MLP body)."""

    def __init__(self, obs_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_features = int(np.prod(obs_shape))

    def forward(self, obs: Tensor) -> Tensor:
        return obs.flatten(1).float()


def full_precision(features: Tensor) -> AbstractContextManager:
    """A context that turns autocast off on ``features``' device.

    The policy and value heads after a (possibly bf16-autocast) trunk compute in float32:
    bf16 keeps 8 bits of mantissa, enough for conv features but not for PPO's probability
    ratios, which would start an update ~1% away from 1, nor for values and TD targets.
    The heads are small, so this costs nothing measurable.
    """
    device = features.device.type
    if not torch.is_autocast_enabled(device):  # entering autocast costs µs on tiny MLP steps
        return nullcontext()
    return torch.autocast(device, enabled=False)


def observation_encoder(
    observation_space: spaces.Space, conv: ConvSpec | None, hidden: bool = True
) -> ConvBody | FlatBody:
    """The trunk that turns observations into feature vectors.

    A :class:`ConvBody` for image observations (the Nature CNN when ``conv`` is None),
    scaled by ``1/255`` when the space is uint8; a :class:`FlatBody` for anything else.

    Args:
        observation_space: a single observation's space.
        conv: the conv layers; None picks by the space.
        hidden: include the conv body's linear layer.
    """
    shape = tuple(observation_space.shape)
    if conv is None and not is_image_space(observation_space):
        return FlatBody(shape)
    uint8 = getattr(observation_space, "dtype", None) == np.uint8
    return ConvBody(shape, conv or ConvSpec(), scale=1.0 / 255.0 if uint8 else 1.0, hidden=hidden)
