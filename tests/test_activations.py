"""Every activation an MLP, recurrent or conv spec accepts builds its torch module; ``selu`` and
``sigmoid`` (used by SLM Lab specs) reach the nets from a config."""

from pathlib import Path

import pytest
import torch
from torch import nn

from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import MLPSpec, mlp_body
from tests.cli_helpers import instantiate

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    ("name", "module", "at_minus_one"),
    [
        # SELU(-1) = scale * alpha * (e^-1 - 1) = 1.0507010 * 1.6732632 * -0.6321206
        ("selu", nn.SELU, -1.1113307),
        # sigmoid(-1) = 1 / (1 + e) = 0.2689414
        ("sigmoid", nn.Sigmoid, 0.2689414),
    ],
)
def test_mlp_spec_builds_the_named_activation(name, module, at_minus_one) -> None:
    spec = MLPSpec([3, 2], name)
    spec.check("model.init_args.actor")
    body, width = mlp_body(4, spec)
    assert width == 2
    assert [type(layer) for layer in body] == [nn.Linear, module, nn.Linear, module]
    # The module computes the named function, not another one of the same shape.
    assert body[1](torch.tensor([-1.0])).item() == pytest.approx(at_minus_one, abs=1e-6)


def test_unknown_activation_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        MLPSpec([4], "softplus").check("model.init_args.net")
    assert str(err.value) == (
        "model.init_args.net.activation must be one of ['elu', 'gelu', 'leaky_relu', 'relu', "
        "'selu', 'sigmoid', 'silu', 'tanh'], got 'softplus'"
    )


def test_selu_and_sigmoid_in_a_config_reach_the_actor_and_critic(isolated_run) -> None:
    text = (CONFIGS / "ppo_cartpole.yaml").read_text()
    assert text.count("activation: tanh") == 2  # actor, then critic
    text = text.replace("activation: tanh", "activation: selu", 1)
    config = isolated_run / "selu.yaml"
    config.write_text(text.replace("activation: tanh", "activation: sigmoid", 1))
    policy = instantiate(["--config", str(config)]).model.policy
    assert [type(m) for m in policy.actor_body[1::2]] == [nn.SELU, nn.SELU]
    assert [type(m) for m in policy.critic_body[1::2]] == [nn.Sigmoid, nn.Sigmoid]
