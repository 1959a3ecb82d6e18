"""Add + sample throughput of the replay memories at capacity 1e6, batch 256.

Usage:
    uv run python benchmarks/memory.py

Each memory is first filled to capacity through ``load_state_dict`` (random transitions and,
for the prioritized memory, random priorities), so that sampling reads from a full 1e6-slot
memory as it would late in training; then a loop of ``add`` (one vector step of 16 envs)
plus ``sample(256)`` (plus ``update_priorities`` of the batch for the prioritized memory, as
in a training step) runs for half a second. Printed: transitions/s of each phase (written,
drawn, re-prioritised) and loop iterations/s.
"""

import time

import numpy as np

from slm_lightning.data.prioritized import PrioritizedReplay, SumTree
from slm_lightning.data.replay import ReplayMemory

CAPACITY, NUM_ENVS, BATCH, OBS_SHAPE = 1_000_000, 16, 256, (8,)  # LunarLander-sized obs
SECONDS = 0.5  # per memory, after the fill


def fill(memory: ReplayMemory, rng: np.random.Generator) -> None:
    """Make ``memory`` full without a million ``add`` calls."""
    state = memory.state_dict()
    state.update(
        obs=rng.standard_normal((CAPACITY, *OBS_SHAPE), dtype=np.float32),
        next_obs=rng.standard_normal((CAPACITY, *OBS_SHAPE), dtype=np.float32),
        actions=rng.integers(0, 4, CAPACITY),
        rewards=rng.standard_normal(CAPACITY, dtype=np.float32),
        terminated=rng.random(CAPACITY) < 0.01,
        discounts=np.full(CAPACITY, 0.99, np.float32),
        size=CAPACITY,
        cursor=0,
    )
    if isinstance(memory, PrioritizedReplay):
        tree = SumTree(CAPACITY)
        tree.update(np.arange(CAPACITY), rng.random(CAPACITY) + 0.01)
        state["tree"] = tree.state_dict()
    memory.load_state_dict(state)


def bench(memory: ReplayMemory, sample_kwargs: dict) -> dict[str, float | None]:
    """Seconds spent per phase over a loop of add + sample (+ update_priorities for PER)."""
    rng = np.random.default_rng(0)
    fill(memory, rng)
    obs = rng.standard_normal((NUM_ENVS, *OBS_SHAPE), dtype=np.float32)
    no, yes = np.zeros(NUM_ENVS, bool), np.ones(NUM_ENVS, bool)
    step = (obs, rng.integers(0, 4, NUM_ENVS), np.ones(NUM_ENVS), obs + 1, no, no, yes)
    td_errors = rng.standard_normal(BATCH)
    seconds = {"add": 0.0, "sample": 0.0, "update": 0.0}
    iterations = 0
    while sum(seconds.values()) < SECONDS:
        t0 = time.perf_counter()
        memory.add(*step)
        t1 = time.perf_counter()
        batch = memory.sample(BATCH, **sample_kwargs)
        t2 = time.perf_counter()
        seconds["add"] += t1 - t0
        seconds["sample"] += t2 - t1
        if isinstance(memory, PrioritizedReplay):  # part of every PER training step
            memory.update_priorities(batch["indices"], td_errors)
            seconds["update"] += time.perf_counter() - t2
        iterations += 1
    return {
        "add": iterations * NUM_ENVS / seconds["add"],
        "sample": iterations * BATCH / seconds["sample"],
        "update": iterations * BATCH / seconds["update"] if seconds["update"] else None,
        "loop": iterations / sum(seconds.values()),
    }


def main() -> None:
    memories = {
        "ReplayMemory": (
            ReplayMemory(CAPACITY, NUM_ENVS, OBS_SHAPE, np.float32, (), np.int64),
            {},
        ),
        "ReplayMemory n_steps=3": (
            ReplayMemory(CAPACITY, NUM_ENVS, OBS_SHAPE, np.float32, (), np.int64, n_steps=3),
            {},
        ),
        "PrioritizedReplay": (
            PrioritizedReplay(CAPACITY, NUM_ENVS, OBS_SHAPE, np.float32, (), np.int64),
            {"beta": 0.4},
        ),
    }
    print(f"capacity {CAPACITY:.0e}, {NUM_ENVS} envs per add, batch {BATCH}, obs {OBS_SHAPE}")
    print("transitions/s per phase; loop = add + sample (+ update_priorities) iterations/s")
    print("| memory | add | sample | update_priorities | loop |")
    print("|---|---|---|---|---|")
    for name, (memory, kwargs) in memories.items():
        r = bench(memory, kwargs)
        update = "-" if r["update"] is None else f"{r['update']:,.0f}"
        print(f"| {name} | {r['add']:,.0f} | {r['sample']:,.0f} | {update} | {r['loop']:,.0f} |")


if __name__ == "__main__":
    main()
