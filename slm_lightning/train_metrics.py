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
        # Per-update values, summed per set of keys an update reports: one stacked tensor
        # and one add per update, however many keys (a few kernel launches on a GPU,
        # where the small policies of classic control are launch-bound).
        self._sums: dict[tuple[str, ...], Tensor] = {}
        self._counts: dict[tuple[str, ...], int] = {}
        self._float_sums: dict[str, float] = {}
        self._float_counts: dict[str, int] = {}
        self._latest: dict[str, Tensor | float] = {}
        self._settings: dict[str, float] = {}

    def add(self, values: Mapping[str, Tensor | float]) -> None:
        """Record one update's values; a tensor must hold one number.

        Args:
            values: metric key (``train/loss``) to value.
        """
        keys = tuple(key for key, value in values.items() if isinstance(value, Tensor))
        for key, value in values.items():
            if isinstance(value, Tensor):
                self._latest[key] = value.detach()
            else:
                self._latest[key] = value
                self._float_sums[key] = self._float_sums.get(key, 0.0) + float(value)
                self._float_counts[key] = self._float_counts.get(key, 0) + 1
        if not keys:
            return
        stacked = torch.stack([values[key].detach().float().reshape(()) for key in keys])
        if keys in self._sums:
            self._sums[keys] += stacked
            self._counts[keys] += 1
        else:
            self._sums[keys] = stacked
            self._counts[keys] = 1

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
        totals: dict[str, float] = dict(self._float_sums)
        counts: dict[str, int] = dict(self._float_counts)
        if self._sums:
            # One host transfer for the whole row.
            flat = torch.cat(list(self._sums.values())).tolist()
            offset = 0
            for keys, count in self._counts.items():
                for key, value in zip(keys, flat[offset : offset + len(keys)], strict=True):
                    totals[key] = totals.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + count
                offset += len(keys)
        row.update({key: totals[key] / counts[key] for key in totals})
        self._sums.clear()
        self._counts.clear()
        self._float_sums.clear()
        self._float_counts.clear()
        return row
