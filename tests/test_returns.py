"""GAE, n-step and Monte Carlo returns against hand computations.

One small time-major trajectory (T=5, N=2) is shared by every test:

- env 0 is *truncated* after step 1 (bootstrap from ``V(final_obs) = 0.7``, held by the
  masked autoreset slot 2 as in :class:`OnPolicyMemory`); slot 2's reward is NaN;
- env 1 *terminates* after step 2 (no bootstrap); the masked slot 3 holds NaN in both
  reward and value;
- both envs are still running at the rollout end, bootstrapped from ``last_values``.

Expected numbers are written out by hand below, never by calling the function under test.
"""

import math

import numpy as np
import pytest

from slm_lightning.algorithms import A2C
from slm_lightning.data.onpolicy_memory import OnPolicyMemory
from slm_lightning.data.returns import (
    GAE,
    MonteCarloReturns,
    NStepReturns,
    ReturnsEstimator,
    gae,
    monte_carlo_returns,
    nstep_returns,
)
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError

NAN = float("nan")
REWARDS = np.array(
    [
        [1.0, 0.5],
        [2.0, 1.0],
        [NAN, 2.0],
        [0.5, NAN],
        [1.5, 1.0],
    ]
)
VALUES = np.array(
    [
        [0.3, 0.1],
        [0.6, 0.5],
        [0.7, 0.9],  # env 0: V(final_obs) of the truncated episode
        [0.2, NAN],
        [0.4, 0.8],
    ]
)
LAST_VALUES = np.array([0.25, 0.35])
TERMINATED = np.array(
    [
        [False, False],
        [False, False],
        [False, True],
        [False, False],
        [False, False],
    ]
)
TRUNCATED = np.array(
    [
        [False, False],
        [True, False],
        [False, False],
        [False, False],
        [False, False],
    ]
)
DONES = TERMINATED | TRUNCATED
# Masked slots: the NEXT_STEP autoreset step after each done.
VALID = np.array(
    [
        [True, True],
        [True, True],
        [False, True],
        [True, False],
        [True, True],
    ]
)


def next_values() -> np.ndarray:
    """Values shifted by one row, then the bootstrap values (what OnPolicyMemory builds)."""
    return np.array(
        [
            [0.6, 0.5],
            [0.7, 0.9],
            [0.2, NAN],
            [0.4, 0.8],
            [0.25, 0.35],
        ]
    )


def expected_gae(g: float, lam: float) -> tuple[dict, dict]:
    """Hand-written GAE advantages for every valid slot, keyed by (t, env)."""
    adv = {}
    # env 0, first episode: truncated after t=1, bootstrap from V(final_obs) = 0.7.
    d01 = 2.0 + g * 0.7 - 0.6
    d00 = 1.0 + g * 0.6 - 0.3
    adv[1, 0] = d01
    adv[0, 0] = d00 + g * lam * d01
    # env 0, second episode: running at the rollout end, bootstrap from last_values = 0.25.
    d40 = 1.5 + g * 0.25 - 0.4
    d30 = 0.5 + g * 0.4 - 0.2
    adv[4, 0] = d40
    adv[3, 0] = d30 + g * lam * d40
    # env 1, first episode: terminated after t=2, no bootstrap (the NaN after it stays out).
    d21 = 2.0 - 0.9
    d11 = 1.0 + g * 0.9 - 0.5
    d01_ = 0.5 + g * 0.5 - 0.1
    adv[2, 1] = d21
    adv[1, 1] = d11 + g * lam * d21
    adv[0, 1] = d01_ + g * lam * adv[1, 1]
    # env 1, second episode: one step, bootstrap from last_values = 0.35.
    adv[4, 1] = 1.0 + g * 0.35 - 0.8
    ret = {key: a + VALUES[key] for key, a in adv.items()}
    return adv, ret


def assert_valid_equal(actual: np.ndarray, expected: dict, rel: float = 1e-9) -> None:
    keys = {(int(t), int(i)) for t, i in np.argwhere(VALID)}
    assert set(expected) == keys
    for (t, i), value in expected.items():
        assert actual[t, i] == pytest.approx(value, rel=rel, abs=rel), (t, i)
    assert np.isfinite(actual[VALID]).all()


@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_gae_matches_hand_computation(gamma, lam):
    adv, ret = gae(REWARDS, VALUES, next_values(), TERMINATED, DONES, gamma, lam)
    exp_adv, exp_ret = expected_gae(gamma, lam)
    assert_valid_equal(adv, exp_adv)
    assert_valid_equal(ret, exp_ret)


def test_gae_gamma1_lambda1_is_bootstrapped_reward_sum():
    """With gamma = lambda = 1 the returns are plain reward sums plus the bootstrap."""
    _, ret = gae(REWARDS, VALUES, next_values(), TERMINATED, DONES, 1.0, 1.0)
    expected = {
        (0, 0): 1.0 + 2.0 + 0.7,  # truncated: + V(final_obs)
        (1, 0): 2.0 + 0.7,
        (3, 0): 0.5 + 1.5 + 0.25,  # rollout end: + last_values
        (4, 0): 1.5 + 0.25,
        (0, 1): 0.5 + 1.0 + 2.0,  # terminated: no bootstrap
        (1, 1): 1.0 + 2.0,
        (2, 1): 2.0,
        (4, 1): 1.0 + 0.35,
    }
    assert_valid_equal(ret, expected)


def test_gae_lambda0_is_td0():
    adv, _ = gae(REWARDS, VALUES, next_values(), TERMINATED, DONES, 0.5, 0.0)
    assert adv[0, 0] == pytest.approx(1.0 + 0.5 * 0.6 - 0.3)
    assert adv[1, 0] == pytest.approx(2.0 + 0.5 * 0.7 - 0.6)
    assert adv[2, 1] == pytest.approx(2.0 - 0.9)


# n-step returns with gamma = 0.9, written out as literal numbers.
NSTEP_EXPECTED = {
    1: {
        (0, 0): 1.54,  # 1 + .9 * .6
        (1, 0): 2.63,  # 2 + .9 * .7 (truncation bootstrap)
        (3, 0): 0.86,  # .5 + .9 * .4
        (4, 0): 1.725,  # 1.5 + .9 * .25 (rollout end)
        (0, 1): 0.95,  # .5 + .9 * .5
        (1, 1): 1.81,  # 1 + .9 * .9
        (2, 1): 2.0,  # terminated
        (4, 1): 1.315,  # 1 + .9 * .35
    },
    2: {
        (0, 0): 3.367,  # 1 + .9 * 2 + .81 * .7 (truncation after 2 steps)
        (1, 0): 2.63,
        (3, 0): 2.0525,  # .5 + .9 * 1.5 + .81 * .25 (rollout end)
        (4, 0): 1.725,
        (0, 1): 2.129,  # .5 + .9 * 1 + .81 * .9
        (1, 1): 2.8,  # 1 + .9 * 2, terminated
        (2, 1): 2.0,
        (4, 1): 1.315,
    },
    3: {
        (0, 0): 3.367,  # the episode ends before 3 steps
        (1, 0): 2.63,
        (3, 0): 2.0525,  # the rollout ends before 3 steps
        (4, 0): 1.725,
        (0, 1): 3.02,  # .5 + .9 * 1 + .81 * 2, terminated
        (1, 1): 2.8,
        (2, 1): 2.0,
        (4, 1): 1.315,
    },
}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_nstep_returns_match_hand_computation(n):
    ret = nstep_returns(REWARDS, next_values(), TERMINATED, DONES, 0.9, n)
    assert_valid_equal(ret, NSTEP_EXPECTED[n])


def test_nstep_bootstraps_at_horizon_mid_rollout():
    """No dones: the 3-step return bootstraps from V(s_{t+3}), or earlier at the rollout end."""
    rewards = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    nxt = np.array([[10.0], [20.0], [30.0], [40.0], [50.0]])
    no = np.zeros((5, 1), dtype=bool)
    ret = nstep_returns(rewards, nxt, no, no, 0.5, 3)
    expected = [
        1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 30,  # 6.5
        2 + 0.5 * 3 + 0.25 * 4 + 0.125 * 40,  # 9.5
        3 + 0.5 * 4 + 0.25 * 5 + 0.125 * 50,  # 12.5
        4 + 0.5 * 5 + 0.25 * 50,  # 19.0
        5 + 0.5 * 50,  # 30.0
    ]
    np.testing.assert_allclose(ret[:, 0], [6.5, 9.5, 12.5, 19.0, 30.0])
    np.testing.assert_allclose(ret[:, 0], expected)


def test_monte_carlo_returns_match_hand_computation():
    ret = monte_carlo_returns(REWARDS, DONES, 0.9)
    expected = {
        (0, 0): 2.8,  # 1 + .9 * 2; truncation is *not* bootstrapped
        (1, 0): 2.0,
        (3, 0): 1.85,  # .5 + .9 * 1.5; rollout end not bootstrapped either
        (4, 0): 1.5,
        (0, 1): 3.02,  # .5 + .9 * (1 + .9 * 2)
        (1, 1): 2.8,
        (2, 1): 2.0,
        (4, 1): 1.0,
    }
    assert_valid_equal(ret, expected)


def make_memory(estimator: ReturnsEstimator) -> OnPolicyMemory:
    mem = OnPolicyMemory(5, 2, (3,), np.dtype(np.float32), (), np.dtype(np.int64), estimator)
    mem.rewards[:] = REWARDS
    mem.values[:] = VALUES
    mem.last_values[:] = LAST_VALUES
    mem.terminated[:] = TERMINATED
    mem.truncated[:] = TRUNCATED
    mem.valid[:] = VALID
    return mem


def test_memory_next_values_shift_values_then_last_values():
    np.testing.assert_array_equal(
        make_memory(GAE(0.99, 0.95)).next_values, next_values().astype(np.float32)
    )


@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_memory_compute_returns_gae(gamma, lam):
    mem = make_memory(GAE(gamma, lam))
    mem.compute_returns()
    exp_adv, exp_ret = expected_gae(gamma, lam)
    assert_valid_equal(mem.advantages, exp_adv, rel=1e-5)
    assert_valid_equal(mem.returns, exp_ret, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_memory_compute_returns_nstep(n):
    mem = make_memory(NStepReturns(0.9, n))
    mem.compute_returns()
    assert_valid_equal(mem.returns, NSTEP_EXPECTED[n], rel=1e-5)
    exp_adv = {key: value - VALUES[key] for key, value in NSTEP_EXPECTED[n].items()}
    assert_valid_equal(mem.advantages, exp_adv, rel=1e-5)


def test_memory_compute_returns_monte_carlo():
    mem = make_memory(MonteCarloReturns(0.9))
    mem.compute_returns()
    assert mem.returns[0, 1] == pytest.approx(3.02, rel=1e-6)
    assert mem.returns[0, 0] == pytest.approx(2.8, rel=1e-6)
    assert mem.returns[3, 0] == pytest.approx(1.85, rel=1e-6)
    # No critic: the advantage is the return itself (a copy, not the same buffer).
    np.testing.assert_array_equal(mem.advantages[VALID], mem.returns[VALID])
    assert mem.advantages is not mem.returns


@pytest.mark.parametrize(
    ("returns", "expected"), [("gae", GAE(0.9, 0.8)), ("nstep", NStepReturns(0.9, 3))]
)
def test_a2c_maps_its_returns_choice_to_the_estimator(returns, expected):
    model = A2C(EnvSpec("CartPole-v1", num_envs=1), gamma=0.9, returns=returns, gae_lambda=0.8,
                n_steps=3)  # fmt: skip
    assert model.estimator == expected


def test_a2c_rejects_an_unknown_estimator():
    with pytest.raises(ConfigError, match=r"^model\.init_args\.returns must be one of gae, nstep"):
        A2C(EnvSpec("CartPole-v1", num_envs=1), returns="td_lambda")


def test_explained_variance_over_valid_slots():
    mem = OnPolicyMemory(2, 2, (1,), np.dtype(np.float32), (), np.dtype(np.int64), GAE(1.0, 1.0))
    mem.valid[:] = [[True, True], [True, False]]
    mem.returns[:] = [[0.0, 2.0], [4.0, NAN]]
    mem.values[:] = [[0.0, 2.0], [1.0, NAN]]
    # residuals (0, 0, 3): var 2; returns (0, 2, 4): var 8/3; 1 - 2 / (8/3) = 0.25
    assert mem.explained_variance() == pytest.approx(0.25)
    mem.values[:] = [[0.0, 2.0], [4.0, NAN]]
    assert mem.explained_variance() == pytest.approx(1.0)
    mem.returns[:] = [[3.0, 3.0], [3.0, NAN]]
    assert math.isnan(mem.explained_variance())
