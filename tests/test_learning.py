"""Cheap learning checks: each algorithm beats a random CartPole policy within a small budget,
and PPO drives a continuous-action env with actions inside its Box."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.pendulum import PendulumEnv

from slm_lightning.algorithms import PPO, RLAlgorithm
from slm_lightning.callbacks import MetricsTracker

CONFIGS = Path(__file__).parents[1] / "configs"
RANDOM_CARTPOLE_RETURN = 22  # mean episode return of the uniform random policy


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
def test_cartpole_beats_random_policy(config: str, max_frames: int, run_fit) -> None:
    s = run_fit(f"--model.init_args.max_frames={max_frames}", config=CONFIGS / config).summary
    assert s["frames"] >= max_frames
    assert s["episodes"] >= 100  # the moving average covers a full window
    assert s["return_ma"] > 100, (
        f"{config}: return_ma {s['return_ma']} (random ~{RANDOM_CARTPOLE_RETURN})"
    )


def test_pendulum_actions_inside_box(monkeypatch, run_fit) -> None:
    sent: list[tuple[np.ndarray, np.ndarray]] = []
    original = RLAlgorithm.env_actions

    def spy(self, actions: np.ndarray) -> np.ndarray:
        env_actions = original(self, actions)
        sent.append((np.array(actions), np.array(env_actions)))
        return env_actions

    monkeypatch.setattr(RLAlgorithm, "env_actions", spy)
    # What each sub-env receives and returns: (sub-env, torque, raw reward) per env step.
    stepped: list[tuple[int, float, float]] = []
    pendulum_step = PendulumEnv.step

    def step(self, u):
        result = pendulum_step(self, u)
        stepped.append((id(self), float(np.asarray(u).item()), float(result[1])))
        return result

    monkeypatch.setattr(PendulumEnv, "step", step)
    num_envs, frames, horizon = 4, 2048, 128
    run = run_fit(
        f"--model.init_args.max_frames={frames}",
        f"--model.init_args.env.num_envs={num_envs}",
        "--model.init_args.env.vectorization=sync",  # sub-envs in this process, for the spy
        f"--model.init_args.time_horizon={horizon}",
        config=CONFIGS / "ppo_pendulum.yaml",
    )
    model, s = run.model, run.summary
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
    # The first rollout samples from the initial policy: mean ~0 (output weights of gain
    # 0.01), std exp(log_std_init) = exp(-0.5) = 0.607 (standard error of the std ~0.02).
    first = raw[: horizon * num_envs, 0]
    assert abs(first.mean()) < 0.1
    assert first.std() == pytest.approx(math.exp(-0.5), abs=0.06)

    # Greedy actions are the Gaussian's mean, rescaled: low + (clip(mu, -1, 1) + 1) / 2 (high - low).
    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(64)]))
    with torch.no_grad():
        mean = model.policy.actor_head(model.policy.actor_body(obs)).numpy()
        greedy = model.env_actions(model.eval_actions(obs, greedy=True).numpy())
    np.testing.assert_allclose(greedy, low + (np.clip(mean, -1, 1) + 1) * 0.5 * (high - low),
                               rtol=1e-5, atol=1e-6)  # fmt: skip

    # Each sub-env stepped 512 times: two 200-step episodes, each followed by a reset step
    # (NEXT_STEP autoreset, no env step), then 110 steps of a third; it applied the torques
    # the policy sent, in order (the reset steps' actions are ignored).
    by_env: dict[int, list[tuple[float, float]]] = {}
    for env_id, u, reward in stepped:
        by_env.setdefault(env_id, []).append((u, reward))
    assert sorted(len(steps) for steps in by_env.values()) == [510] * num_envs
    applied = np.delete(env.reshape(-1, num_envs), [200, 401], axis=0)  # the two reset steps
    assert sorted(tuple(np.asarray(steps)[:, 0]) for steps in by_env.values()) == sorted(
        tuple(column) for column in applied.T.astype(float)
    )
    # The returns tracked are the raw (unnormalised) rewards each episode received, summed.
    episode_returns = sorted(
        sum(reward for _, reward in steps[start : start + 200])
        for steps in by_env.values()
        for start in (0, 200)
    )
    assert s["frames"] == frames and s["episodes"] == 2 * num_envs
    tracked = next(cb for cb in run.trainer.callbacks if isinstance(cb, MetricsTracker)).history[
        "returns"
    ]
    assert sorted(tracked) == pytest.approx(episode_returns, rel=1e-5)
    assert s["return_ma"] == pytest.approx(np.mean(episode_returns), rel=1e-4)
