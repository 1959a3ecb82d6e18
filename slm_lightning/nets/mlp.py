"""Multi-layer perceptron bodies with orthogonal initialisation."""

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from slm_lightning.errors import ConfigError

Activation = Literal["tanh", "relu", "elu", "gelu", "silu", "leaky_relu", "selu", "sigmoid"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
}


@dataclass
class MLPSpec:
    """Shape of an MLP body.

    Args:
        hidden_sizes: width of each hidden layer; empty for a linear model.
        activation: non-linearity after each hidden layer.
    """

    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    activation: Activation = "tanh"

    def check(self, key: str) -> None:
        """Raise a :class:`ConfigError` naming ``key`` (the spec's full config key, e.g.
        ``model.init_args.actor``) for a value no net can be built from.

        Args:
            key: where the user typed this spec.
        """
        if any(size < 1 for size in self.hidden_sizes):
            raise ConfigError(f"{key}.hidden_sizes must all be >= 1, got {self.hidden_sizes}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(
                f"{key}.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )


def orthogonal_init(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights and zero bias: the initialisation PPO implementations depend on
    (Engstrom et al. 2020, "Implementation Matters in Deep Policy Gradients")."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def mlp_body(in_features: int, spec: MLPSpec) -> tuple[nn.Sequential, int]:
    """Build the hidden layers of ``spec``; returns the body and its output width."""
    layers: list[nn.Module] = []
    width = in_features
    for size in spec.hidden_sizes:
        layers += [
            orthogonal_init(nn.Linear(width, size), math.sqrt(2)),
            _ACTIVATIONS[spec.activation](),
        ]
        width = size
    return nn.Sequential(*layers), width
