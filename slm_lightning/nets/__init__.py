"""Network bodies (MLP, conv, recurrent) and policy/value heads."""

from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvSpec
from slm_lightning.nets.mlp import MLPSpec, mlp_body, orthogonal_init
from slm_lightning.nets.q_network import QNetwork, boltzmann, epsilon_greedy
from slm_lightning.nets.recurrent import RecurrentActorCritic, RecurrentSpec

__all__ = [
    "ActorCritic",
    "ConvSpec",
    "MLPSpec",
    "QNetwork",
    "RecurrentActorCritic",
    "RecurrentSpec",
    "boltzmann",
    "epsilon_greedy",
    "mlp_body",
    "orthogonal_init",
]
