"""SumTree and PrioritizedReplay against hand sums, the paper's formulas and sampling counts."""

import pickle

import numpy as np
import pytest

from slm_lightning.data.prioritized import PrioritizedReplay, SumTree
from slm_lightning.data.replay import ReplayLayout


def filled(size: int, capacity: int | None = None, seed: int = 0, **kwargs) -> PrioritizedReplay:
    """A memory holding ``size`` one-step transitions whose observation is their slot."""
    layout = ReplayLayout(capacity or size, 1, (1,), np.float32, (), np.int64, seed=seed)
    memory = PrioritizedReplay(layout, **kwargs)
    for i in range(size):
        memory.add(np.array([[i]]), np.array([i]), np.array([0.0]), np.array([[i + 1]]),
                   np.zeros(1, bool), np.zeros(1, bool), np.ones(1, bool))  # fmt: skip
    return memory


def test_sum_tree_totals_after_batched_updates():
    tree = SumTree(5)  # 8 leaves, 3 levels above them
    assert tree.leaves == 8 and tree.depth == 3
    tree.update(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert tree.total == 15.0
    # internal nodes: leaf pairs (1+2, 3+4, 5+0, 0+0), then (10, 5), then the root
    np.testing.assert_array_equal(tree.tree[4:8], [3.0, 7.0, 5.0, 0.0])
    np.testing.assert_array_equal(tree.tree[2:4], [10.0, 5.0])
    tree.update(np.array([3, 1]), np.array([0.0, 10.0]))
    assert tree.total == 1.0 + 10.0 + 3.0 + 0.0 + 5.0
    np.testing.assert_array_equal(tree.tree[4:6], [11.0, 3.0])
    tree.update(np.array([4]), 0.5)  # a scalar broadcasts
    assert tree.total == 14.5
    tree.update(np.array([], dtype=np.int64), np.array([]))  # an empty batch is a no-op
    assert tree.total == 14.5
    with pytest.raises(IndexError):
        tree.update(np.array([5]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        tree.update(np.array([0]), np.array([np.nan]))


def test_sum_tree_repeated_index_keeps_last_value():
    tree = SumTree(4)
    tree.update(np.arange(4), np.ones(4))
    tree.update(np.array([2, 0, 2, 2]), np.array([7.0, 9.0, 5.0, 3.0]))
    np.testing.assert_array_equal(tree.get(np.arange(4)), [9.0, 1.0, 3.0, 1.0])
    assert tree.total == 14.0


def test_sum_tree_find_prefix_sums_and_skips_empty_leaves():
    tree = SumTree(4)
    tree.update(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))  # prefix sums 1, 3, 6, 10
    values = np.array([0.0, 0.99, 1.0, 2.5, 3.0, 5.99, 6.0, 9.99])
    np.testing.assert_array_equal(tree.find(values), [0, 0, 1, 1, 2, 2, 3, 3])
    sparse = SumTree(6)  # leaves 3..7 are empty (an unfilled memory)
    sparse.update(np.arange(3), np.array([0.1, 0.2, 0.3]))
    assert sparse.find(np.array([sparse.total]))[0] == 2  # even at the very top of the range


def test_sampling_frequencies_match_priorities():
    memory = filled(4, alpha=1.0, eps=1e-9, seed=1)
    memory.update_priorities(np.arange(4), np.array([1.0, -2.0, 3.0, -4.0]))
    draws, batch = 200, 64
    counts = np.zeros(4)
    for _ in range(draws):
        np.add.at(counts, memory.sample(batch, beta=0.5).indices, 1)
    expected = draws * batch * np.array([0.1, 0.2, 0.3, 0.4])
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 16.27  # 99.9% quantile with 3 degrees of freedom


def test_importance_weights_by_hand():
    memory = filled(4, alpha=1.0, eps=1e-9, seed=2)
    memory.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    # P = 0.1, 0.2, 0.3, 0.4 and N = 4: w = (N P)^-0.5 = 1.5811, 1.1180, 0.9129, 0.7906.
    # With 64 strata of width 10/64 the first seven lie inside item 0's mass [0, 1), so the
    # batch max is item 0's weight and w / max = (P_i / P_0)^-0.5 = 1, 1/sqrt(2), 1/sqrt(3), 1/2.
    batch = memory.sample(64, beta=0.5)
    by_index = np.array([1.0, 0.70710678, 0.57735027, 0.5])
    np.testing.assert_allclose(batch.weights, by_index[batch.indices], rtol=1e-6)
    assert batch.weights.dtype == np.float32
    np.testing.assert_array_equal(batch.obs[:, 0], batch.indices)
    # beta = 0: no correction at all
    np.testing.assert_array_equal(memory.sample(8, beta=0.0).weights, np.ones(8))


def test_stacked_batches_are_each_stratified_and_normalised_on_their_own():
    """Four batches of two from priorities 30, 10, 10, 50 (P = 0.3, 0.1, 0.1, 0.5): each
    batch's strata are [0, 50) and [50, 100), so every batch draws one of items 0-2, then
    item 3. With beta 1 and N = 4, w = 1 / (4 P) = 0.8333, 2.5, 2.5, 0.5, and each batch is
    divided by its own max: (1, 0.5 / w_first). Catches strata spread over the whole stack
    or one max for the stack (a batch of item 0 would then weigh 0.8333 / 2.5)."""
    memory = filled(4, alpha=1.0, eps=1e-9, seed=5)
    memory.update_priorities(np.arange(4), np.array([30.0, 10.0, 10.0, 50.0]))
    stack = memory.sample_stack(4, 2, beta=1.0)
    assert stack.obs.shape == (4, 2, 1) and stack.indices.shape == stack.weights.shape == (4, 2)
    first = stack.indices[:, 0]
    assert (first < 3).all() and (stack.indices[:, 1] == 3).all()
    assert 0 in first and (first > 0).any()  # this seed draws both kinds of batch
    w = np.array([1 / 1.2, 2.5, 2.5])[first]
    np.testing.assert_allclose(stack.weights, np.stack([np.ones(4), 0.5 / w], 1), rtol=1e-5)
    np.testing.assert_array_equal(stack.obs[..., 0], stack.indices)
    # The first batch of the stack is what sample() draws from the same generator state.
    again = filled(4, alpha=1.0, eps=1e-9, seed=5)
    again.update_priorities(np.arange(4), np.array([30.0, 10.0, 10.0, 50.0]))
    np.testing.assert_array_equal(again.sample(2, beta=1.0).indices, stack.indices[0])


def test_update_priorities_and_max_priority_for_new_transitions():
    memory = filled(3, capacity=5, alpha=0.6, eps=0.01)
    np.testing.assert_array_equal(memory.tree.get(np.arange(5)), [1.0, 1.0, 1.0, 0.0, 0.0])
    memory.update_priorities(np.array([0, 1, 2]), np.array([-2.0, 0.0, 0.5]))
    # (|td| + 0.01)^0.6 = 2.01^0.6, 0.01^0.6, 0.51^0.6
    expected = [1.52025918, 0.06309573, 0.66763963]
    np.testing.assert_allclose(memory.tree.get(np.arange(3)), expected, rtol=1e-7)
    assert memory.max_priority == pytest.approx(1.52025918)
    memory.add(np.array([[3]]), np.array([3]), np.array([0.0]), np.array([[4]]),
               np.zeros(1, bool), np.zeros(1, bool), np.ones(1, bool))  # fmt: skip
    assert memory.tree.get(np.array([3]))[0] == pytest.approx(1.52025918)
    assert memory.tree.total == pytest.approx(sum(expected) + 1.52025918)
    with pytest.raises(IndexError):
        memory.update_priorities(np.array([4]), np.array([1.0]))  # slot 4 is still empty


def test_state_dict_round_trip_same_next_samples():
    memory = filled(6, capacity=8, seed=5)
    memory.update_priorities(np.arange(6), np.linspace(0.1, 3.0, 6))
    memory.sample(4, beta=0.4)
    state = pickle.loads(pickle.dumps(memory.state_dict()))
    restored = PrioritizedReplay(ReplayLayout(8, 1, (1,), np.float32, (), np.int64, seed=99))
    restored.load_state_dict(state)
    assert restored.max_priority == memory.max_priority
    for _ in range(3):
        a, b = memory.sample(16, beta=0.7), restored.sample(16, beta=0.7)
        for key, x, y in zip(a._fields, a, b, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -0.1}, "memory.alpha must be >= 0, got -0.1"),
        ({"eps": 0.0}, "memory.eps must be > 0, got 0.0"),
        ({"combined": True}, "memory.combined must be False for PrioritizedReplay"),
    ],
)
def test_invalid_arguments(kwargs, message):
    combined = kwargs.pop("combined", False)
    layout = ReplayLayout(4, 1, (1,), np.float32, (), np.int64, combined=combined)
    with pytest.raises(ValueError, match=message):
        PrioritizedReplay(layout, **kwargs)


def test_invalid_beta():
    with pytest.raises(ValueError, match=r"memory.beta must be in \[0, 1\], got 1.5"):
        filled(2).sample(2, beta=1.5)
