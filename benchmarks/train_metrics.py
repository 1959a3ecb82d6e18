"""Microseconds an update spends recording its training diagnostics.

Usage:
    uv run python benchmarks/train_metrics.py

Times ``TrainMetrics.add`` of seven scalar tensors (PPO's per-minibatch set) against keeping
the last values in a dict, on one torch thread, and prints both.
"""

import timeit

import torch

from slm_lightning.train_metrics import TrainMetrics


def main() -> None:
    torch.set_num_threads(1)
    values = {f"train/k{i}": torch.tensor(float(i)) for i in range(7)}
    n = 20_000
    metrics = TrainMetrics()
    recorded = timeit.timeit(lambda: metrics.add(values), number=n) / n
    metrics.pop_row()
    last: dict = {}
    kept = timeit.timeit(lambda: last.update({k: v.detach() for k, v in values.items()}), number=n)
    print(
        f"TrainMetrics.add of 7 tensors: {recorded * 1e6:.1f} us per update; "
        f"a dict of the last values: {kept / n * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
