"""benchmarks/update_cost.py: the bare update's time, its matrix products, and the ceilings."""

import pytest
import torch

from benchmarks import update_cost
from benchmarks.update_cost import CASES, Case, matmul_ms, measure


def test_matmul_time_counts_the_matrix_products_only() -> None:
    """Elementwise ops have no matmul time; ``mm``, ``addmm`` and ``bmm`` each count, about
    alike. Catches counting every op, none, or only one kind of product."""
    a, b, c = torch.randn(192, 192), torch.randn(192, 192), torch.randn(192)
    assert matmul_ms(lambda: (a * b).exp().sum(), calls=20) == 0.0
    one = matmul_ms(lambda: torch.mm(a, b).exp(), calls=30)
    three = matmul_ms(
        lambda: (torch.mm(a, b), torch.addmm(c, a, b), torch.bmm(a[None], b[None])), calls=30
    )
    assert one > 0.0
    assert 2.0 < three / one < 4.5


def test_ceilings_are_the_frames_one_update_time_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 0.25 updates per frame, 2 ms per update caps 2000 fps and 0.5 ms of products 8000."""
    monkeypatch.setattr(update_cost, "update_ms", lambda step: 2.0)
    monkeypatch.setattr(update_cost, "matmul_ms", lambda step: 0.5)
    row = measure(Case("x", lambda: lambda: None, 0.25))
    assert row == {
        "update_ms": 2.0,
        "matmul_ms": 0.5,
        "eager_fps": 2000.0,
        "arithmetic_fps": 8000.0,
    }


def test_wider_nets_spend_more_time_in_matrix_products() -> None:
    """SAC at [256, 256] multiplies ~16x more than at [64, 64]: catches a case that ignores
    its widths. Every case's update runs."""
    for case in CASES.values():
        case.build()()
    narrow = matmul_ms(CASES["sac_pendulum_64"].build(), calls=10)
    wide = matmul_ms(CASES["sac_pendulum_256"].build(), calls=10)
    assert wide > 4 * narrow > 0.0
