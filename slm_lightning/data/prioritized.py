"""Prioritized experience replay (Schaul et al. 2016) on a vectorised sum tree."""

from typing import Any

import numpy as np

from slm_lightning.data.replay import ReplayBatch, ReplayLayout, ReplayMemory, stacked


class SumTree:
    """Binary tree in one array whose every node holds the sum of its two children.

    Node 1 is the root, node ``k`` has children ``2k`` and ``2k + 1``, and leaf ``i`` is node
    ``leaves + i`` with ``leaves`` the capacity rounded up to a power of two (padding leaves
    stay 0). Both operations act on a whole batch with numpy, one tree level at a time.

    Args:
        capacity: number of leaves that can hold a value.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"sum tree capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.leaves = 1 << (capacity - 1).bit_length()
        self.depth = self.leaves.bit_length() - 1  # edges from the root to a leaf
        # float64: sums of up to ~1e6 priorities keep ~1e-10 relative precision.
        self.tree = np.zeros(2 * self.leaves, dtype=np.float64)

    @property
    def total(self) -> float:
        """Sum of all leaf values."""
        return float(self.tree[1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Leaf values at ``indices``.

        Args:
            indices: leaf indices in ``[0, capacity)``.
        """
        return self.tree[self.leaves + np.asarray(indices)]

    def update(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaf values, then recompute their ancestors level by level.

        Parents are recomputed from both children rather than shifted by a delta, so
        floating-point error does not accumulate over millions of updates.

        Args:
            indices: leaf indices in ``[0, capacity)``; where one repeats, its last value wins.
            values: non-negative values, one per index.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), indices.shape)
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.capacity:
            raise IndexError(f"sum tree indices must be in [0, {self.capacity})")
        # A NaN (e.g. a diverged TD error) would poison every ancestor sum and all sampling.
        if not np.all(np.isfinite(values) & (values >= 0)):
            raise ValueError(f"sum tree values must be finite and >= 0, got {values}")
        # Numpy does not promise which of repeated fancy-index writes wins: keep the last one
        # explicitly (first occurrence in the reversed batch).
        nodes, first = np.unique(indices[::-1], return_index=True)
        nodes = nodes + self.leaves
        self.tree[nodes] = values[::-1][first]
        for _ in range(self.depth):
            # Siblings share a parent: repeated parents are written twice with the same sum
            # (computed from final children), which is cheaper than deduplicating each level.
            nodes >>= 1
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each ``v`` in ``[0, total)``, the leaf ``i`` whose prefix-sum range holds it:
        ``sum(leaf[:i]) <= v < sum(leaf[:i + 1])``.

        Args:
            values: prefix-sum targets.
        """
        values = np.array(values, dtype=np.float64).reshape(-1)
        nodes = np.ones(values.shape, dtype=np.int64)
        for _ in range(self.depth):
            nodes <<= 1  # left child
            left_sum = self.tree[nodes]
            # Never descend into an empty right subtree: float rounding can leave ``v`` a hair
            # above the left sum when the right holds nothing, and a zero-priority leaf (an
            # unfilled slot) must never be drawn.
            right = values >= left_sum
            right &= self.tree[nodes + 1] > 0
            values -= left_sum * right
            nodes += right
        return nodes - self.leaves

    def state_dict(self) -> dict[str, Any]:
        """The capacity and a copy of the node array."""
        return {"capacity": self.capacity, "tree": self.tree.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the capacity must match.

        Args:
            state: a :meth:`state_dict`.
        """
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"sum tree capacity of the saved tree ({state['capacity']}) differs from "
                f"this tree's ({self.capacity})"
            )
        self.tree[...] = state["tree"]


class PrioritizedReplay(ReplayMemory):
    """Replay memory sampling transition ``i`` with probability ``P(i) = p_i / sum_k p_k``.

    ``p_i = (|delta_i| + eps)^alpha`` from the last TD error seen for ``i`` (proportional
    variant, Schaul et al. 2016, "Prioritized Experience Replay", sec. 3.3); new transitions
    get the largest priority given so far, so each is replayed at least once soon (Alg. 1,
    line 6). Call :meth:`update_priorities` with the batch's ``indices`` after each update;
    a slot overwritten in between simply receives the priority meant for its predecessor,
    as in the reference implementations.

    Args:
        layout: as in :class:`ReplayMemory`; ``layout.combined`` must stay False: new
            transitions already get the maximal priority, and forcing them into a batch
            would bias the importance-sampling correction.
        alpha: how much prioritisation is used (0: uniform, 1: fully proportional).
        eps: added to ``|delta|`` so that no transition's probability drops to zero.
    """

    def __init__(self, layout: ReplayLayout, alpha: float = 0.6, eps: float = 1e-6) -> None:
        if layout.combined:
            raise ValueError(
                "memory.combined must be False for PrioritizedReplay, got True (new "
                "transitions already get the maximal priority)"
            )
        if alpha < 0:
            raise ValueError(f"memory.alpha must be >= 0, got {alpha}")
        if eps <= 0:
            raise ValueError(f"memory.eps must be > 0, got {eps}")
        super().__init__(layout)
        self.alpha, self.eps = alpha, eps
        self.tree = SumTree(layout.capacity)
        self.max_priority = 1.0  # of p_i = (|delta| + eps)^alpha, i.e. after the exponent

    def _write(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        discounts: np.ndarray,
    ) -> np.ndarray:
        index = super()._write(obs, actions, rewards, next_obs, terminated, discounts)
        self.tree.update(index, self.max_priority)
        return index

    def sample(self, batch_size: int, beta: float = 0.4) -> ReplayBatch:
        """Draw one transition from each of ``batch_size`` equal slices of the priority mass.

        Stratifying (Schaul et al. 2016, App. B.2.1) lowers the variance of the batch
        composition compared with ``batch_size`` independent draws.

        Args:
            batch_size: transitions in the batch.
            beta: importance-sampling exponent in ``[0, 1]``; annealed to 1 over training.

        Returns:
            The batch with ``weights`` (float32): the
            importance-sampling weights ``(N * P(i))^-beta`` divided by their maximum over
            this batch. Alg. 1 (line 10) and sec. 3.4 normalise by ``1 / max_i w_i`` "so that
            they only scale the update downwards"; taking the max over the batch (as Alg. 1
            computes it, inside the batch loop) needs no min-priority tree and keeps the
            largest weight of every batch at exactly 1.
        """
        return self.sample_stack(1, batch_size, beta=beta).at(0)

    def sample_stack(self, count: int, batch_size: int, beta: float = 0.4) -> ReplayBatch:
        """``count`` stratified batches (as :meth:`sample` draws one) in one tree search,
        stacked on a new first axis, each with its own importance-sampling weights.

        All come from the priorities as they are now: the priorities of a round's batches are
        written back after the round (:meth:`update_priorities` once), not between its updates.

        Args:
            count: batches.
            batch_size: transitions per batch.
            beta: importance-sampling exponent in ``[0, 1]``.
        """
        if count < 1:
            raise ValueError(f"memory count must be >= 1, got {count}")
        self._check_sample(batch_size)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"memory.beta must be in [0, 1], got {beta}")
        total = self.tree.total
        segment = total / batch_size
        targets = (np.arange(batch_size) + self.rng.random((count, batch_size))) * segment
        indices = self.tree.find(np.minimum(targets.reshape(-1), np.nextafter(total, 0.0)))
        probs = (self.tree.get(indices) / total).reshape(count, batch_size)
        weights = (self.size * probs) ** -beta
        weights = (weights / weights.max(axis=1, keepdims=True)).astype(np.float32)
        return stacked(self.batch(indices), count)._replace(weights=weights)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Set ``p_i = (|td_i| + eps)^alpha`` for the sampled slots.

        Args:
            indices: the ``indices`` of a batch from :meth:`sample`.
            td_errors: the batch's TD errors (any sign), one per index.
        """
        indices = np.asarray(indices, dtype=np.int64)
        stored = self.is_stored(indices)
        if not stored.all():
            raise IndexError(f"memory indices must be filled slots, got {indices[~stored]}")
        priorities = (np.abs(np.asarray(td_errors, dtype=np.float64)) + self.eps) ** self.alpha
        self.tree.update(indices, priorities)
        if priorities.size:
            self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict[str, Any]:
        """The :class:`ReplayMemory` state plus the sum tree and the maximal priority."""
        return {
            **super().state_dict(),
            "tree": self.tree.state_dict(),
            "max_priority": self.max_priority,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Args:
            state: a :meth:`state_dict` of a memory with the same capacity, num_envs, n_steps.
        """
        super().load_state_dict(state)
        self.tree.load_state_dict(state["tree"])
        self.max_priority = float(state["max_priority"])
