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

    # Updates a key's values wait for before they are summed.
    FOLD = 256

    def __init__(self) -> None:
        # Per-update tensors wait in a list and are summed every FOLD updates and at each row,
        # so a long row keeps at most FOLD tensors per key. Seven values cost 9.6 us an
        # update this way, against 24 us stacked and added at once (2-core dev CPU, one
        # thread): on-policy classic control runs thousands of updates a second.
        self._pending: dict[str, list[Tensor]] = {}
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._float_sums: dict[str, float] = {}
        self._float_counts: dict[str, int] = {}
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
                pending = self._pending.setdefault(key, [])
                pending.append(value)
                if len(pending) >= self.FOLD:
                    self._fold(key)
            else:
                self._latest[key] = value
                self._float_sums[key] = self._float_sums.get(key, 0.0) + float(value)
                self._float_counts[key] = self._float_counts.get(key, 0) + 1

    def _fold(self, key: str) -> None:
        """Sum ``key``'s waiting values into its running sum (one op on their device)."""
        pending = self._pending[key]
        total = torch.stack(pending).float().sum()
        self._sums[key] = self._sums[key] + total if key in self._sums else total
        self._counts[key] = self._counts.get(key, 0) + len(pending)
        pending.clear()

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
        for key, pending in self._pending.items():
            if pending:
                self._fold(key)
        if self._sums:
            keys = list(self._sums)
            sums = torch.stack([self._sums[key] for key in keys]).tolist()  # one .item()
            row.update(
                {key: total / self._counts[key] for key, total in zip(keys, sums, strict=True)}
            )
        for key, total in self._float_sums.items():
            row[key] = total / self._float_counts[key]
        self._sums.clear()
        self._counts.clear()
        self._float_sums.clear()
        self._float_counts.clear()
        return row
