"""Network bodies and policy/value heads."""

from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.mlp import MLPSpec, mlp_body, orthogonal_init

__all__ = ["ActorCritic", "MLPSpec", "mlp_body", "orthogonal_init"]
