"""Training diagnostics between two logged rows: means over the updates, not the last one."""

from collections.abc import Mapping

import torch
from torch import Tensor


class TrainMetrics:
    """The ``train/*`` values an algorithm reports, gathered between two metrics rows.

    :meth:`add` takes per-update values (losses, ``approx_kl``, ``clipfrac``, entropy …); a
    row logs their mean over every update since the previous row, as CleanRL and SB3 do
    (``np.mean(clipfracs)``), so curves compare with theirs and are not one minibatch's
    noise. :meth:`set` takes settings in force (learning rate, clip range, epsilon …); a row
    logs the latest. Values stay detached tensors on their device until :meth:`pop_row`,
    which reads them all with one host transfer.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, int] = {}
        self._latest: dict[str, Tensor | float] = {}
        self._settings: dict[str, float] = {}

    def add(self, values: Mapping[str, Tensor | float]) -> None:
        """Record one update's values; a tensor must hold one number.

        Args:
            values: metric key (``train/loss``) to value.
        """
        for key, value in values.items():
            if isinstance(value, Tensor):
                value = value.detach()
            self._latest[key] = value
            if key in self._sums:
                self._sums[key] = self._sums[key] + value
                self._counts[key] += 1
            else:
                self._sums[key] = value
                self._counts[key] = 1

    def set(self, values: Mapping[str, float]) -> None:
        """Record settings in force (a row logs the latest of each).

        Args:
            values: metric key (``train/lr``) to value.
        """
        self._settings.update(values)

    def __getitem__(self, key: str) -> Tensor | float:
        """The latest value recorded under ``key`` (a setting, or the last update's value)."""
        return self._settings[key] if key in self._settings else self._latest[key]

    def latest(self) -> dict[str, Tensor | float]:
        """The last update's value of every per-update key."""
        return dict(self._latest)

    def pop_row(self) -> dict[str, float]:
        """The means since the last row and the settings, as floats; the means start over.

        Settings are kept: a row logs the one in force even if it was set rows ago.
        """
        row = {key: float(value) for key, value in self._settings.items()}
        tensors = [key for key, value in self._sums.items() if isinstance(value, Tensor)]
        if tensors:
            sums = torch.stack([self._sums[key].float().reshape(()) for key in tensors])
            counts = torch.tensor([self._counts[key] for key in tensors], device=sums.device)
            row.update(zip(tensors, (sums / counts).tolist(), strict=True))  # one .item()
        for key, value in self._sums.items():
            if not isinstance(value, Tensor):
                row[key] = float(value) / self._counts[key]
        self._sums.clear()
        self._counts.clear()
        return row
