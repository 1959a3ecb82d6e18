"""DQN: targets by hand, the dueling head, exploration, prioritized updates, the target network,
the off-policy rollout's transitions, checkpoint/resume of the replay memory, every flag in a
short fit, and a cheap CartPole learning check."""

import contextlib
import copy
import math
import re
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces

from slm_lightning.algorithms import DQN
from slm_lightning.algorithms.dqn import double_dqn_target, dqn_target
from slm_lightning.checkpoints import checkpoint_frames, saved_memory_state
from slm_lightning.data.offpolicy_rollout import OffPolicyRollout
from slm_lightning.data.prioritized import PrioritizedReplay
from slm_lightning.data.replay import ReplayBatch, ReplayLayout, ReplayMemory
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.q_network import QNetwork, boltzmann, epsilon_greedy
from tests.cli_helpers import fit_in
from tests.offpolicy_helpers import manual_optimization, one_round, stack

# Every hyperparameter the tests below count on, spelled out rather than read from
# configs/dqn_cartpole.yaml, whose tuning may change.
BASE = [
    "--seed_everything=0",
    "--trainer.accelerator=cpu",
    "--model=slm_lightning.algorithms.DQN",
    "--model.init_args.env.name=CartPole-v1",
    "--model.init_args.env.num_envs=4",
    "--model.init_args.net={hidden_sizes: [128, 128], activation: relu}",
    "--model.init_args.lr=0.0005",
    "--model.init_args.batch_size=128",
    "--model.init_args.memory_size=50000",
    "--model.init_args.target_update_frequency=2000",
]
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR\s+(.*)$", re.MULTILINE)
RANDOM_CARTPOLE_RETURN = 22  # mean episode return of the uniform random policy


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- targets by hand -----------------------------------------------------------------------------

GAMMA = 0.9
# Row 0: the online net prefers action 1, the target net action 0; row 1 the reverse;
# row 2 terminated (gives just its reward). Discounts are gamma^k for k = 1, 2, 3 steps.
NEXT_Q_ONLINE = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [0.0, 9.0, 0.0]])
NEXT_Q_TARGET = torch.tensor([[4.0, 1.0, 2.0], [2.0, 6.0, 3.0], [7.0, 1.0, 1.0]])
REWARDS = torch.tensor([1.0, 0.5, 2.0])
DISCOUNTS = torch.tensor([GAMMA, GAMMA**2, GAMMA**3])
TERMINATED = torch.tensor([0.0, 0.0, 1.0])


def test_dqn_target_by_hand():
    target = dqn_target(NEXT_Q_TARGET, REWARDS, DISCOUNTS, TERMINATED)
    expected = [1.0 + 0.9 * 4.0, 0.5 + 0.81 * 6.0, 2.0]  # the target net picks and values
    torch.testing.assert_close(target, torch.tensor(expected))


def test_double_dqn_target_by_hand():
    target = double_dqn_target(NEXT_Q_ONLINE, NEXT_Q_TARGET, REWARDS, DISCOUNTS, TERMINATED)
    # The online argmax (1, 0, 1) chooses which target value counts.
    expected = [1.0 + 0.9 * 1.0, 0.5 + 0.81 * 2.0, 2.0]
    torch.testing.assert_close(target, torch.tensor(expected))
    plain = dqn_target(NEXT_Q_TARGET, REWARDS, DISCOUNTS, TERMINATED)
    assert (target[:2] < plain[:2]).all()  # double never exceeds the max over the target net
    # When both nets agree on the argmax, the two targets agree.
    agree = double_dqn_target(NEXT_Q_TARGET, NEXT_Q_TARGET, REWARDS, DISCOUNTS, TERMINATED)
    torch.testing.assert_close(agree, plain)


def test_targets_use_the_stored_nstep_discount():
    """With a 3-step memory the batch's discounts are gamma^k (k cut short at an episode end)
    and the target discounts the bootstrap by exactly that."""
    memory = ReplayMemory(
        ReplayLayout(16, 1, (1,), np.float32, (), np.int64, n_steps=3, gamma=GAMMA)
    )
    for t in range(5):  # one episode of 5 steps, truncated at the end: rewards 1..5
        memory.add(np.array([[t]], np.float32), np.array([0]), np.array([t + 1.0]),
                   np.array([[t + 1]], np.float32), np.array([False]), np.array([t == 4]),
                   np.array([True]))  # fmt: skip
    batch = memory.batch(np.arange(len(memory))).as_tensors()
    np.testing.assert_array_equal(batch.obs[:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_allclose(batch.discounts, [GAMMA**3, GAMMA**3, GAMMA**3, GAMMA**2, GAMMA])
    next_q = batch.next_obs.repeat(1, 2) * torch.tensor([1.0, 10.0])  # max = 10 * next count
    target = dqn_target(next_q, batch.rewards, batch.discounts, batch.terminated)
    expected = [
        sum(GAMMA**i * (s + 1 + i) for i in range(k)) + GAMMA**k * 10 * (s + k)
        for s, k in zip(range(5), [3, 3, 3, 2, 1], strict=True)
    ]
    torch.testing.assert_close(target, torch.tensor(expected), rtol=1e-5, atol=1e-5)


# --- the Q-network: dueling head and exploration -------------------------------------------------

OBS_SPACE = spaces.Box(-1.0, 1.0, (4,), np.float32)


@pytest.mark.parametrize("dueling", [False, True])
def test_dueling_head_is_value_plus_centred_advantage(dueling):
    torch.manual_seed(0)
    net = QNetwork(OBS_SPACE, spaces.Discrete(5), MLPSpec([16]), dueling=dueling)
    with torch.no_grad():  # a non-zero value bias, so V is not zero by construction
        net.head.bias.copy_(torch.arange(5.0))
        if dueling:
            net.value_head.bias.fill_(3.0)
    obs = torch.randn(32, 4)
    with torch.no_grad():
        q = net(obs)
        hidden = net.body(obs)
        advantage = net.head(hidden)
    assert q.shape == (32, 5)
    if not dueling:
        assert net.value_head is None
        torch.testing.assert_close(q, advantage)
        return
    with torch.no_grad():
        value = net.value_head(hidden)
    torch.testing.assert_close(q, value + advantage - advantage.mean(-1, keepdim=True))
    torch.testing.assert_close(q.mean(-1, keepdim=True), value)
    # The advantage head alone decides the ranking of the actions.
    assert torch.equal(q.argmax(-1), advantage.argmax(-1))


def test_epsilon_greedy_frequencies():
    torch.manual_seed(0)
    n, actions = 20_000, 4
    q = torch.randn(n, actions)
    greedy = q.argmax(-1)
    assert torch.equal(epsilon_greedy(q, 0.0), greedy)

    uniform = epsilon_greedy(q, 1.0)
    freq = torch.bincount(uniform, minlength=actions).float() / n
    assert torch.allclose(freq, torch.full((actions,), 1 / actions), atol=0.02), freq
    assert (uniform == greedy).float().mean() == pytest.approx(1 / actions, abs=0.02)

    half = epsilon_greedy(q, 0.5)  # greedy with prob 1/2, plus the random draws that hit it
    assert (half == greedy).float().mean() == pytest.approx(0.5 + 0.5 / actions, abs=0.02)


def test_boltzmann_is_argmax_when_cold_and_softmax_otherwise():
    torch.manual_seed(0)
    q = torch.randn(5_000, 3)
    assert torch.equal(boltzmann(q, 1e-6), q.argmax(-1))
    assert torch.equal(boltzmann(q, 0.0), q.argmax(-1))  # clamped, no division by zero

    row = torch.tensor([0.0, 1.0, 2.0])
    samples = boltzmann(row.expand(20_000, 3), 2.0)
    freq = torch.bincount(samples, minlength=3).float() / len(samples)
    torch.testing.assert_close(freq, torch.softmax(row / 2.0, -1), atol=0.02, rtol=0)


# --- DQN module pieces: prioritized updates, target network --------------------------------------


def small_dqn(**kwargs) -> DQN:
    torch.manual_seed(0)
    env = EnvSpec(name="CartPole-v1", num_envs=2)
    return DQN(
        **{"env": env, "net": MLPSpec([32]), "batch_size": 16, "learning_starts": 0, **kwargs}
    )


def hand_batch(n: int = 16, seed: int = 0) -> ReplayBatch:
    g = torch.Generator().manual_seed(seed)
    return ReplayBatch(
        obs=torch.randn(n, 4, generator=g),
        actions=torch.randint(2, (n,), generator=g),
        rewards=torch.rand(n, generator=g),
        next_obs=torch.randn(n, 4, generator=g),
        terminated=(torch.rand(n, generator=g) < 0.2).float(),
        discounts=torch.full((n,), 0.99),
        indices=torch.arange(n),
    )


def test_prioritized_training_step_updates_sampled_priorities_and_weights_the_loss():
    model = small_dqn(prioritized=True, per_alpha=0.6, batch_size=32)
    with torch.no_grad():  # a target net that differs from the online one
        for p in model.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    memory = PrioritizedReplay(
        ReplayLayout(64, 1, (4,), np.float32, (), np.int64, seed=3), alpha=0.6
    )
    rng = np.random.default_rng(0)
    for _ in range(40):
        memory.add(rng.normal(size=(1, 4)).astype(np.float32), rng.integers(0, 2, 1),
                   rng.random(1), rng.normal(size=(1, 4)).astype(np.float32),
                   rng.random(1) < 0.1, np.zeros(1, bool), np.ones(1, bool))  # fmt: skip
    memory.update_priorities(np.arange(40), rng.uniform(0.0, 3.0, 40))  # non-uniform weights
    model.memory = memory
    model.rollout = SimpleNamespace(frames=0)

    stack = model.sample_batches(1)
    batch = stack.at(0)
    weights = batch.weights
    assert weights.max() == 1.0 and weights.min() < 0.9
    untouched = np.setdiff1d(np.arange(40), batch.indices.numpy())
    before = memory.tree.get(untouched).copy()

    with torch.no_grad():
        q = model.policy(batch.obs).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        target = dqn_target(
            model.target(batch.next_obs),
            batch.rewards,
            batch.discounts,
            batch.terminated,
        )
    manual_optimization(model)
    model.training_step([stack], 0)

    loss = model.train_metrics["train/loss"]
    elementwise = F.smooth_l1_loss(q, target, reduction="none")
    torch.testing.assert_close(loss, (weights * elementwise).mean())
    assert not torch.isclose(loss, elementwise.mean())
    expected = {}  # where a slot was drawn twice the last value wins
    for index, td in zip(batch.indices.tolist(), (q - target).abs().tolist(), strict=True):
        expected[index] = (td + memory.eps) ** 0.6
    slots = np.array(sorted(expected))
    np.testing.assert_allclose(memory.tree.get(slots), [expected[i] for i in slots], rtol=1e-6)
    np.testing.assert_array_equal(memory.tree.get(untouched), before)
    assert memory.tree.total == pytest.approx(memory.tree.get(np.arange(40)).sum())
    assert memory.max_priority >= max(expected.values())


def test_per_epsilon_sets_the_priorities_written_after_an_update():
    """p_i = (|td_i| + per_epsilon)^per_alpha with per_epsilon 0.25 and per_alpha 0.5. Constant
    nets: Q(s) = (1, 2), Q_target(s') = (3, 0), so the target is r + 0.9 * 3 (r if terminal):
    |td| = |1 - 2.7|, |2 - 4.7|, |2 - 3.2|, |1 - 2| = 1.7, 2.7, 1.2, 1.0, priorities
    sqrt(1.95, 2.95, 1.45, 1.25). Catches per_epsilon not reaching the memory (1e-6)."""
    model = small_dqn(prioritized=True, per_alpha=0.5, per_epsilon=0.25, net=MLPSpec([]))
    for net, bias in ((model.policy, [1.0, 2.0]), (model.target, [3.0, 0.0])):
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.copy_(torch.tensor(bias))
    model.memory = model.build_memory()
    assert model.memory.eps == 0.25
    for _ in range(2):  # two envs: slots 0-3
        model.memory.add(np.zeros((2, 4), np.float32), np.zeros(2, np.int64), np.zeros(2),
                         np.zeros((2, 4), np.float32), np.zeros(2, bool), np.zeros(2, bool),
                         np.ones(2, bool))  # fmt: skip
    batch = ReplayBatch(
        obs=torch.randn(4, 4),
        actions=torch.tensor([0, 1, 1, 0]),
        rewards=torch.tensor([0.0, 2.0, 0.5, 2.0]),
        next_obs=torch.randn(4, 4),
        discounts=torch.full((4,), 0.9),
        terminated=torch.tensor([0.0, 0.0, 0.0, 1.0]),
        indices=torch.tensor([0, 1, 2, 3]),
        weights=torch.ones(4),
    )
    manual_optimization(model)
    model.training_step(one_round(batch), 0)
    expected = [1.3964240, 1.7175564, 1.2041595, 1.1180340]
    np.testing.assert_allclose(model.memory.tree.get(np.arange(4)), expected, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, -1e-3])
def test_per_epsilon_must_be_positive(value):
    with pytest.raises(
        ConfigError, match=rf"^model.init_args.per_epsilon must be > 0, got {value}$"
    ):
        small_dqn(prioritized=True, per_epsilon=value)


def test_uniform_replay_loss_is_unweighted():
    model = small_dqn(loss="mse")
    with torch.no_grad():  # a target net that differs from the online one
        for p in model.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = hand_batch()
    with torch.no_grad():
        q = model.policy(batch.obs).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        target = dqn_target(model.target(batch.next_obs), batch.rewards,
                            batch.discounts, batch.terminated)  # fmt: skip
    loss, _ = model.loss_terms(batch)
    torch.testing.assert_close(loss.detach(), 0.5 * (q - target).pow(2).mean())


def gradient_step(model: DQN, optimizer: torch.optim.Optimizer, seed: int) -> None:
    loss, _ = model.loss_terms(hand_batch(seed=seed))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_hard_target_copy_exactly_when_the_frame_clock_crosses_the_frequency():
    freq = 100
    model = small_dqn(target_update_frequency=freq)
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=1e-2)
    model.rollout = SimpleNamespace(frames=0, env=None)
    model.rollout.state_dict = lambda: {"frames": model.rollout.frames}
    assert same(params(model.target), params(model.policy))
    copies = []
    # (frame clock at the update, whether the target equals the online net afterwards)
    for step, (frames, copied) in enumerate(
        [(4, False), (96, False), (100, True), (104, False), (196, False), (236, True),
         (240, False), (299, False), (300, True)]
    ):  # fmt: skip
        model.rollout.frames = frames
        gradient_step(model, optimizer, seed=step)
        assert not same(params(model.target), params(model.policy)), "the update moved nothing"
        before = params(model.target)
        model.update_target()
        assert same(params(model.target), params(model.policy)) == copied, frames
        if copied:
            copies.append(frames)
        else:
            assert same(params(model.target), before), f"target moved at frame {frames}"
    assert copies == [100, 236, 300]
    assert model._next_target_update == 400

    # The schedule travels with the checkpoint.
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["next_target_update"] == 400
    fresh = small_dqn(target_update_frequency=freq)
    assert fresh._next_target_update == freq
    fresh.on_load_checkpoint(checkpoint)
    assert fresh._next_target_update == 400


def test_polyak_target_moves_tau_towards_online_and_never_hard_copies():
    tau = 0.25
    model = small_dqn(tau=tau, target_update_frequency=100)
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=1e-2)
    model.rollout = SimpleNamespace(frames=0, env=None)
    for step, frames in enumerate([4, 100, 1000, 5000]):  # crossing the hard-copy frequency
        model.rollout.frames = frames
        gradient_step(model, optimizer, seed=step)
        target, online = params(model.target), params(model.policy)
        model.update_target()
        for before, now, theta in zip(target, params(model.target), online, strict=True):
            torch.testing.assert_close(now, before + tau * (theta - before))
        assert not same(params(model.target), params(model.policy)), frames


def test_target_network_is_frozen_and_outside_the_optimizer():
    model = small_dqn()
    assert all(not p.requires_grad for p in model.target.parameters())
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.policy.parameters()}


# --- the off-policy rollout on a counting env ----------------------------------------------------

COUNTING_ID = "SlmTestDqnEpisodeCounting-v0"


class EpisodeCountingEnv(gym.Env):
    """Observation ``[count, episode id, length, terminates]``; reward = count after the step.

    Each reset draws the episode's length (2-6) and whether it ends by termination or by
    truncation, so sub-envs seeded differently end their episodes at different steps.
    """

    observation_space = spaces.Box(0.0, 2.0**24, (4,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.count = 0
        self.length = int(self.np_random.integers(2, 7))
        self.terminates = bool(self.np_random.integers(0, 2))
        self.episode = int(self.np_random.integers(1, 2**24))
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.array([self.count, self.episode, self.length, self.terminates], np.float32)

    def step(self, action):
        self.count += 1
        end = self.count >= self.length
        return (
            self._obs(),
            float(self.count),
            end and self.terminates,
            end and not self.terminates,
            {},
        )


@pytest.fixture
def counting_env():
    gym.register(COUNTING_ID, entry_point=EpisodeCountingEnv)
    yield COUNTING_ID
    gym.registry.pop(COUNTING_ID, None)


def counting_rollout(env_id: str, n_steps: int) -> OffPolicyRollout:
    """A DQN's own rollout (built by ``build_rollout``) on three counting envs."""
    torch.manual_seed(0)
    model = DQN(env=EnvSpec(name=env_id, num_envs=3, vectorization="sync"), n_steps=n_steps,
                gamma=GAMMA, memory_size=5_000, learning_starts=0, net=MLPSpec([8]))  # fmt: skip
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model.rollout = model.build_rollout()
    return model.rollout


def check_transitions(memory: ReplayMemory, n_steps: int) -> int:
    """Every stored transition stays inside one episode and matches its n-step window."""
    size = len(memory)
    obs, next_obs = memory.obs[:size], memory.next_obs[:size]
    count, next_count = obs[:, 0], next_obs[:, 0]
    steps = np.rint(np.log(memory.discounts[:size]) / np.log(GAMMA)).astype(int)
    np.testing.assert_array_equal(next_obs[:, 1], obs[:, 1])  # same episode
    assert (next_count >= 1).all(), "a transition ends in a reset observation"
    np.testing.assert_array_equal(next_count, count + steps)
    length, terminates = obs[:, 2], obs[:, 3].astype(bool)
    ended = next_count == length
    # A window is cut short only at an episode end; a termination stops the bootstrap,
    # a truncation does not.
    assert ((steps == n_steps) | ended).all()
    assert (steps >= 1).all() and (steps <= n_steps).all()
    np.testing.assert_array_equal(memory.terminated[:size], ended & terminates)
    rewards = [
        sum(GAMMA**i * (c + 1 + i) for i in range(k)) for c, k in zip(count, steps, strict=True)
    ]
    np.testing.assert_allclose(memory.rewards[:size], rewards, rtol=1e-5)
    return int(ended.sum())


@pytest.mark.parametrize("n_steps", [1, 3])
def test_offpolicy_rollout_stores_no_transition_across_an_episode_boundary(counting_env, n_steps):
    rollout = counting_rollout(counting_env, n_steps)
    for _ in range(200):
        rollout.step()
    assert rollout.frames == 600
    memory = rollout.memory
    ended = check_transitions(memory, n_steps)
    size = len(memory)
    at_end = memory.next_obs[:size, 0] == memory.obs[:size, 2]
    assert ended > 100
    assert (at_end & memory.terminated[:size]).any(), "no termination seen"
    assert (at_end & ~memory.terminated[:size]).any(), "no truncation seen"

    # Every step of every episode that finished is stored exactly once as a window start
    # (n-step windows start at every step too).
    obs = memory.obs[: len(memory)]
    keys = {(int(e), int(c)) for e, c in obs[:, [1, 0]]}
    assert len(keys) == len(obs), "a transition was stored twice"
    finished = {int(e): int(n) for c, e, n, _ in memory.next_obs[: len(memory)] if c == n}
    for episode, length in finished.items():
        assert {c for e, c in keys if e == episode} == set(range(length)), episode


@pytest.mark.parametrize("n_steps", [1, 3])
def test_offpolicy_rollout_resumed_mid_episode_builds_no_cross_episode_window(
    counting_env, n_steps
):
    """A resume restarts the envs from a fresh reset: open n-step windows of the interrupted
    episodes must not be continued with the new episodes' rewards and observations."""
    rollout = counting_rollout(counting_env, n_steps)
    for _ in range(30):
        rollout.step()
    # Stop where every sub-env is mid-episode (with n > 1: with an open n-step window).
    while not (rollout.obs[:, 0] > 0).all() or (rollout.memory.pending_count == 0).any() != (
        n_steps == 1
    ):
        rollout.step()
    frames = rollout.frames
    state = copy.deepcopy(rollout.state_dict())
    memory_state = copy.deepcopy(rollout.memory.state_dict())
    assert memory_state["size"] == len(rollout.memory)
    rollout.close()

    resumed = counting_rollout(counting_env, n_steps)
    resumed.memory.load_state_dict(memory_state)  # as the algorithm restores its memory
    resumed.load_state_dict(state)
    assert resumed.frames == frames and len(resumed.memory) == memory_state["size"]
    for _ in range(40):
        resumed.step()
    assert resumed.frames == frames + 120
    check_transitions(resumed.memory, n_steps)
    resumed.close()


# --- checkpoint and resume through the CLI -------------------------------------------------------

SMALL = ["--model.init_args.learning_starts=500", "--metrics.log_frequency=1000"]
PER_NSTEP = ["--model.init_args.prioritized=true", "--model.init_args.n_steps=3"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 3000-frame prioritized 3-step DQN fit; the memory's next samples are taken here."""
    root = tmp_path_factory.mktemp("dqn_first")
    with contextlib.chdir(root):
        run = fit_in(root / "run", *BASE, "--model.init_args.max_frames=3000", *SMALL, *PER_NSTEP)
    cli, s = run.cli, run.summary
    memory = cli.model.memory
    snapshot = copy.deepcopy(memory.state_dict())
    next_samples = [memory.sample(32, beta=0.5).indices for _ in range(3)]
    return cli, s, root / "run", snapshot, next_samples


def test_checkpoint_holds_the_replay_memory(first):
    cli, s, run, memory_state, next_samples = first
    assert s["frames"] == 3000
    ckpt = load(run / "checkpoints" / "last.ckpt")
    assert checkpoint_frames(ckpt) == 3000
    saved = saved_memory_state(ckpt)
    assert saved is ckpt["memory"]
    assert 2000 < saved["size"] <= 3000 and saved["cursor"] == saved["size"]
    for key, value in memory_state.items():
        if key == "tree":
            np.testing.assert_array_equal(saved["tree"]["tree"], value["tree"])
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(saved[key], value, err_msg=key)
        else:
            assert saved[key] == value, key
    assert saved["tree"]["tree"][1] == pytest.approx(memory_state["tree"]["tree"][1])
    assert saved["max_priority"] > 1.0  # priorities were updated from TD errors

    # A fresh memory loaded from the checkpoint draws the same next batches.
    model = cli.model
    fresh = PrioritizedReplay(
        ReplayLayout(
            50_000, 4, (4,), np.float32, (), np.int64, n_steps=3, gamma=model.gamma, seed=12345
        ),
        alpha=0.6,
    )
    fresh.load_state_dict(saved)
    assert len(fresh) == saved["size"] and fresh.cursor == saved["cursor"]
    for indices in next_samples:
        np.testing.assert_array_equal(fresh.sample(32, beta=0.5).indices, indices)
    # The target-network schedule: copies at 2000, next at 4000.
    assert ckpt["next_target_update"] == 4000


def test_resume_restores_the_replay_memory_and_continues_to_a_total_budget(
    first, tmp_path, run_fit
):
    _, s1, run1, memory_state, _ = first
    resumed = run_fit(
        *BASE,
        f"--ckpt_path={run1 / 'checkpoints' / 'last.ckpt'}",
        "--model.init_args.max_frames=5000",
        *SMALL,
        *PER_NSTEP,
        run_dir="resumed",
    )
    cli, s2 = resumed.cli, resumed.summary
    assert s2["frames"] == 5000 and s2["start_frames"] == 3000
    assert s2["episodes"] > s1["episodes"]
    memory = cli.model.memory
    size1 = memory_state["size"]
    # The checkpointed transitions are still there (the capacity is not reached) and the
    # resumed run appended after them.
    for key in ("obs", "actions", "rewards", "next_obs", "terminated", "discounts"):
        np.testing.assert_array_equal(getattr(memory, key)[:size1], memory_state[key], key)
    assert size1 + 1500 < len(memory) <= size1 + 2000
    assert memory.cursor == len(memory)
    assert memory.max_priority >= memory_state["max_priority"]
    ckpt1 = load(run1 / "checkpoints" / "last.ckpt")
    ckpt2 = load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    # One update per vector step of 4 frames, continuing the first run's count.
    assert ckpt2["global_step"] == ckpt1["global_step"] + 2000 // 4
    assert ckpt2["next_target_update"] == 6000


# --- every flag in a short fit -------------------------------------------------------------------

FLAGS = {
    "dqn": [],
    "double": ["--model.init_args.double=true"],
    "dueling": ["--model.init_args.dueling=true"],
    "nstep3": ["--model.init_args.n_steps=3"],
    "prioritized": ["--model.init_args.prioritized=true"],
    "combined": ["--model.init_args.combined_replay=true"],
    "boltzmann": ["--model.init_args.exploration=boltzmann", "--model.init_args.temperature=2.0"],
    "tau": ["--model.init_args.tau=0.01"],
    "mse-2updates": ["--model.init_args.loss=mse", "--model.init_args.updates_per_step=2"],
    "rainbow-lite": [
        "--model.init_args.double=true",
        "--model.init_args.dueling=true",
        "--model.init_args.n_steps=3",
        "--model.init_args.prioritized=true",
        "--model.init_args.tau=0.05",
    ],
}


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_short_fit_with_each_flag(flags, run_fit):
    frames = 1000  # 126 rounds of updates: every flag shows in the memory and the logs
    run = run_fit(
        *BASE,
        f"--model.init_args.max_frames={frames}",
        "--model.init_args.learning_starts=500",
        "--metrics.log_frequency=500",
        *flags,
    )
    cli, s = run.cli, run.summary
    model, hp = cli.model, cli.model.hparams
    assert s["frames"] == frames and model.frames == frames
    # One round of updates per vector step (4 frames) from frame 500 on.
    updates_per_round = hp.updates_per_step
    assert cli.trainer.global_step == ((frames - 500) // 4 + 1) * updates_per_round
    rows = run.rows
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["train/q_mean"]) for r in rows if "train/q_mean" in r)
    explore_key = "train/temperature" if hp.exploration == "boltzmann" else "train/epsilon"
    assert any(explore_key in r for r in rows)

    memory = model.memory
    assert isinstance(memory, PrioritizedReplay) == hp.prioritized
    assert memory.n_steps == hp.n_steps and memory.combined == hp.combined_replay
    assert (model.policy.value_head is not None) == hp.dueling
    if hp.prioritized:  # the TD errors reached the sum tree
        leaves = memory.tree.get(np.arange(len(memory)))
        assert memory.max_priority > 1.0 and len(np.unique(leaves)) > 100
    if hp.n_steps > 1:
        assert np.isclose(memory.discounts[: len(memory)], model.gamma**3).mean() > 0.8
    if hp.tau is not None:  # Polyak: close to, but never equal to, the online net
        assert not same(params(model.target), params(model.policy))


# --- bad input and a cheap learning check --------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.init_args.env.name=Pendulum-v1"], ["DQN", "Pendulum-v1", "Discrete", "Box"]),
        (
            ["--model.init_args.prioritized=true", "--model.init_args.combined_replay=true"],
            ["combined_replay", "prioritized"],
        ),
        (["--model.init_args.tau=1.5"], ["tau", "(0, 1]", "1.5"]),
        (["--model.init_args.n_steps=0"], ["n_steps", ">= 1"]),
    ],
    ids=["box-actions", "combined-with-prioritized", "tau", "n-steps"],
)
def test_bad_input_exits_with_one_line(extra, expected, tmp_path, capsys, run_fit):
    with pytest.raises(SystemExit) as exc:
        run_fit(*BASE, "--model.init_args.max_frames=1000", *extra)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = ERROR_LINE.findall(captured.err)
    assert len(errors) == 1, captured.err
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_cartpole_beats_random_policy(run_fit):
    # Seed 0 reaches a 100-episode mean of ~115 at 15k frames (~150 at 20k); ~10 s.
    s = run_fit(
        *BASE,
        "--model.init_args.max_frames=15000",
        "--model.init_args.learning_starts=1000",
        "--model.init_args.epsilon={start: 1.0, end: 0.05, end_frame: 10000}",
        "--model.init_args.target_update_frequency=500",
        "--metrics.log_frequency=5000",
    ).summary
    assert s["frames"] == 15000 and s["episodes"] >= 100
    assert s["return_ma"] > 50, f"return_ma {s['return_ma']} (random ~{RANDOM_CARTPOLE_RETURN})"


# --- rounds of updates ---------------------------------------------------------------------------


def test_a_round_of_stacked_batches_is_the_same_updates_in_order_with_one_priority_write():
    """One cycle of three batches through ``training_step`` equals three ``update`` calls in
    order (same weights and Adam state after), and writes the priorities of all 48 slots in
    one call with the TD errors each update saw. Catches a loop that reuses the first batch,
    skips the target update between updates, or writes priorities per update."""
    batches = [hand_batch(seed=seed)._replace(weights=torch.ones(16)) for seed in range(3)]
    batches = [b._replace(indices=torch.arange(16) + 16 * i) for i, b in enumerate(batches)]
    reference = small_dqn(prioritized=True, tau=0.5)
    manual_optimization(reference)
    tds = [reference.update(batch, reference.optimizers()) for batch in batches]

    model = small_dqn(prioritized=True, tau=0.5)
    model.memory = model.build_memory()
    for _ in range(24):  # 48 slots of two envs
        model.memory.add(np.zeros((2, 4), np.float32), np.zeros(2, np.int64), np.zeros(2),
                         np.zeros((2, 4), np.float32), np.zeros(2, bool), np.zeros(2, bool),
                         np.ones(2, bool))  # fmt: skip
    writes = []
    write = model.memory.update_priorities
    model.memory.update_priorities = lambda i, td: writes.append((i, td)) or write(i, td)
    manual_optimization(model)
    model.training_step([stack(*batches)], 0)

    for ours, theirs in zip(
        model.state_dict().values(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ((indices, td_errors),) = writes
    np.testing.assert_array_equal(indices, np.arange(48))
    np.testing.assert_allclose(td_errors, torch.cat(tds).abs().numpy(), rtol=1e-6)
    expected = (np.abs(td_errors) + model.memory.eps) ** model.per_alpha
    np.testing.assert_allclose(model.memory.tree.get(np.arange(48)), expected, rtol=1e-6)


class RecordingAgent:
    """An off-policy agent that records the order of env steps and batch draws."""

    device = torch.device("cpu")

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self.events: list[tuple[str, int]] = []
        self.rollout = None

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        self.events.append(("step", self.rollout.frames))
        return torch.zeros(len(obs), dtype=torch.long)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return actions

    def sample_batches(self, count: int) -> ReplayBatch:
        self.events.append(("sample", count))
        return self.rollout.memory.sample_stack(count, 4).as_tensors()


def test_rollout_rounds_step_the_envs_then_draw_each_cycles_batches_lazily():
    """Two envs, 3 vector steps per cycle, 4 updates per cycle, updates from frame 12 on:
    a round holds 32 / 4 = 8 cycles, each cycle's batches are drawn after its env steps and
    as the round is iterated (so each update sees the memory as the sequential loop would),
    and no batch is drawn before learning_starts. Catches rounds that draw before stepping,
    sample ahead of training_step, or ignore learning_starts."""
    agent = RecordingAgent(max_frames=10**6)
    memory = ReplayMemory(ReplayLayout(1000, 2, (4,), np.float32, (), np.int64, seed=0))
    rollout = OffPolicyRollout(agent, EnvSpec("CartPole-v1", num_envs=2), memory, 0,
                               learning_starts=12, training_frequency=3, updates_per_step=4,
                               epoch_frames=96)  # fmt: skip
    agent.rollout = rollout
    assert rollout.cycles_per_epoch == 16 and rollout.cycles_per_round == 8 and len(rollout) == 2

    rounds = iter(rollout)
    first = next(rounds)
    assert agent.events == []  # lazy: nothing happens until training_step iterates the round
    stacks = []
    for batches in first:
        stacks.append(batches)
        assert agent.events[-1] == ("sample", 4)
    assert rollout.frames == 8 * 3 * 2
    # Cycles 1-2 end at frames 6 and 12: the first draws nothing (before learning_starts).
    assert agent.events[:7] == [("step", 0), ("step", 2), ("step", 4),
                                ("step", 6), ("step", 8), ("step", 10), ("sample", 4)]  # fmt: skip
    assert len(stacks) == 7 and all(s.obs.shape == (4, 4, 4) for s in stacks)
    assert agent.events.count(("sample", 4)) == 7
    assert len(list(rounds)) == 1  # the second round of this epoch
    rollout.close()
