"""Add + sample throughput of the replay memories at capacity 1e6, batch 256.

Usage:
    uv run python benchmarks/memory.py

Each memory is first filled to capacity through ``load_state_dict`` (random transitions and,
for the prioritized memory, random priorities), so that sampling reads from a full 1e6-slot
memory as it would late in training; then a loop of ``add`` (one vector step of 16 envs)
plus ``sample(256)`` (plus ``update_priorities`` of the batch for the prioritized memory, as
in a training step) runs for half a second. Printed: transitions/s of each phase (written,
drawn, re-prioritised) and loop iterations/s.

A second table does the same for Atari observations, uint8 stacks of 4 84x84 frames from 16
envs, at batch 32: the naive ReplayMemory (at a small capacity, its 1e6 would need 56 GB)
against FrameReplay, which stores each frame once, and its prioritized variant, all filled
by ``add`` with a stream that shifts each stack by one new frame and ends episodes now and
then. Then the memory footprint: bytes per transition of each memory's arrays at capacity
1e6 (numpy allocates lazily, so nothing is touched; the naive memory's from capacity 1e4,
as 1e6 cannot even be allocated) and, measured, the growth of the
process's resident memory while a FrameReplay of ``ATARI_FILL`` transitions fills up.
"""

import os
import time

import numpy as np

from slm_lightning.data.frame_replay import FrameReplay, PrioritizedFrameReplay
from slm_lightning.data.prioritized import PrioritizedReplay, SumTree
from slm_lightning.data.replay import ReplayLayout, ReplayMemory

CAPACITY, NUM_ENVS, BATCH, OBS_SHAPE = 1_000_000, 16, 256, (8,)  # LunarLander-sized obs
SECONDS = 0.5  # per memory, after the fill
ATARI_SHAPE, ATARI_BATCH, ATARI_FILL = (4, 84, 84), 32, 100_000


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


class AtariLikeStream:
    """Stacks of 4 frames from ``NUM_ENVS`` envs, as ale-py's vector env returns them: each
    step shifts a stack by one frame; an episode ends with probability 1/1000 per step, after
    which comes the (unstored) autoreset step to a zero-padded reset stack."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.pool = rng.integers(0, 256, (256, *ATARI_SHAPE[1:]), dtype=np.uint8)
        self.obs = np.zeros((NUM_ENVS, *ATARI_SHAPE), np.uint8)
        self.obs[:, -1] = self.pool[:NUM_ENVS]
        self.done = np.zeros(NUM_ENVS, bool)

    def step(self) -> tuple[np.ndarray, ...]:
        obs, rng = self.obs, self.rng
        next_obs = np.empty_like(obs)
        next_obs[:, :-1] = obs[:, 1:]
        next_obs[:, -1] = self.pool[rng.integers(0, len(self.pool), NUM_ENVS)]
        next_obs[self.done, :-1] = 0  # reset stacks
        valid = ~self.done
        terminated = valid & (rng.random(NUM_ENVS) < 1e-3)
        no = np.zeros(NUM_ENVS, bool)
        self.obs, self.done = next_obs, terminated
        return obs, rng.integers(0, 6, NUM_ENVS), np.ones(NUM_ENVS), next_obs, terminated, no, valid


def bench_atari(memory: ReplayMemory, fill: int) -> dict[str, float | None]:
    """As :func:`bench` with Atari stacks at batch 32, filled with ``fill`` transitions."""
    rng = np.random.default_rng(0)
    stream = AtariLikeStream(rng)
    while len(memory) < fill:
        memory.add(*stream.step())
    steps = [stream.step() for _ in range(64)]  # the stream's own cost stays out of the timing
    td_errors = rng.standard_normal(ATARI_BATCH)
    seconds = {"add": 0.0, "sample": 0.0, "update": 0.0}
    iterations = 0
    while sum(seconds.values()) < SECONDS:
        t0 = time.perf_counter()
        memory.add(*steps[iterations % len(steps)])
        t1 = time.perf_counter()
        batch = memory.sample(ATARI_BATCH)
        t2 = time.perf_counter()
        seconds["add"] += t1 - t0
        seconds["sample"] += t2 - t1
        if isinstance(memory, PrioritizedReplay):
            memory.update_priorities(batch["indices"], td_errors)
            seconds["update"] += time.perf_counter() - t2
        iterations += 1
    return {
        "add": iterations * NUM_ENVS / seconds["add"],
        "sample": iterations * ATARI_BATCH / seconds["sample"],
        "update": iterations * ATARI_BATCH / seconds["update"] if seconds["update"] else None,
        "loop": iterations / sum(seconds.values()),
    }


def array_bytes(memory: ReplayMemory) -> int:
    """Bytes of every numpy array the memory holds (storage, pending windows, sum tree)."""
    arrays = [a for a in vars(memory).values() if isinstance(a, np.ndarray)]
    if isinstance(memory, PrioritizedReplay):
        arrays.append(memory.tree.tree)
    return sum(a.nbytes for a in arrays)


def resident_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def print_table(rows: dict[str, dict[str, float | None]]) -> None:
    print("| memory | add | sample | update_priorities | loop |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        update = "-" if r["update"] is None else f"{r['update']:,.0f}"
        print(f"| {name} | {r['add']:,.0f} | {r['sample']:,.0f} | {update} | {r['loop']:,.0f} |")


def main() -> None:
    memories = {
        "ReplayMemory": (
            ReplayMemory(ReplayLayout(CAPACITY, NUM_ENVS, OBS_SHAPE, np.float32, (), np.int64)),
            {},
        ),
        "ReplayMemory n_steps=3": (
            ReplayMemory(
                ReplayLayout(CAPACITY, NUM_ENVS, OBS_SHAPE, np.float32, (), np.int64, n_steps=3)
            ),
            {},
        ),
        "PrioritizedReplay": (
            PrioritizedReplay(
                ReplayLayout(CAPACITY, NUM_ENVS, OBS_SHAPE, np.float32, (), np.int64)
            ),
            {"beta": 0.4},
        ),
    }
    print(f"capacity {CAPACITY:.0e}, {NUM_ENVS} envs per add, batch {BATCH}, obs {OBS_SHAPE}")
    print("transitions/s per phase; loop = add + sample (+ update_priorities) iterations/s")
    print_table({name: bench(memory, kwargs) for name, (memory, kwargs) in memories.items()})
    del memories

    def atari(capacity: int) -> ReplayLayout:
        return ReplayLayout(capacity, NUM_ENVS, ATARI_SHAPE, np.uint8, (), np.int64)

    print(f"\nAtari: {NUM_ENVS} envs per add, batch {ATARI_BATCH}, obs {ATARI_SHAPE} uint8")
    rows = {}
    for name, make, fill in [
        ("ReplayMemory (capacity 1e4)", lambda: ReplayMemory(atari(10_000)), 10_000),
        ("FrameReplay (capacity 1e5)", lambda: FrameReplay(atari(ATARI_FILL)), ATARI_FILL),
        ("PrioritizedFrameReplay (1e5)", lambda: PrioritizedFrameReplay(atari(ATARI_FILL)), 0),
    ]:
        before = resident_bytes()
        memory = make()
        rows[name] = bench_atari(memory, fill or ATARI_FILL)
        if isinstance(memory, FrameReplay) and fill:
            grown = resident_bytes() - before
        del memory
    print_table(rows)

    print("\nAtari memory footprint, bytes per transition (all arrays, frame store included)")
    print("| memory | bytes/transition | 1e6 transitions |")
    print("|---|---|---|")
    for name, capacity, make in [  # 1e6 naive stacks do not even fit the address space here
        ("ReplayMemory (from capacity 1e4)", 10_000, ReplayMemory),
        ("FrameReplay", 1_000_000, FrameReplay),
        ("PrioritizedFrameReplay", 1_000_000, PrioritizedFrameReplay),
    ]:
        memory = make(atari(capacity))
        per = array_bytes(memory) / capacity
        print(f"| {name} | {per:,.0f} | {per * 1e6 / 1e9:.2f} GB |")
        del memory
    print(
        f"| FrameReplay, measured: resident growth while filling {ATARI_FILL:.0e} "
        f"| {grown / ATARI_FILL:,.0f} | {grown / ATARI_FILL * 1e6 / 1e9:.2f} GB (projected) |"
    )


if __name__ == "__main__":
    main()
