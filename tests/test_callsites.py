"""Each algorithm's ``training_step`` (and the hooks around it) against hand-computed numbers.

The pure loss functions have their own tests; these check that the call sites feed them the
right networks, signs, reductions and hyperparameters. Every net whose output matters is
made constant (last layer's weights zeroed, biases set), so a hand-made batch gives losses
that can be written down: a uniform or known Categorical policy, a Gaussian of known mean
and std, critics of known values. Each test names in its docstring the bug it catches.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from slm_lightning.algorithms import A2C, DQN, PPO, SAC, CrossQ, Reinforce
from slm_lightning.callbacks import MetricsTracker
from slm_lightning.data.onpolicy_memory import OnPolicyBatch, OnPolicyMemory
from slm_lightning.data.replay import ReplayBatch
from slm_lightning.data.vector_rollout import EpisodeLog
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.sac_nets import TwinQ
from slm_lightning.optim import OptimizerSpec
from slm_lightning.schedules import Schedule
from slm_lightning.train_metrics import TrainMetrics
from tests.offpolicy_helpers import manual_optimization, one_round

TINY = MLPSpec([8], "tanh")
CARTPOLE = EnvSpec("CartPole-v1", num_envs=1)  # Discrete(2), 4-dim observations
PENDULUM = EnvSpec("Pendulum-v1", num_envs=1)  # Box(-2, 2, (1,)), 3-dim observations
# A Box of two action dimensions (main and side engine), 8-dim observations.
LUNAR_CONTINUOUS = EnvSpec("LunarLander-v3", num_envs=1, kwargs={"continuous": True})
LN2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)  # 0.918939


class Rollout:
    """What ``training_step`` and the epoch hooks read off the rollout: the frame clock."""

    def __init__(self, frames: int = 0, minibatches: int = 1) -> None:
        self.frames = frames
        self.minibatches = minibatches

    def __len__(self) -> int:
        return self.minibatches


def attach(model, frames: int = 0) -> list[torch.optim.Optimizer]:
    """Give ``model`` a rollout at ``frames`` and its optimizers, as ``fit`` would."""
    optimizers = model.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    model.rollout = Rollout(frames)
    model.trainer = SimpleNamespace(
        optimizers=optimizers, world_size=1, precision_plugin=SimpleNamespace()
    )
    return optimizers


def constant(layer: nn.Linear, bias: list[float]) -> None:
    """Make ``layer`` output ``bias`` whatever its input."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(bias))


def metric(model, key: str) -> float:
    value = model.train_metrics[key]
    return float(value.item() if isinstance(value, Tensor) else value)


def onpolicy_batch(obs_dim: int, **fields: list) -> OnPolicyBatch:
    """A minibatch as the on-policy rollout yields it, with random observations (the nets
    whose outputs the expected numbers depend on are constant). Fields not given are NaN, so
    a call site that reads one it should not makes the numbers NaN."""
    given = {key: torch.tensor(value, dtype=torch.float32) for key, value in fields.items()}
    n = len(next(iter(given.values())))
    if "actions" in given and given["actions"].dim() == 1:
        given["actions"] = given["actions"].long()
    nan = torch.full((n,), float("nan"))
    tensors = {key: given.get(key, nan) for key in OnPolicyBatch._fields if key != "obs"}
    return OnPolicyBatch(obs=torch.randn(n, obs_dim), **tensors)


# --- DQN -----------------------------------------------------------------------------------------


def dqn_batch(rewards: tuple[float, float] = (1.0, 0.5), terminated=(0.0, 1.0)) -> ReplayBatch:
    return ReplayBatch(
        obs=torch.randn(2, 4),
        actions=torch.tensor([0, 1]),
        rewards=torch.tensor(rewards),
        next_obs=torch.randn(2, 4),
        discounts=torch.tensor([0.9, 0.9]),
        terminated=torch.tensor(terminated),
        indices=torch.tensor([0, 1]),
    )


@pytest.mark.parametrize(
    ("double", "expected_loss"),
    [
        # Plain DQN: the target net picks and values, max(3, 5) = 5.
        # targets (1 + 0.9 * 5, 0.5) = (5.5, 0.5); Q(s, a) = (1, 0)
        # loss = 0.5 * ((1 - 5.5)^2 + (0 - 0.5)^2) / 2 = 0.5 * (20.25 + 0.25) / 2 = 5.125
        (False, 5.125),
        # Double DQN: the online net picks argmax(1, 0) = action 0, the target net values it: 3.
        # targets (1 + 0.9 * 3, 0.5) = (3.7, 0.5)
        # loss = 0.5 * ((1 - 3.7)^2 + (0 - 0.5)^2) / 2 = 0.5 * (7.29 + 0.25) / 2 = 1.885
        (True, 1.885),
    ],
    ids=["dqn", "double-dqn"],
)
def test_dqn_target_comes_from_the_right_net(double: bool, expected_loss: float) -> None:
    """Catches Double DQN picking the argmax with the target net (it then equals plain DQN,
    5.125), and plain DQN taking the max over the online net (targets 1 + 0.9 * 1: 0.265)."""
    torch.manual_seed(0)
    model = DQN(CARTPOLE, double=double, net=TINY, loss="mse")
    constant(model.policy.head, [1.0, 0.0])  # online Q(s, .) = (1, 0): prefers action 0
    constant(model.target.head, [3.0, 5.0])  # target Q(s, .) = (3, 5): prefers action 1
    loss, _ = model.loss_terms(dqn_batch())
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6)
    assert metric(model, "train/loss") == pytest.approx(expected_loss, rel=1e-6)
    assert metric(model, "train/q_mean") == pytest.approx(0.5)  # (Q(s, 0) + Q(s, 1)) / 2


def test_dqn_logs_the_mean_loss_of_the_updates_since_the_last_row() -> None:
    """Two updates of plain DQN with constant nets, then the row the metrics logger takes.
    Catches a row logging the last update's loss (0.8125) or the sum (5.9375)."""
    torch.manual_seed(0)
    model = DQN(CARTPOLE, net=TINY, loss="mse")
    constant(model.policy.head, [1.0, 0.0])  # Q(s, .) = (1, 0); Q(s, a) of actions (0, 1): (1, 0)
    constant(model.target.head, [3.0, 5.0])
    manual_optimization(model)
    model.optimizers().param_groups[0]["lr"] = 0.0  # the constant nets stay constant
    # Update 1, as above: targets (1 + 0.9 * 5, 0.5) = (5.5, 0.5), loss 5.125.
    # Update 2 (the next cycle of the same round), both terminal: targets = rewards (0, 1.5)
    # loss = 0.5 * ((1 - 0)^2 + (0 - 1.5)^2) / 2 = 0.5 * 3.25 / 2 = 0.8125
    second = dqn_batch(rewards=(0.0, 1.5), terminated=(1.0, 1.0))
    model.training_step(one_round(dqn_batch(), second), 0)
    row = model.train_metrics.pop_row()
    assert row["train/loss"] == pytest.approx((5.125 + 0.8125) / 2, rel=1e-6)  # 2.96875
    assert row["train/q_mean"] == pytest.approx(0.5)
    assert "train/loss" not in model.train_metrics.pop_row()  # the next row starts over


def test_dqn_explores_and_learns_at_the_scheduled_values_of_the_frame_clock() -> None:
    """Catches a linear ``Schedule`` ignoring ``end_frame`` at the DQN call sites (epsilon
    and lr would follow max_frames instead)."""
    torch.manual_seed(0)
    model = DQN(
        CARTPOLE,
        max_frames=100_000,
        net=TINY,
        lr=Schedule(0.002, 0.0, end_frame=2_000),
        epsilon=Schedule(1.0, 0.1, start_frame=200, end_frame=1_200),
    )
    (optimizer,) = attach(model, frames=700)
    model.on_train_epoch_start()
    # epsilon: 1 + (0.1 - 1) * (700 - 200) / (1200 - 200) = 1 - 0.9 * 0.5 = 0.55
    # lr: 0.002 * (1 - 700 / 2000) = 0.0013
    assert metric(model, "train/epsilon") == pytest.approx(0.55)
    assert metric(model, "train/lr") == pytest.approx(0.0013)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0013)
    # The greedy action (0) is kept with probability 1 - 0.55 + 0.55 / 2 = 0.725.
    constant(model.policy.head, [1.0, 0.0])
    actions = model.explore(torch.zeros(20_000, 4))
    assert (actions == 0).float().mean() == pytest.approx(0.725, abs=0.015)


# --- SAC and CrossQ ------------------------------------------------------------------------------


def constant_critic(critics: TwinQ, member: int, values: list[float]) -> None:
    """Make critic ``member`` of the ensemble output ``values`` whatever its input."""
    with torch.no_grad():
        critics.weights[-1][member].zero_()
        critics.biases[-1][member, 0] = torch.tensor(values)


def test_sac_takes_the_min_of_the_twin_critics_and_polyak_averages_towards_the_online_critics():
    """Discrete SAC with a uniform policy over two actions and fixed alpha = 0.5, so that every
    term is exact. Catches the critic target or the actor loss taking the max over the twin
    critics instead of the min, and the Polyak step with tau and 1 - tau swapped."""
    torch.manual_seed(0)
    tau = 0.2
    # critic_lr ~ 0: the critic step (before the actor's) leaves the constant Q-values as set.
    model = SAC(CARTPOLE, actor=TINY, critic=TINY, alpha=0.5, tau=tau, critic_lr=1e-9)
    constant(model.actor.head, [0.0, 0.0])  # pi(.|s) = (0.5, 0.5), log pi = -ln 2
    constant_critic(model.critic, 0, [1.0, 5.0])
    constant_critic(model.critic, 1, [3.0, 4.0])
    constant_critic(model.critic_target, 0, [2.0, 6.0])
    constant_critic(model.critic_target, 1, [4.0, 1.0])
    before = [p.detach().clone() for p in model.critic_target.parameters()]
    manual_optimization(model, attach(model))

    model.training_step(one_round(dqn_batch()), 0)

    # Target: min over target critics per action = (min(2, 4), min(6, 1)) = (2, 1)
    # V(s') = sum_a pi(a) (Q(a) - alpha log pi(a)) = 0.5 * (2 + 1) + 0.5 * ln 2 = 1.846574
    # targets = (1 + 0.9 * 1.846574, 0.5 (terminated)) = (2.661916, 0.5)
    # Q(s, a) of actions (0, 1): critic 0 (1, 5), critic 1 (3, 4)
    # loss = 0.5 * ((1 - 2.661916)^2 + (5 - 0.5)^2) / 2 + 0.5 * ((3 - 2.661916)^2 + (4 - 0.5)^2) / 2
    #      = 0.5 * (2.761966 + 20.25) / 2 + 0.5 * (0.114301 + 12.25) / 2 = 8.844067
    # (with the max (4, 6): V(s') = 5.346574, loss 15.890353)
    assert metric(model, "train/critic_loss") == pytest.approx(8.844067, rel=1e-5)
    assert metric(model, "train/q_mean") == pytest.approx(3.25)  # (1 + 5 + 3 + 4) / 4
    # Actor: min over online critics per action = (min(1, 3), min(5, 4)) = (1, 4)
    # loss = -sum_a pi(a) (Q(a) - alpha log pi(a)) = -(0.5 * (1 + 4) + 0.5 * ln 2) = -2.846574
    # (with the max (3, 5): -4.346574)
    assert metric(model, "train/actor_loss") == pytest.approx(-(2.5 + 0.5 * LN2), rel=1e-5)
    assert metric(model, "train/entropy") == pytest.approx(LN2, rel=1e-6)  # uniform over two
    assert metric(model, "train/alpha") == pytest.approx(0.5)

    # Polyak: target <- tau * online + (1 - tau) * target, after the critic step.
    # Output biases: critic 0 (0.2 * 1 + 0.8 * 2, 0.2 * 5 + 0.8 * 6) = (1.8, 5.8),
    #                critic 1 (0.2 * 3 + 0.8 * 4, 0.2 * 4 + 0.8 * 1) = (3.8, 1.6)
    # (swapped: (1.2, 5.2) and (3.2, 3.4))
    output_bias = model.critic_target.biases[-1].detach()[:, 0]
    torch.testing.assert_close(output_bias, torch.tensor([[1.8, 5.8], [3.8, 1.6]]))
    for old, now, theta in zip(
        before, model.critic_target.parameters(), model.critic.parameters(), strict=True
    ):
        torch.testing.assert_close(now, tau * theta.detach() + (1 - tau) * old)


def test_crossq_bootstraps_from_the_min_of_its_own_critics() -> None:
    """CrossQ's own call site of the clipped double-Q target: continuous actions, critics of
    constant value 1 and 3, alpha ~ 0 so the sampled actions' log-probabilities drop out.
    Catches the target or the actor loss taking the max over the critics."""
    torch.manual_seed(0)
    model = CrossQ(PENDULUM, actor=TINY, critic=TINY, alpha=1e-9, policy_delay=1, critic_lr=1e-9)
    for member, value in enumerate([1.0, 3.0]):
        constant_critic(model.critic, member, [value])  # after the last renorm: constant Q
    manual_optimization(model, attach(model))
    batch = dqn_batch()._replace(
        obs=torch.randn(2, 3), next_obs=torch.randn(2, 3), actions=torch.rand(2, 1)
    )

    model.training_step(one_round(batch), 0)

    # targets = (1 + 0.9 * min(1, 3), 0.5) = (1.9, 0.5)
    # loss = 0.5 * ((1 - 1.9)^2 + (1 - 0.5)^2) / 2 + 0.5 * ((3 - 1.9)^2 + (3 - 0.5)^2) / 2
    #      = 0.5 * (0.81 + 0.25) / 2 + 0.5 * (1.21 + 6.25) / 2 = 0.265 + 1.865 = 2.13
    # (with the max: targets (3.7, 0.5), loss 0.5 * (7.29 + 0.25) / 2 + 0.5 * (0.49 + 6.25) / 2 = 3.57)
    assert metric(model, "train/critic_loss") == pytest.approx(2.13, rel=1e-5)
    # Actor: -E[min(1, 3) - alpha log pi] = -1 (with the max: -3)
    assert metric(model, "train/actor_loss") == pytest.approx(-1.0, rel=1e-5)


# --- policy-gradient family: the Gaussian policy -------------------------------------------------


def test_gaussian_log_prob_and_entropy_sum_over_action_dimensions() -> None:
    """REINFORCE on a 2-D Box: mean (0.5, -0.5), std (0.5, 1). Catches the log-probability
    or the entropy of a multi-dimensional Gaussian averaged over action dimensions instead
    of summed (policy loss -0.0888, entropy 1.0724)."""
    torch.manual_seed(0)
    model = Reinforce(LUNAR_CONTINUOUS, actor=TINY, entropy_coef=0.1)
    policy: ActorCritic = model.policy
    constant(policy.actor_head, [0.5, -0.5])
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([math.log(0.5), 0.0]))
    attach(model)
    batch = onpolicy_batch(8, actions=[[1.0, -0.5], [0.0, 1.5]], advantages=[2.0, -1.0])

    loss = model.minibatch_loss(batch)

    # log N(a; mu, sigma) = -(a - mu)^2 / (2 sigma^2) - ln sigma - 0.5 ln(2 pi), per dimension:
    # sample 0: (-0.5 + ln 2 - 0.918939) + (0 - 0 - 0.918939) = -1.644730
    # sample 1: (-0.5 + ln 2 - 0.918939) + (-2 - 0 - 0.918939) = -3.644730
    # policy loss = -(-1.644730 * 2 + -3.644730 * -1) / 2 = -0.177635
    log_probs = [
        (-0.5 + LN2 - HALF_LOG_2PI) + (-HALF_LOG_2PI),
        (-0.5 + LN2 - HALF_LOG_2PI) + (-2.0 - HALF_LOG_2PI),
    ]
    policy_loss = -(log_probs[0] * 2.0 + log_probs[1] * -1.0) / 2
    assert policy_loss == pytest.approx(-0.177635, abs=1e-6)
    # entropy = sum_d (0.5 + 0.5 ln(2 pi) + ln sigma_d) = 2 * 1.418939 - ln 2 = 2.144730
    entropy = 2 * (0.5 + HALF_LOG_2PI) - LN2
    assert metric(model, "train/policy_loss") == pytest.approx(policy_loss, rel=1e-5)
    assert metric(model, "train/entropy") == pytest.approx(entropy, rel=1e-6)
    # loss = -0.177635 - 0.1 * 2.144730 = -0.392108
    assert float(loss.detach()) == pytest.approx(policy_loss - 0.1 * entropy, rel=1e-5)


# --- PPO -----------------------------------------------------------------------------------------


def ppo_model(**kwargs) -> PPO:
    """PPO on CartPole with a uniform policy (log pi = -ln 2 for either action) and a critic
    of constant value 2; advantages as given unless ``normalize_advantages`` is passed."""
    torch.manual_seed(0)
    kwargs = {"normalize_advantages": False, "clip_eps": 0.2, "value_coef": 0.5, **kwargs}
    model = PPO(CARTPOLE, actor=TINY, critic=TINY, **kwargs)
    constant(model.policy.actor_head, [0.0, 0.0])
    constant(model.policy.critic_head, [2.0])
    attach(model)
    model.on_train_epoch_start()  # sets the clip range and entropy coefficient
    return model


# Ratios r = pi / pi_old chosen around the clip range [0.8, 1.2]: old log-probs -ln 2 - ln r.
RATIOS = [1.5, 1.5, 0.5, 0.5, 1.1]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, 1.0]


def ppo_batch(**overrides: list) -> OnPolicyBatch:
    fields = {
        "actions": [0, 1, 0, 1, 0],
        "log_probs": [-LN2 - math.log(r) for r in RATIOS],
        "values": [2.0] * 5,
        "advantages": ADVANTAGES,
        "returns": [2.0] * 5,
        **overrides,
    }
    return onpolicy_batch(4, **fields)


def test_ppo_clips_the_ratio_pi_over_pi_old_to_its_range() -> None:
    """Catches the ratio taken the wrong way round (pi_old / pi: loss 0.0048), a wrong clip
    range, and max instead of min in the surrogate (loss -0.34)."""
    model = ppo_model()
    model.minibatch_loss(ppo_batch())
    # min(r A, clip(r, 0.8, 1.2) A) per sample:
    #   r 1.5, A +1: min(1.5, 1.2) = 1.2      r 1.5, A -1: min(-1.5, -1.2) = -1.5
    #   r 0.5, A +1: min(0.5, 0.8) = 0.5      r 0.5, A -1: min(-0.5, -0.8) = -0.8
    #   r 1.1, A +1: min(1.1, 1.1) = 1.1
    # policy loss = -(1.2 - 1.5 + 0.5 - 0.8 + 1.1) / 5 = -0.1
    assert metric(model, "train/policy_loss") == pytest.approx(-0.1, abs=1e-6)
    # Four of five ratios lie outside [0.8, 1.2].
    assert metric(model, "train/clipfrac") == pytest.approx(0.8)
    # approx_kl = mean((r - 1) - ln r) = (2 * 0.094535 + 2 * 0.193147 + 0.004690) / 5 = 0.116011
    assert metric(model, "train/approx_kl") == pytest.approx(0.116011, rel=1e-4)
    assert metric(model, "train/value_loss") == pytest.approx(0.0)  # V = R = 2


def test_ppo_logs_the_means_of_its_minibatches() -> None:
    """Two minibatches of one update (sizes 5 and 2), then one metrics row. Catches a row
    that holds the last minibatch's values (loss -1.7), means weighted by minibatch size
    (clipfrac (4 + 1) / 7 = 0.714), and diagnostics kept from the first minibatch only."""
    model = ppo_model()
    model.minibatch_loss(ppo_batch())
    # Second minibatch: r = (1, 2), A = (2, 2), R = (4, 2), V = 2 (entropy coefficient 0).
    #   surrogate min(r A, clip(r, 0.8, 1.2) A) = (min(2, 2), min(4, 2.4)) = (2, 2.4)
    #   policy loss = -(2 + 2.4) / 2 = -2.2; value loss = 0.5 * ((2 - 4)^2 + 0) / 2 = 1
    #   loss = -2.2 + 0.5 * 1 = -1.7
    #   approx_kl = ((1 - 1) - ln 1 + (2 - 1) - ln 2) / 2 = 0.153426
    #   old_approx_kl = -(ln 1 + ln 2) / 2 = -0.346574; clipfrac = (0 + 1) / 2 = 0.5
    second = ppo_batch(actions=[0, 1], log_probs=[-LN2, -LN2 - math.log(2.0)],
                       values=[2.0, 2.0], advantages=[2.0, 2.0], returns=[4.0, 2.0])  # fmt: skip
    model.minibatch_loss(second)
    row = model.train_metrics.pop_row()
    # First minibatch (see test_ppo_clips_the_ratio_pi_over_pi_old_to_its_range): policy loss
    # -0.1, value loss 0, loss -0.1, approx_kl 0.116011, clipfrac 0.8,
    # old_approx_kl = -(2 ln 1.5 + 2 ln 0.5 + ln 1.1) / 5 = 0.096011.
    expected = {
        "train/loss": (-0.1 - 1.7) / 2,
        "train/policy_loss": (-0.1 - 2.2) / 2,
        "train/value_loss": (0.0 + 1.0) / 2,
        "train/entropy": LN2,
        "train/approx_kl": (0.116011 + 0.153426) / 2,
        "train/old_approx_kl": (0.096011 - 0.346574) / 2,
        "train/clipfrac": (0.8 + 0.5) / 2,
    }
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Settings in force are logged as they are: the clip range of this rollout.
    assert row["train/clip_eps"] == pytest.approx(0.2)
    # The means start over: a row after no update holds the settings alone.
    assert "train/loss" not in model.train_metrics.pop_row()


def test_ppo_entropy_bonus_lowers_the_loss() -> None:
    """Catches the entropy bonus added with the wrong sign (loss +0.0693)."""
    model = ppo_model(entropy_coef=0.1)
    returns = [3.0, 1.0, 2.0, 2.0, 2.0]
    loss = model.minibatch_loss(ppo_batch(returns=returns))
    # value loss = 0.5 * ((2 - 3)^2 + (2 - 1)^2 + 0 + 0 + 0) / 5 = 0.2
    # loss = policy + 0.5 * value - 0.1 * entropy = -0.1 + 0.5 * 0.2 - 0.1 * ln 2 = -0.069315
    assert metric(model, "train/value_loss") == pytest.approx(0.2, rel=1e-6)
    assert metric(model, "train/entropy") == pytest.approx(LN2, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(-0.1 * LN2, abs=1e-6)
    assert metric(model, "train/loss") == pytest.approx(-0.1 * LN2, abs=1e-6)


@pytest.mark.parametrize(("target_kl", "steps"), [(None, 3), (0.13, 1)], ids=["all", "kl"])
def test_ppo_training_step_steps_each_minibatch_until_the_kl_passes_its_target(
    target_kl: float | None, steps: int
) -> None:
    """One training step trains a rollout's minibatches in order, one SGD step each (lr
    1e-4, so the ratios hardly move). With target_kl 0.13 the first minibatch (approx_kl
    0.116) steps and the second (0.153, see test_ppo_logs_the_means_of_its_minibatches)
    stops the round without a step on it, so the third is never seen. Catches a round that
    skips the crossing minibatch but goes on (2 steps), steps on it (2), or ignores the
    target (3)."""
    model = ppo_model(target_kl=target_kl, lr=1e-4, max_grad_norm=None,
                      optimizer=OptimizerSpec("SGD"))  # fmt: skip
    (optimizer,) = manual_optimization(model)
    taken = []
    step = optimizer.step
    optimizer.step = lambda *args, **kwargs: taken.append(1) or step(*args, **kwargs)
    second = ppo_batch(actions=[0, 1], log_probs=[-LN2, -LN2 - math.log(2.0)],
                       values=[2.0, 2.0], advantages=[2.0, 2.0], returns=[4.0, 2.0])  # fmt: skip
    seen = []
    loss = model.minibatch_loss
    model.minibatch_loss = lambda batch: seen.append(len(batch.actions)) or loss(batch)

    model.training_step([ppo_batch(), second, ppo_batch()], 0)

    assert len(taken) == steps
    assert seen == ([5, 2, 5] if target_kl is None else [5, 2])
    # The last minibatch seen is the one whose terms were recorded last.
    last_kl = 0.116011 if target_kl is None else 0.153426
    assert metric(model, "train/approx_kl") == pytest.approx(last_kl, rel=1e-3)


def test_ppo_value_clipping_takes_the_larger_loss() -> None:
    """PPO2's value clipping: ``max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``.
    Catches min instead of max (value loss 0.1883)."""
    model = ppo_model(clip_value=0.2)
    batch = onpolicy_batch(4, actions=[0, 1, 0], log_probs=[-LN2] * 3, advantages=[0.0] * 3,
                           values=[1.0, 1.0, 3.0], returns=[3.0, 1.0, 2.5])  # fmt: skip
    model.minibatch_loss(batch)
    # V = 2 everywhere; clipped V = V_old + clip(2 - V_old, -0.2, 0.2) = (1.2, 1.2, 2.8)
    #   sample 0: max((2 - 3)^2, (1.2 - 3)^2) = max(1, 3.24) = 3.24
    #   sample 1: max((2 - 1)^2, (1.2 - 1)^2) = max(1, 0.04) = 1
    #   sample 2: max((2 - 2.5)^2, (2.8 - 2.5)^2) = max(0.25, 0.09) = 0.25
    # value loss = 0.5 * (3.24 + 1 + 0.25) / 3 = 0.748333
    assert metric(model, "train/value_loss") == pytest.approx(0.748333, rel=1e-5)


# --- A2C and REINFORCE ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalize", "policy_loss"),
    [
        # -(ln 0.25 * 1 + ln 0.75 * 5) / 2 = -(-1.386294 - 1.438410) / 2 = 1.412352
        # (weighted by the returns (10, 20) instead: 9.808293)
        (False, 1.412352),
        # normalised advantages (1, 5) -> (-2, 2) / std, std = sqrt((4 + 4) / 1) = 2.828427
        #   = (-0.707107, 0.707107)
        # -(ln 0.25 * -0.707107 + ln 0.75 * 0.707107) / 2 = -0.388418
        # (divided by the variance 8 instead: (-0.25, 0.25), -0.137327)
        (True, -0.388418),
    ],
    ids=["raw", "normalized"],
)
def test_a2c_policy_gradient_is_weighted_by_the_advantages(
    normalize: bool, policy_loss: float
) -> None:
    """pi(.|s) = (0.25, 0.75), V = 2, advantages (1, 5), returns (10, 20). Catches the policy
    gradient weighted by the returns, and advantage normalisation dividing by the variance."""
    torch.manual_seed(0)
    model = A2C(CARTPOLE, actor=TINY, critic=TINY, normalize_advantages=normalize,
                entropy_coef=0.01, value_coef=0.5)  # fmt: skip
    constant(model.policy.actor_head, [0.0, math.log(3.0)])  # softmax(0, ln 3) = (1/4, 3/4)
    constant(model.policy.critic_head, [2.0])
    attach(model)
    batch = onpolicy_batch(4, actions=[0, 1], advantages=[1.0, 5.0], returns=[10.0, 20.0])

    loss = model.minibatch_loss(batch)

    assert metric(model, "train/policy_loss") == pytest.approx(policy_loss, rel=1e-5)
    # value loss = 0.5 * ((2 - 10)^2 + (2 - 20)^2) / 2 = 0.5 * (64 + 324) / 2 = 97
    assert metric(model, "train/value_loss") == pytest.approx(97.0, rel=1e-6)
    # entropy = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    assert metric(model, "train/entropy") == pytest.approx(0.562335, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(
        policy_loss + 0.5 * 97.0 - 0.01 * 0.562335, rel=1e-5
    )


def test_reinforce_baseline_is_the_mean_return_of_real_transitions() -> None:
    """One env, four steps: a termination at step 1, then the masked NEXT_STEP autoreset
    slot 2 (not a transition). Catches the centring baseline averaging the masked slot."""
    model = Reinforce(CARTPOLE, gamma=0.5, actor=TINY, center_returns=True)
    memory = OnPolicyMemory(4, 1, (4,), np.float32, (), np.int64, model.estimator)
    memory.rewards[:, 0] = [1.0, 1.0, 0.0, 1.0]
    memory.terminated[:, 0] = [False, True, False, False]
    memory.valid[:, 0] = [True, True, False, True]
    memory.compute_returns()
    # Monte Carlo returns, gamma 0.5, backwards: G3 = 1; G2 = 0 + 0.5 * 1 = 0.5 (masked);
    # G1 = 1 (terminated); G0 = 1 + 0.5 * 1 = 1.5.
    # Baseline over the real transitions: (1.5 + 1 + 1) / 3 = 7/6
    # (over all four slots: (1.5 + 1 + 0.5 + 1) / 4 = 1)
    valid = memory.advantages[memory.valid]
    np.testing.assert_allclose(valid, [1.5 - 7 / 6, 1.0 - 7 / 6, 1.0 - 7 / 6], rtol=1e-6)


# --- learning rates and schedules (shared by the policy-gradient family) -------------------------


def test_schedules_reach_end_at_end_frame_not_at_max_frames() -> None:
    """Catches a ``Schedule`` that ignores ``end_frame`` (or ``start_frame``)."""
    linear = Schedule(1.0, 0.0, start_frame=100, end_frame=300)
    # before, a quarter, half, at the end and after: (1, 0.75, 0.5, 0, 0)
    values = [linear.value(frames, max_frames=10_000) for frames in (50, 150, 200, 300, 900)]
    assert values == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    exponential = Schedule(1.0, 0.01, end_frame=200, kind="exponential")
    # halfway, geometrically: 1 * (0.01 / 1) ** 0.5 = 0.1
    assert exponential.value(100, max_frames=10_000) == pytest.approx(0.1)
    # Without end_frame the schedule runs over max_frames: 2 + (0 - 2) * 2500 / 10000 = 1.5
    assert Schedule(2.0, 0.0).value(2_500, max_frames=10_000) == pytest.approx(1.5)


@pytest.mark.parametrize("cls", [PPO, A2C], ids=["ppo", "a2c"])
def test_actor_and_critic_step_at_their_own_scheduled_learning_rates(cls: type) -> None:
    """A separate critic trains at ``critic_lr``. Adam's first step moves each parameter by
    ``lr * g / (|g| + eps)``, i.e. by ~lr whatever the gradient's size, so the step taken by
    each network reads off its learning rate. Catches ``critic_lr`` ignored (the critic would
    step by the actor's lr) and schedules that ignore ``end_frame``."""
    torch.manual_seed(0)
    model = cls(
        CARTPOLE,
        max_frames=100_000,
        actor=TINY,
        critic=TINY,
        lr=Schedule(0.002, 0.0, end_frame=2_000),
        critic_lr=Schedule(0.02, 0.0, end_frame=4_000),
        max_grad_norm=None,
    )
    (optimizer,) = attach(model, frames=1_000)
    model.on_train_epoch_start()
    # lr = 0.002 * (1 - 1000 / 2000) = 0.001; critic_lr = 0.02 * (1 - 1000 / 4000) = 0.015
    assert metric(model, "train/lr") == pytest.approx(0.001)
    heads = {"actor": (model.policy.actor_head, 0.001), "critic": (model.policy.critic_head, 0.015)}
    before = {name: head.weight.detach().clone() for name, (head, _) in heads.items()}
    batch = onpolicy_batch(
        4,
        actions=[0, 1, 1, 0],
        log_probs=[-LN2] * 4,
        values=[0.0] * 4,
        advantages=[1.0, -0.5, 2.0, -1.0],
        returns=[1.0, 2.0, 3.0, 4.0],
    )
    loss = model.minibatch_loss(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, (head, lr) in heads.items():
        grad = head.weight.grad
        moved = (head.weight.detach() - before[name]).abs()
        large = grad.abs() > 1e-2  # where eps / |g| is negligible
        assert large.sum() >= 4, name
        torch.testing.assert_close(
            moved[large], torch.full_like(moved[large], lr), rtol=2e-3, atol=0
        )


# --- the return moving average -------------------------------------------------------------------


class RecordingLogger:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append(metrics)

    def save(self) -> None:
        pass


def test_return_moving_average_covers_the_window() -> None:
    """Fifteen episodes of returns 15, 14, .., 1 with a window of 12. Catches a moving average
    over another number of episodes (e.g. the last 10: 5.5), and a best average or a target
    counted before the window is full (best 15, target reached at frame 10)."""
    tracker = MetricsTracker(log_frequency=100, window=12, target_return=8.0)
    episodes = EpisodeLog()
    trainer = SimpleNamespace(
        world_size=1, callback_metrics={}, global_step=7, is_global_zero=True,
        loggers=[RecordingLogger()],
    )  # fmt: skip
    rollout = SimpleNamespace(episodes=episodes, frames=150)
    module = SimpleNamespace(
        rollout=rollout, frames=150, trainer=trainer, train_metrics=TrainMetrics()
    )
    for i in range(1, 16):  # episode i ends at frame 10 i with return 16 - i
        episodes.add(10 * i, np.array([16.0 - i]), np.array([10]))
    tracker.update(module)
    # Mean of the last 12 returns (12, 11, .., 1) = (12 + 1) / 2 = 6.5.
    assert tracker.return_ma == pytest.approx(6.5)
    # Full windows end at episodes 12..15: means 9.5, 8.5, 7.5, 6.5; the best is the first.
    assert tracker.best_return_ma == pytest.approx(9.5)
    # The first full-window mean >= 8 is 9.5, at episode 12 (frame 120).
    assert tracker.frames_to_target == 120
    assert float(trainer.callback_metrics["episode/return_ma"]) == pytest.approx(6.5)
    tracker.log_row(trainer, module)
    (row,) = trainer.loggers[0].rows
    assert row["episode/return_ma"] == pytest.approx(6.5)
    assert row["episode/return"] == 1.0 and row["episode/best_return_ma"] == pytest.approx(9.5)
    assert row["rollout/episodes"] == 15 and row["rollout/frames"] == 150
