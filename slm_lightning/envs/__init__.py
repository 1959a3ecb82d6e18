"""Vector-env factory, legacy-name migration and normaliser state."""

from slm_lightning.envs.factory import ConfigError, EnvSpec, make_vector_env, probe_spaces
from slm_lightning.envs.names import migrate_env_id

__all__ = ["ConfigError", "EnvSpec", "make_vector_env", "migrate_env_id", "probe_spaces"]
