"""Recurrent PPO: the hidden state resets at episode boundaries, sequence training equals
stepping the cell, the rollout stores the states it carried, the POMDP CartPole hides the
velocities, and a recurrent fit checkpoints, resumes and learns a task that needs memory."""

import contextlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from slm_lightning.algorithms import PPO
from slm_lightning.data import evaluation as evaluation_module
from slm_lightning.data import vector_rollout as rollout_module
from slm_lightning.data.evaluation import EvaluationEpisodes
from slm_lightning.data.onpolicy_memory import OnPolicyMemory, RecurrentBatch
from slm_lightning.data.onpolicy_rollout import OnPolicyRollout
from slm_lightning.data.returns import GAE
from slm_lightning.envs import CARTPOLE_NO_VELOCITY_ID, EnvSpec, make_vector_env, probe_spaces
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.recurrent import RecurrentActorCritic, RecurrentSpec
from tests.test_rollout import ENV_ID, LENGTHS, SEED, N, counting_vector_env, minibatches

CONFIGS = Path(__file__).parents[1] / "configs"
OBS_SPACE = spaces.Box(-np.inf, np.inf, (3,), np.float32)
CELLS = ["gru", "lstm"]


def make_policy(cell: str, shared: bool, action_space: spaces.Space | None = None):
    torch.manual_seed(0)
    return RecurrentActorCritic(
        OBS_SPACE,
        action_space or spaces.Discrete(3),
        RecurrentSpec(cell=cell, hidden_size=8, input_sizes=[6]),
        MLPSpec([5]),
        MLPSpec([7]),
        shared=shared,
    )


def logits(dist) -> torch.Tensor:
    return dist.logits if hasattr(dist, "logits") else dist.mean


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("cell", CELLS)
def test_hidden_state_resets_at_episode_start(cell: str, shared: bool) -> None:
    """After a reset flag, outputs equal those of a fresh sequence, whatever came before."""
    policy = make_policy(cell, shared)
    batch, length, reset_at = 4, 9, 5
    obs = torch.randn(batch, length, 3)
    state = torch.randn(batch, policy.state_size)
    starts = torch.zeros(batch, length, dtype=torch.bool)
    starts[:, reset_at] = True
    with torch.no_grad():
        dist, values, final = policy(obs, state, starts)
        fresh_dist, fresh_values, fresh_final = policy(
            obs[:, reset_at:], policy.initial_state(batch), starts[:, reset_at:]
        )
        # Another history before the reset changes nothing after it.
        other_obs = torch.cat([torch.randn(batch, reset_at, 3), obs[:, reset_at:]], dim=1)
        other_dist, _, other_final = policy(other_obs, torch.randn_like(state), starts)
    after = logits(dist).reshape(batch, length, -1)[:, reset_at:]
    torch.testing.assert_close(after, logits(fresh_dist).reshape(batch, length - reset_at, -1))
    torch.testing.assert_close(
        values.reshape(batch, length)[:, reset_at:], fresh_values.reshape(batch, -1)
    )
    torch.testing.assert_close(final, fresh_final)
    torch.testing.assert_close(logits(other_dist).reshape(batch, length, -1)[:, reset_at:], after)
    torch.testing.assert_close(other_final, final)
    # And the state really is memory: without the reset, the earlier steps change the outputs.
    with torch.no_grad():
        no_reset, _, _ = policy(obs, state, torch.zeros_like(starts))
    assert not torch.allclose(logits(no_reset).reshape(batch, length, -1)[:, reset_at:], after)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("cell", CELLS)
def test_sequence_forward_equals_stepping(cell: str, shared: bool) -> None:
    """Training's (batch, sequence) forward with resets inside the sequences gives the same
    outputs, gradients' inputs and final state as acting one step at a time."""
    policy = make_policy(cell, shared, spaces.Box(-1.0, 1.0, (2,), np.float32))
    batch, length = 3, 7
    obs = torch.randn(batch, length, 3)
    state = torch.randn(batch, policy.state_size)
    starts = torch.zeros(batch, length, dtype=torch.bool)
    starts[0, 2] = starts[0, 5] = starts[1, 0] = True  # env 2: no reset at all
    mask = torch.rand(batch, length) > 0.3
    dist, values, final = policy(obs, state, starts, mask=mask)
    step_means, step_values = [], []
    with torch.no_grad():
        carried = state
        for t in range(length):
            step_dist, step_value, carried = policy.step(obs[:, t], carried, starts[:, t])
            step_means.append(step_dist.mean)
            step_values.append(step_value)
    step_means = torch.stack(step_means, dim=1)[mask]
    step_values = torch.stack(step_values, dim=1)[mask]
    torch.testing.assert_close(dist.mean.detach(), step_means, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values.detach(), step_values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final.detach(), carried, rtol=1e-6, atol=1e-6)
    # Backpropagation runs through time: the first step's input gets a gradient from the last.
    obs.requires_grad_(True)
    _, last_values, _ = policy(obs, state, torch.zeros_like(starts))
    last_values.reshape(batch, length)[:, -1].sum().backward()
    assert obs.grad[:, 0].abs().sum() > 0


class CountingRecurrentAgent:
    """Fake agent whose hidden state counts the steps since the episode start.

    ``state[i]`` entering a step is zeroed where the episode starts, then incremented; so the
    state a step began with (before its reset) equals the counting env's observation count.
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.max_frames = 10**9
        self.returned: list[torch.Tensor] = []

    def initial_state(self, num_envs: int) -> torch.Tensor:
        return torch.zeros(num_envs, 1)

    def act(self, obs, state, episode_starts):
        state = torch.where(episode_starts[:, None], 0.0, state) + 1.0
        self.returned.append(state.clone())
        n = obs.shape[0]
        return torch.zeros(n, dtype=torch.int64), torch.zeros(n), obs[:, 1] / 2, state

    def bootstrap_values(self, obs, state, episode_starts):
        return obs[:, 1] / 2

    def env_actions(self, actions):
        return actions


def recurrent_rollout(
    agent, horizon: int, epochs: int, minibatches: int, length: int
) -> OnPolicyRollout:
    """The rollout of ``agent`` on ``N`` counting envs, with a memory of 1-wide states."""
    memory = OnPolicyMemory(
        horizon, N, (2,), np.float32, (), np.int64, GAE(0.99, 0.95), state_size=1
    )
    spec = EnvSpec(name=ENV_ID, num_envs=N)
    return OnPolicyRollout(agent, spec, memory, SEED, epochs, minibatches, sequence_length=length)


def test_rollout_stores_the_states_it_carried(monkeypatch) -> None:
    monkeypatch.setattr(
        rollout_module, "make_vector_env", lambda spec, seed=None, gamma=0.99: counting_vector_env()
    )
    agent = CountingRecurrentAgent()
    horizon, length = 8, 4
    ds = recurrent_rollout(agent, horizon, epochs=2, minibatches=3, length=length)
    memories = []
    for rollout in range(3):
        batches = minibatches(ds)
        mem = ds.memory
        memories.append({key: np.copy(getattr(mem, key)) for key in ("states", "obs")})
        returned = torch.stack(agent.returned[rollout * horizon :]).numpy()
        # Each step's stored state is the one the previous step returned (across rollouts too).
        if rollout == 0:
            np.testing.assert_array_equal(mem.states[0], 0.0)
            assert mem.episode_starts[0].all()
        else:
            prev = torch.stack(agent.returned[: rollout * horizon])[-1].numpy()
            np.testing.assert_array_equal(mem.states[0], prev)
        np.testing.assert_array_equal(mem.states[1:], returned[:-1])
        np.testing.assert_array_equal(ds.policy_state.numpy(), returned[-1])
        # Episode starts exactly where the counting env shows a first observation; the state
        # that entered any other step counts that episode's steps so far.
        count = mem.obs[..., 1]
        np.testing.assert_array_equal(mem.episode_starts, count == 0)
        carried = ~mem.episode_starts
        np.testing.assert_array_equal(mem.states[..., 0][carried], count[carried])
        # The masked NEXT_STEP slot shows the final observation, so no start is flagged there.
        for i, episode_length in enumerate(LENGTHS):
            assert not mem.episode_starts[count[:, i] == episode_length, i].any()

        # Minibatches are whole sequences, starting from the stored state of their first step.
        assert len(batches) == 2 * 3
        seqs = mem.sequence_batch(length)
        assert seqs.obs.shape == (horizon // length * N, length, 2)
        for k in range(horizon // length):
            for i in range(N):
                row = k * N + i
                span = slice(k * length, (k + 1) * length)
                np.testing.assert_array_equal(seqs.states[row], mem.states[k * length, i])
                np.testing.assert_array_equal(seqs.obs[row], mem.obs[span, i])
                np.testing.assert_array_equal(seqs.valid[row], mem.valid[span, i])
                np.testing.assert_array_equal(seqs.episode_starts[row], mem.episode_starts[span, i])
        for epoch in range(2):
            rows = torch.cat([b.states for b in batches[epoch * 3 : (epoch + 1) * 3]])
            assert rows.shape == (horizon // length * N, 1)
            assert isinstance(batches[0], RecurrentBatch)
            assert batches[0].obs.shape[1:] == (length, 2)
            # Every sequence once per epoch (here all have valid steps).
            np.testing.assert_array_equal(
                np.sort(rows.numpy().ravel()), np.sort(seqs.states.numpy().ravel())
            )
    ds.close()


def test_resume_restarts_the_hidden_state_with_the_episodes(monkeypatch) -> None:
    # A resume rebuilds the envs from a reset (env internals cannot be checkpointed), so the
    # hidden states at the checkpoint belong to episodes that no longer exist. The resumed
    # rollout starts every env from the zero state with an episode start, in place (Lightning
    # reloading the live rollout mid-epoch) and in a new process alike: exactly the first
    # rollout of a fresh run.
    monkeypatch.setattr(
        rollout_module, "make_vector_env", lambda spec, seed=None, gamma=0.99: counting_vector_env()
    )
    keys = ("states", "episode_starts", "obs", "valid")

    def rollout() -> OnPolicyRollout:
        return recurrent_rollout(CountingRecurrentAgent(), 7, epochs=1, minibatches=1, length=7)

    fresh = rollout()
    minibatches(fresh)
    first = {key: np.copy(getattr(fresh.memory, key)) for key in keys}
    ds = rollout()
    minibatches(ds)
    minibatches(ds)
    # 14 steps in, every env is inside an episode (counts 2, 4 and 2) with a non-zero state.
    np.testing.assert_array_equal(ds.obs[:, 1], [2, 4, 2])
    assert (ds.policy_state > 0).all() and not ds.episode_starts.any()
    state = ds.state_dict()
    resumed = rollout()
    resumed.load_state_dict(state)
    ds.load_state_dict(state)
    for run in (resumed, ds):
        list(run)
        assert run.frames == 3 * 7 * N
        for key in keys:
            np.testing.assert_array_equal(getattr(run.memory, key), first[key], err_msg=key)
        run.close()
    fresh.close()


@pytest.mark.parametrize("vectorization", ["sync", "vector_entry_point"])
def test_cartpole_no_velocity_hides_velocities(vectorization: str) -> None:
    spec = EnvSpec(name=CARTPOLE_NO_VELOCITY_ID, num_envs=3, vectorization=vectorization)
    obs_space, act_space = probe_spaces(spec)
    assert obs_space.shape == (2,) and act_space == spaces.Discrete(2)
    assert spec.reward_threshold() == 475.0
    masked = make_vector_env(spec, seed=3)
    full = make_vector_env(
        EnvSpec(name="CartPole-v1", num_envs=3, vectorization=vectorization), seed=3
    )
    try:
        obs, _ = masked.reset(seed=3)
        full_obs, _ = full.reset(seed=3)
        rng = np.random.default_rng(0)
        for _ in range(60):  # long enough for episodes to end and autoreset
            np.testing.assert_array_equal(obs, full_obs[:, [0, 2]])
            action = rng.integers(0, 2, size=3)
            obs, reward, terminated, truncated, _ = masked.step(action)
            full_obs, full_reward, full_terminated, full_truncated, _ = full.step(action)
            np.testing.assert_array_equal(reward, full_reward)
            np.testing.assert_array_equal(terminated, full_terminated)
            assert obs.shape == (3, 2)
    finally:
        masked.close()
        full.close()
    assert gym.spec(CARTPOLE_NO_VELOCITY_ID).max_episode_steps == 500


# A short recurrent fit through the CLI, resumed to a doubled budget.
NUM_ENVS, HORIZON, BUDGET = 4, 16, 1000
ROLLOUT = NUM_ENVS * HORIZON
SMALL = [
    f"--model.init_args.env.num_envs={NUM_ENVS}",
    f"--model.init_args.time_horizon={HORIZON}",
    "--model.init_args.recurrent.sequence_length=8",
    "--model.init_args.training_epochs=2",
    "--model.init_args.num_minibatches=2",
    "--model.init_args.eval_episodes=2",
    "--metrics.log_frequency=256",
]


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_fit_checkpoints_and_resumes(cell: str, tmp_path: Path, run_fit) -> None:
    config = CONFIGS / "ppo_rnn_cartpole_pomdp.yaml"
    cell_arg = f"--model.init_args.recurrent.cell={cell}"
    first_dir, resumed_dir = tmp_path / "first", tmp_path / "resumed"
    first = run_fit(
        *SMALL, cell_arg, f"--model.init_args.max_frames={BUDGET}", config=config, run_dir="first"
    )
    model, s1 = first.model, first.summary
    assert isinstance(model.policy, RecurrentActorCritic)
    assert model.policy.actor_core.lstm == (cell == "lstm")
    assert BUDGET <= s1["frames"] < BUDGET + ROLLOUT and s1["episodes"] > 0

    ckpt_path = first_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    loaded = PPO.load_from_checkpoint(ckpt_path, weights_only=False, map_location="cpu")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    # Same greedy actions along a sequence with a reset in it.
    obs = torch.randn(5, 12, 2)
    starts = torch.zeros(5, 12, dtype=torch.bool)
    starts[:, 6] = True
    with torch.no_grad():
        a, _, _ = model.policy(obs, model.initial_state(5), starts)
        b, _, _ = loaded.policy(obs, loaded.initial_state(5), starts)
    assert torch.equal(model.policy.greedy(a), loaded.policy.greedy(b))

    resumed = run_fit(
        *SMALL,
        cell_arg,
        f"--ckpt_path={ckpt_path}",
        f"--model.init_args.max_frames={2 * BUDGET}",
        config=config,
        run_dir="resumed",
    )
    cli2, s2 = resumed.cli, resumed.summary
    assert s2["start_frames"] == s1["frames"]
    assert 2 * BUDGET <= s2["frames"] < 2 * BUDGET + ROLLOUT
    ckpt2 = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    new_rollouts = (s2["frames"] - s1["frames"]) // ROLLOUT
    assert ckpt2["global_step"] == ckpt["global_step"] + new_rollouts * 2 * 2
    assert any(not torch.equal(ckpt["state_dict"][k], v) for k, v in ckpt2["state_dict"].items())

    # Evaluation carries the hidden state through whole episodes.
    with contextlib.chdir(tmp_path):
        returns, lengths = cli2.model._evaluation().play()
    assert len(returns) == 2 and (returns == lengths).all() and (returns >= 1).all()


class CueEnv(gym.Env):
    """A memory task: the first observation shows a cue (+1 or -1), the next ``delay`` ones
    show 0, and on the last step action 1 (cue +1) or 0 (cue -1) earns +1, else -1.

    A memoryless policy cannot beat a mean return of 0; a recurrent one reaches 1.
    """

    def __init__(self, delay: int = 3) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)  # [cue, is_last_step]
        self.action_space = spaces.Discrete(2)
        self.delay = delay

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.cue = 0, float(self.np_random.choice([-1.0, 1.0]))
        return np.array([self.cue, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t <= self.delay:
            return np.array([0.0, float(self.t == self.delay)], np.float32), 0.0, False, False, {}
        reward = 1.0 if (action == 1) == (self.cue > 0) else -1.0
        return np.zeros(2, np.float32), reward, True, False, {}


CUE_ID = "SlmTestCue-v0"
if CUE_ID not in gym.registry:
    gym.register(id=CUE_ID, entry_point=CueEnv)


@pytest.mark.slow
@pytest.mark.parametrize("recurrent", [True, False], ids=["gru", "mlp"])
def test_recurrent_policy_learns_a_memory_task(recurrent: bool, run_fit) -> None:
    """The GRU learns to recall the cue; the MLP, on the same PPO, stays at chance."""
    extra = [
        f"--model.init_args.env.name={CUE_ID}",
        "--model.init_args.env.num_envs=16",
        "--model.init_args.env.vectorization=sync",
        "--model.init_args.max_frames=16384",
        "--model.init_args.time_horizon=16",
        "--model.init_args.recurrent.sequence_length=8",
        "--model.init_args.lr=0.003",
        "--model.init_args.entropy_coef=0.01",
        "--metrics.log_frequency=4096",
    ]
    if recurrent:
        s = run_fit(*extra, config=CONFIGS / "ppo_rnn_cartpole_pomdp.yaml").summary
        assert s["return_ma"] > 0.8, s["return_ma"]
    else:
        extra.remove("--model.init_args.recurrent.sequence_length=8")
        s = run_fit(*extra, config=CONFIGS / "ppo_mlp_cartpole_pomdp.yaml").summary
        assert abs(s["return_ma"]) < 0.3, s["return_ma"]


class CountingEvaluator:
    """Evaluation agent whose hidden state counts the steps since the episode start (zeroed
    where ``episode_starts`` says an episode starts); records what each step received."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def initial_state(self, num_envs: int) -> torch.Tensor:
        return torch.zeros(num_envs, 1)

    def eval_step(self, obs, state, episode_starts, greedy):
        self.seen.append((obs[:, 1].numpy(), episode_starts.numpy(), state[:, 0].numpy()))
        state = torch.where(episode_starts[:, None], 0.0, state) + 1.0
        return torch.zeros(len(obs), dtype=torch.int64), state

    def env_actions(self, actions):
        return actions


def test_evaluation_carries_the_state_and_marks_episode_starts(monkeypatch) -> None:
    """The evaluation episodes' step: the state each step receives is the one the previous
    step returned, and episode starts are flagged exactly at first observations. Catches
    starts flagged on the NEXT_STEP reset step's final observation (one step early) and a
    state not carried between steps (always 0 entering)."""
    monkeypatch.setattr(
        evaluation_module, "make_vector_env", lambda spec, seed=None: counting_vector_env()
    )
    agent = CountingEvaluator()
    episodes = EvaluationEpisodes(agent, EnvSpec(name=ENV_ID, num_envs=N), SEED, 2 * N, True)
    (batch,) = list(episodes)
    assert len(batch.returns) == 2 * N
    counts = np.stack([count for count, _, _ in agent.seen])
    starts = np.stack([start for _, start, _ in agent.seen])
    states = np.stack([state for _, _, state in agent.seen])
    np.testing.assert_array_equal(starts, counts == 0)
    # Entering any other step, the state counts that episode's steps so far.
    np.testing.assert_array_equal(states[~starts], counts[~starts])
    assert (counts[~starts] > 0).any()
