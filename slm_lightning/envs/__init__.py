"""Vector-env factory, legacy-name migration and normaliser state."""

from slm_lightning.envs.factory import make_vector_env, probe_spaces
from slm_lightning.envs.names import migrate_env_id
from slm_lightning.envs.pomdp import CARTPOLE_NO_VELOCITY_ID, register_pomdp_envs
from slm_lightning.envs.spec import AtariSpec, EnvSpec
from slm_lightning.errors import ConfigError

# Our own env ids resolve wherever gymnasium's registry is asked (CLI, probe_spaces, workers).
register_pomdp_envs()

__all__ = [
    "AtariSpec",
    "CARTPOLE_NO_VELOCITY_ID",
    "ConfigError",
    "EnvSpec",
    "make_vector_env",
    "migrate_env_id",
    "probe_spaces",
]
