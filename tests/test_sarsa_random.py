"""SARSA: TD(0) targets over the stored ``Q(s', a')`` by hand and from a real rollout, the
Discrete-only check, and a cheap CartPole learning check. RandomAgent: learns nothing and
reports each env's random baseline."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from lightning.pytorch.core.optimizer import _MockOptimizer

from slm_lightning import cli as cli_module
from slm_lightning.algorithms import SARSA, RandomAgent, RLAlgorithm
from slm_lightning.algorithms.random_agent import RandomPolicy
from slm_lightning.data.onpolicy_memory import OnPolicyBatch, OnPolicyMemory
from slm_lightning.data.onpolicy_rollout import OnPolicyRollout
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.nets.mlp import MLPSpec
from tests.cli_helpers import fit_in

ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR\s+(.*)$", re.MULTILINE)
RANDOM_CARTPOLE_RETURN = 22  # mean episode return of the uniform random policy
NAN = float("nan")


def fit(run_dir: Path, algorithm: str, env: str, *extra: str) -> tuple[cli_module.SLMLabCLI, dict]:
    """``slm-lab fit`` without a config file; returns the CLI object and summary.json."""
    run = fit_in(
        run_dir,
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        f"--model=slm_lightning.algorithms.{algorithm}",
        f"--model.init_args.env.name={env}",
        *extra,
    )
    return run.cli, run.summary


def sarsa(**kwargs) -> SARSA:
    torch.manual_seed(0)
    defaults = {"env": EnvSpec(name="CartPole-v1", num_envs=2), "net": MLPSpec([16])}
    return SARSA(**{**defaults, **kwargs})


# --- SARSA targets -------------------------------------------------------------------------------


def test_sarsa_targets_by_hand():
    """``r + gamma Q(s', a')`` with the stored values; the masked autoreset slot after a
    truncation carries ``Q(final_obs, a')`` and is bootstrapped from, a termination is not."""
    gamma = 0.9
    model = sarsa(gamma=gamma)
    memory = OnPolicyMemory(5, 2, (4,), np.float32, (), np.int64, model.estimator)
    # env 0: terminates at t=1 (t=2 is its autoreset slot); env 1: truncated at t=2 (t=3).
    memory.values[:] = np.array([[1.0, 10.0], [2.0, 20.0], [NAN, 30.0], [4.0, 40.0], [5.0, 50.0]])
    memory.rewards[:] = np.array([[1.0, 0.1], [2.0, 0.2], [NAN, 0.3], [4.0, NAN], [5.0, 0.5]])
    memory.terminated[1, 0] = True
    memory.truncated[2, 1] = True
    memory.valid[2, 0] = memory.valid[3, 1] = False
    memory.last_values[:] = [7.0, 70.0]

    memory.compute_returns()

    expected = np.array(
        [
            [1.0 + gamma * 2.0, 0.1 + gamma * 20.0],
            [2.0, 0.2 + gamma * 30.0],  # termination: the reward only
            [NAN, 0.3 + gamma * 40.0],  # truncation: Q(final_obs, a') from the autoreset slot
            [4.0 + gamma * 5.0, NAN],
            [5.0 + gamma * 7.0, 0.5 + gamma * 70.0],  # rollout end: the bootstrap Q(s_T, a')
        ]
    )
    valid = memory.valid
    assert np.isfinite(memory.returns[valid]).all(), "a masked NaN leaked into a target"
    np.testing.assert_allclose(memory.returns[valid], expected[valid], rtol=1e-6)


def test_sarsa_act_stores_q_of_the_action_taken():
    model = sarsa(epsilon=0.0)
    obs = torch.randn(64, 4)
    with torch.no_grad():
        q = model.policy(obs)
        actions, log_probs, values, _ = model.act(obs)
    assert torch.equal(actions, q.argmax(-1))
    torch.testing.assert_close(values, q.max(-1).values)
    assert torch.equal(log_probs, torch.zeros(64))

    explorer = sarsa(epsilon=1.0)
    with torch.no_grad():
        q = explorer.policy(obs)
        actions, _, values, _ = explorer.act(obs)
    assert 0 < (actions != q.argmax(-1)).sum() < 64  # really exploring
    torch.testing.assert_close(values, q.gather(-1, actions.unsqueeze(-1)).squeeze(-1))


def test_sarsa_rollout_targets_from_real_episodes():
    """One rollout with short truncated episodes: each valid slot's target is
    ``r + gamma Q(s_{t+1}, a_{t+1})`` with the stored next slot (or the rollout bootstrap)."""
    gamma = 0.95
    model = sarsa(
        gamma=gamma,
        epsilon=1.0,  # random actions: some episodes terminate before the time limit
        env=EnvSpec(name="CartPole-v1", num_envs=3, vectorization="sync", max_episode_steps=12),
    )
    memory = OnPolicyMemory.for_spaces(
        40, 3, model.observation_space, model.action_space, model.estimator
    )
    rollout = OnPolicyRollout(model, model.env_spec, memory, 0, 1, 1)
    rollout.collect()
    memory = rollout.memory
    with torch.no_grad():
        q = model.policy(torch.from_numpy(memory.obs.reshape(-1, 4))).reshape(40, 3, 2)
    stored_q = np.take_along_axis(q.numpy(), memory.actions[..., None], -1)[..., 0]
    np.testing.assert_allclose(memory.values, stored_q, rtol=1e-5, atol=1e-6)

    assert memory.truncated.any() and memory.terminated.any() and not memory.valid.all()
    next_values = np.concatenate([memory.values[1:], memory.last_values[None]])
    expected = memory.rewards + gamma * np.where(memory.terminated, 0.0, next_values)
    valid = memory.valid
    np.testing.assert_allclose(memory.returns[valid], expected[valid], rtol=1e-5, atol=1e-5)
    # The rollout's last bootstrap is Q(s_T, a') for one of the actions.
    with torch.no_grad():
        last_q = model.policy(torch.from_numpy(rollout.obs)).numpy()
    assert np.isclose(last_q, memory.last_values[:, None]).any(-1).all()
    rollout.close()


def test_sarsa_minibatch_loss_regresses_q_on_the_targets():
    model = sarsa(loss="mse")
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(32, 4, generator=g)
    actions = torch.randint(2, (32,), generator=g)
    returns = torch.randn(32, generator=g) * 5
    unused = torch.full((32,), float("nan"))  # log-probs, values, advantages: not SARSA's loss
    batch = OnPolicyBatch(obs, actions, unused, unused, unused, returns)
    with torch.no_grad():
        q = model.policy(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    loss = model.minibatch_loss(batch)
    torch.testing.assert_close(loss.detach(), 0.5 * (q - returns).pow(2).mean())
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        model.minibatch_loss(batch).backward()
        optimizer.step()
    assert model.minibatch_loss(batch).item() < 0.5 * loss.item()


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["SARSA", "DQN"])
def test_discrete_only_algorithm_rejects_box_actions(algorithm, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path / "run", algorithm, "Pendulum-v1", "--model.init_args.max_frames=1000")
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = ERROR_LINE.findall(captured.err)
    assert len(errors) == 1, captured.err
    for text in (algorithm, "Pendulum-v1", "Discrete", "Box"):
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert not (tmp_path / "run" / "summary.json").exists()


# --- RandomAgent ---------------------------------------------------------------------------------


def test_random_policy_samples_inside_bounded_dimensions():
    torch.manual_seed(0)
    low, high = np.array([-2, 0, -np.inf], np.float32), np.array([2, 1, np.inf], np.float32)
    box = spaces.Box(low, high, (3,), np.float32)
    samples = RandomPolicy(box).sample(5000, torch.device("cpu"))
    assert samples.shape == (5000, 3) and torch.isfinite(samples).all()
    assert (samples[:, 0].abs() <= 2).all() and (samples[:, 1] >= 0).all()
    assert (samples[:, 1] <= 1).all()
    assert samples[:, 0].mean().abs() < 0.1 and samples[:, 1].mean() == pytest.approx(0.5, abs=0.03)
    assert samples[:, 2].std() == pytest.approx(1.0, abs=0.05)  # unbounded: standard normal
    discrete = RandomPolicy(spaces.Discrete(3, start=-1)).sample(6000, torch.device("cpu"))
    counts = torch.bincount(discrete + 1, minlength=3).float() / 6000
    torch.testing.assert_close(counts, torch.full((3,), 1 / 3), atol=0.03, rtol=0)


@pytest.fixture
def sent_actions(monkeypatch) -> list[np.ndarray]:
    """Every action array the algorithm sends to the envs."""
    sent: list[np.ndarray] = []
    original = RLAlgorithm.env_actions

    def spy(self, actions: np.ndarray) -> np.ndarray:
        env_actions = original(self, actions)
        sent.append(np.array(env_actions))
        return env_actions

    monkeypatch.setattr(RLAlgorithm, "env_actions", spy)
    return sent


def assert_learns_nothing(cli, run_dir: Path) -> None:
    model = cli.model
    assert isinstance(model, RandomAgent)
    assert list(model.parameters()) == []
    # Lightning stands in a parameterless mock when configure_optimizers returns None.
    # (its "steps" still count in global_step: one per rollout, updating nothing).
    assert all(isinstance(opt, _MockOptimizer) for opt in cli.trainer.optimizers)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] == {}
    assert all(not state.get("state") for state in ckpt["optimizer_states"])


NO_TRAINING_STEP = "ignore:`training_step` returned `None`"
NO_OPTIMIZER = "ignore:`LightningModule.configure_optimizers` returned `None`"


@pytest.mark.filterwarnings(NO_TRAINING_STEP, NO_OPTIMIZER)
def test_random_agent_cartpole_baseline(sent_actions, tmp_path):
    frames = 10_240
    cli, s = fit(
        tmp_path / "run",
        "RandomAgent",
        "CartPole-v1",
        f"--model.init_args.max_frames={frames}",
        "--model.init_args.env.num_envs=8",
        "--metrics.log_frequency=5000",
    )
    assert s["frames"] == frames and s["episodes"] >= 300
    assert 15 < s["return_ma"] < 35, (
        f"return_ma {s['return_ma']} (random ~{RANDOM_CARTPOLE_RETURN})"
    )
    assert_learns_nothing(cli, tmp_path / "run")
    actions = np.concatenate(sent_actions)
    assert actions.shape == (frames,) and set(np.unique(actions)) == {0, 1}
    assert actions.mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.filterwarnings(NO_TRAINING_STEP, NO_OPTIMIZER)
def test_random_agent_pendulum_actions_inside_box(sent_actions, tmp_path):
    frames = 4096
    cli, s = fit(
        tmp_path / "run",
        "RandomAgent",
        "Pendulum-v1",
        f"--model.init_args.max_frames={frames}",
        "--model.init_args.env.num_envs=4",
        "--model.init_args.time_horizon=128",
        "--metrics.log_frequency=2048",
    )
    assert s["frames"] == frames and s["episodes"] == frames // 200 // 4 * 4
    assert_learns_nothing(cli, tmp_path / "run")
    actions = np.concatenate(sent_actions)
    assert actions.shape == (frames, 1) and np.issubdtype(actions.dtype, np.floating)
    assert (actions >= -2.0).all() and (actions <= 2.0).all()
    assert actions.min() < -1.9 and actions.max() > 1.9 and abs(actions.mean()) < 0.1
    # Pendulum's per-step reward lies in [-16.3, 0]; a random policy scores about -1200.
    assert -1700 < s["return_ma"] < -700


# --- cheap learning check ------------------------------------------------------------------------


@pytest.mark.slow
def test_sarsa_cartpole_beats_random_policy(tmp_path):
    # Seed 0 ends at a 100-episode mean of ~125 (~75 at 10k frames); ~7 s. The defaults (Huber
    # loss, one update per rollout) learn far slower: several updates of an MSE loss per
    # 32-frame rollout make this cheap.
    frames = 15_008  # whole rollouts of 4 envs x 8 steps
    cli, s = fit(
        tmp_path / "run",
        "SARSA",
        "CartPole-v1",
        f"--model.init_args.max_frames={frames}",
        "--model.init_args.env.num_envs=4",
        "--model.init_args.time_horizon=8",
        "--model.init_args.training_epochs=4",
        "--model.init_args.loss=mse",
        "--model.init_args.epsilon={start: 1.0, end: 0.05, end_frame: 10000}",
        "--metrics.log_frequency=5000",
    )
    assert s["frames"] == frames and s["episodes"] >= 100
    assert cli.trainer.global_step == frames // 32 * 4
    assert math.isfinite(s["return_ma"])
    assert s["return_ma"] > 50, f"return_ma {s['return_ma']} (random ~{RANDOM_CARTPOLE_RETURN})"
