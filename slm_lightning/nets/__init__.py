"""Network bodies and policy/value heads."""

from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.mlp import MLPSpec, mlp_body, orthogonal_init
from slm_lightning.nets.q_network import QNetwork, boltzmann, epsilon_greedy

__all__ = [
    "ActorCritic",
    "MLPSpec",
    "QNetwork",
    "boltzmann",
    "epsilon_greedy",
    "mlp_body",
    "orthogonal_init",
]
