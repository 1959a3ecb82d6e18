"""Cheap learning checks: each algorithm beats a random CartPole policy within a small budget,
and PPO drives a continuous-action env with actions inside its Box."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slm_lightning import cli as cli_module
from slm_lightning.algorithms import PPO, RLAlgorithm

CONFIGS = Path(__file__).parents[1] / "configs"
RANDOM_CARTPOLE_RETURN = 22  # mean episode return of the uniform random policy


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["slm-lab"])


def fit(config: str, run_dir: Path, *extra: str) -> dict:
    cli_module.main(
        ["fit", "--config", str(CONFIGS / config), f"--trainer.default_root_dir={run_dir}", *extra]
    )
    return json.loads((run_dir / "summary.json").read_text())


# Seed 0 ends these budgets at a 100-episode mean return of about 180-260, well above the
# asserted 100 (so a config retune has room); each run takes 2-3 s.
@pytest.mark.parametrize(
    ("config", "max_frames"),
    [
        ("ppo_cartpole.yaml", 30_000),
        ("a2c_cartpole.yaml", 40_000),
        ("a2c_nstep_cartpole.yaml", 40_000),
        ("reinforce_cartpole.yaml", 50_000),
    ],
    ids=["ppo", "a2c-gae", "a2c-nstep", "reinforce"],
)
def test_cartpole_beats_random_policy(config: str, max_frames: int, tmp_path: Path) -> None:
    s = fit(config, tmp_path / "run", f"--model.init_args.max_frames={max_frames}")
    assert s["frames"] >= max_frames
    assert s["episodes"] >= 100  # the moving average covers a full window
    assert s["return_ma"] > 100, (
        f"{config}: return_ma {s['return_ma']} (random ~{RANDOM_CARTPOLE_RETURN})"
    )


def test_pendulum_actions_inside_box(tmp_path: Path, monkeypatch) -> None:
    sent: list[tuple[np.ndarray, np.ndarray]] = []
    original = RLAlgorithm.env_actions

    def spy(self, actions: np.ndarray) -> np.ndarray:
        env_actions = original(self, actions)
        sent.append((np.array(actions), np.array(env_actions)))
        return env_actions

    monkeypatch.setattr(RLAlgorithm, "env_actions", spy)
    made = []

    class Recording(cli_module.SLMLabCLI):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli_module, "SLMLabCLI", Recording)
    num_envs, frames = 4, 2048
    s = fit(
        "ppo_pendulum.yaml",
        tmp_path / "run",
        f"--model.init_args.max_frames={frames}",
        f"--model.init_args.env.num_envs={num_envs}",
        "--model.init_args.time_horizon=128",
    )
    model = made[0].model
    assert isinstance(model, PPO)
    low, high = model.action_space.low, model.action_space.high
    assert (low, high) == (pytest.approx([-2.0]), pytest.approx([2.0]))

    assert len(sent) == frames // num_envs
    raw = np.concatenate([r for r, _ in sent])
    env = np.concatenate([e for _, e in sent])
    assert env.shape == (frames, 1) and np.issubdtype(env.dtype, np.floating)
    assert np.isfinite(env).all()
    assert (env >= low).all() and (env <= high).all()
    # The Gaussian samples do leave [-1, 1]; they are clipped there and rescaled onto the Box.
    assert (np.abs(raw) > 1).any()
    np.testing.assert_allclose(env, low + (np.clip(raw, -1, 1) + 1) * 0.5 * (high - low), rtol=1e-6)
    assert env.min() < -0.5 and env.max() > 0.5

    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(64)]))
    with torch.no_grad():
        dist, _ = model.policy(obs)
    greedy = model.env_actions(model.policy.greedy(dist).numpy())
    assert (greedy >= low).all() and (greedy <= high).all()

    assert s["frames"] >= frames and s["episodes"] > 0
    assert -16.3 * 200 <= s["return_ma"] <= 0  # Pendulum's per-step reward is in [-16.3, 0]
