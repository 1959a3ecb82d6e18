"""Users' own envs (gymnasium's ``module:EnvId``), shipped configs pointed at other envs, and
legacy Atari ids that keep their v4 settings."""

import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml

from slm_lightning.cli import main
from slm_lightning.envs.atari import AtariSpec
from slm_lightning.envs.blocks import BlockVectorEnv
from slm_lightning.envs.factory import EnvSpec, make_single_env, resolve_vectorization
from slm_lightning.envs.names import migrate_env_id
from tests.cli_helpers import fit_in

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
PPO_CARTPOLE = str(CONFIGS / "ppo_cartpole.yaml")
CORRIDOR = "tests.envs_fixture:Corridor-v0"
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR\s+(.*)$", re.MULTILINE)


def fit(run_dir: Path, *extra: str) -> dict:
    """A short PPO fit from the shipped CartPole config; returns its ``summary.json``."""
    return fit_in(
        run_dir,
        "--model.init_args.max_frames=512",
        "--model.init_args.time_horizon=32",
        *extra,
        config=PPO_CARTPOLE,
    ).summary


@pytest.mark.parametrize("vectorization", ["sync", "blocks"])
def test_module_prefixed_env_id_fits(vectorization: str, isolated_run: Path) -> None:
    summary = fit(
        isolated_run / "run",
        f"--model.init_args.env.name={CORRIDOR}",
        "--model.init_args.env.num_envs=4",
        f"--model.init_args.env.vectorization={vectorization}",
        "--model.init_args.env.num_workers=2",
    )
    # 4 envs x 32 steps = 128 frames per rollout; a random walk of 4 cells ends episodes.
    assert summary["env"] == CORRIDOR
    assert summary["frames"] == 512
    assert summary["episodes"] > 0
    assert 0.0 < summary["return_ma"] <= 1.0


def test_module_prefixed_env_id_validates(isolated_run: Path, capsys) -> None:
    env = [f"--model.init_args.env.name={CORRIDOR}", "--model.init_args.env.num_envs=2"]
    fit(isolated_run / "run", *env)
    main(
        [
            "validate",
            "--config",
            PPO_CARTPOLE,
            *env,
            "--model.init_args.eval_episodes=3",
            f"--ckpt_path={isolated_run / 'run' / 'checkpoints' / 'last.ckpt'}",
            f"--trainer.default_root_dir={isolated_run / 'eval'}",
        ]
    )
    assert re.search(r"eval: episodes=3 greedy=True return_mean=", capsys.readouterr().err)


def test_module_prefixed_env_builds_in_a_fresh_worker_process() -> None:
    # A spawned worker starts without the parent's registry (unlike a forked one, the Linux
    # default), so it must import the module named in the id itself.
    spec = EnvSpec(name=CORRIDOR, num_envs=2)
    env = BlockVectorEnv([partial(make_single_env, spec)] * 2, num_workers=1, context="spawn")
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (2, 1)
        obs, *_ = env.step(np.array([1, 0]))
        np.testing.assert_allclose(obs[:, 0], [0.25, 0.0])
    finally:
        env.close()


def test_unknown_module_in_env_id_is_one_line(isolated_run: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        fit(isolated_run / "run", "--model.init_args.env.name=no_such_package.envs:Corridor-v0")
    assert exc.value.code == 2
    (line,) = ERROR_LINE.findall(capsys.readouterr().err)
    assert line.startswith("model.init_args.env.name: No module named 'no_such_package'")


def test_shipped_cartpole_config_runs_another_env(isolated_run: Path) -> None:
    summary = fit(isolated_run / "run", "--model.init_args.env.name=Acrobot-v1")
    assert summary["env"] == "Acrobot-v1"
    assert summary["frames"] == 64 * 32 * 1  # one rollout of 64 envs x 32 steps: 2048 > 512


def env_spec(config: Path) -> EnvSpec:
    env = yaml.safe_load(config.read_text())["model"]["init_args"]["env"]
    return EnvSpec(**{**env, "atari": AtariSpec(**env.get("atari", {}))})


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_keep_their_vectorization(config: Path) -> None:
    spec = env_spec(config)
    # Configs ship `auto` (or leave it out), so another env on the command line gets its own
    # best mode; for a config's own env, auto must pick what the config used to pin: the
    # native vector env wherever there is one (the CartPole configs' benchmark figures).
    assert spec.vectorization == "auto"
    registry_spec = spec.registry_spec()
    if registry_spec.vector_entry_point is not None and spec.frame_stack == 1:
        assert resolve_vectorization(spec, registry_spec) == "vector_entry_point"


def test_cartpole_configs_use_the_native_vector_env() -> None:
    for name in ("ppo_cartpole", "ppo_shared_cartpole", "ppo_rnn_cartpole_pomdp"):
        spec = env_spec(CONFIGS / f"{name}.yaml")
        assert resolve_vectorization(spec, spec.registry_spec()) == "vector_entry_point", name


class CapturedAtariVectorEnv:
    """Stands in for ale-py's AtariVectorEnv and keeps the keyword arguments it was given."""

    kwargs: dict = {}

    def __init__(self, game: str, num_envs: int, **kwargs) -> None:
        type(self).kwargs = kwargs
        raise RuntimeError("captured")


@pytest.mark.parametrize(
    ("name", "sticky", "full"),
    [("PongNoFrameskip-v4", 0.0, False), ("ALE/Pong-v5", 0.25, False)],
)
def test_legacy_atari_id_keeps_v4_actions(name, sticky, full, monkeypatch, warnings_logged):
    import ale_py.vector_env

    from slm_lightning.envs.atari import make_atari_env

    migrate_env_id.cache_clear()  # the migration warning is logged once per process
    monkeypatch.setattr(ale_py.vector_env, "AtariVectorEnv", CapturedAtariVectorEnv)
    spec = EnvSpec(name=name, num_envs=2)
    with pytest.raises(RuntimeError, match="captured"):
        make_atari_env(spec, spec.registry_spec())

    assert CapturedAtariVectorEnv.kwargs["repeat_action_probability"] == sticky
    assert CapturedAtariVectorEnv.kwargs["full_action_space"] is full
    if name == "PongNoFrameskip-v4":
        assert warnings_logged == [
            "env id PongNoFrameskip-v4 is a legacy name; using ALE/Pong-v5 with "
            "repeat_action_probability=0.0, full_action_space=False"
        ]
