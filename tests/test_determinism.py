"""Same seed, same run; another seed, another run (PPO on CartPole, ~4k frames)."""

import csv
from pathlib import Path

import pytest
import torch

from slm_lightning.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "ppo_cartpole.yaml"
FRAMES = 4096
LOGGED = [
    "rollout/frames",
    "rollout/episodes",
    "rollout/updates",
    "episode/return",
    "episode/return_ma",
]


def fit(run_dir: Path, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """A short fit; returns the last checkpoint's parameters and the rows of metrics.csv."""
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--seed_everything={seed}",
            f"--trainer.default_root_dir={run_dir}",
            f"--model.init_args.max_frames={FRAMES}",
            "--model.init_args.env.num_envs=8",
            "--model.init_args.time_horizon=32",
            "--metrics.log_frequency=512",
        ]
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return ckpt["state_dict"], rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("determinism")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr("sys.argv", ["slm-lab"])
        return {
            "a": fit(root / "seed0_a", 0),
            "b": fit(root / "seed0_b", 0),
            "other": fit(root / "seed1", 1),
        }


def test_same_seed_same_parameters_and_returns(runs) -> None:
    (params_a, rows_a), (params_b, rows_b) = runs["a"], runs["b"]
    assert set(params_a) == set(params_b)
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), f"{key} differs between same-seed runs"

    assert len(rows_a) == len(rows_b) >= FRAMES // 512
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for key in [*LOGGED, "train/loss", "train/entropy"]:
            assert row_a[key] == row_b[key], (key, row_a["rollout/frames"])
    assert float(rows_a[-1]["rollout/episodes"]) > 0


def test_other_seed_different_run(runs) -> None:
    (params_a, rows_a), (params_other, rows_other) = runs["a"], runs["other"]
    differing = [k for k in params_a if not torch.equal(params_a[k], params_other[k])]
    # Every weight matrix differs (initialisation and experience both depend on the seed).
    assert all(k in differing for k in params_a if k.endswith("weight")), differing
    returns_a = [(r["episode/return"], r["rollout/episodes"]) for r in rows_a]
    returns_other = [(r["episode/return"], r["rollout/episodes"]) for r in rows_other]
    assert returns_a != returns_other
