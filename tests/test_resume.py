"""A fit's run folder, the checkpoint round trip, and ``--ckpt_path`` resumes on the frame clock."""

import contextlib
import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from slm_lightning import cli as cli_module
from slm_lightning.algorithms import PPO

CONFIG = Path(__file__).parents[1] / "configs" / "ppo_cartpole.yaml"
NUM_ENVS, HORIZON = 4, 32
ROLLOUT = NUM_ENVS * HORIZON  # frames per rollout (one Lightning epoch)
N = 2000  # not a multiple of ROLLOUT: the last rollout overshoots the budget
SMALL = [
    f"--model.init_args.env.num_envs={NUM_ENVS}",
    f"--model.init_args.time_horizon={HORIZON}",
    "--model.init_args.training_epochs=2",
    "--model.init_args.num_minibatches=2",
    "--metrics.log_frequency=512",
]


def fit(run_dir: Path, *extra: str):
    """``slm-lab fit`` in-process through ``main``; returns the CLI object (trained model)."""
    made = []

    class Recording(cli_module.SLMLabCLI):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_module, "SLMLabCLI", Recording)
        mp.setattr("sys.argv", ["slm-lab"])
        cli_module.main(
            [
                "fit",
                "--config",
                str(CONFIG),
                f"--trainer.default_root_dir={run_dir}",
                *SMALL,
                *extra,
            ]
        )
    return made[0]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One short PPO fit of N frames, shared by this module's tests (which only read it)."""
    root = tmp_path_factory.mktemp("first")
    with contextlib.chdir(root):
        cli = fit(root / "run", f"--model.init_args.max_frames={N}")
    return cli, root / "run"


@pytest.fixture(scope="module")
def resumed(first, tmp_path_factory):
    """The first run resumed into another folder with the budget raised to 2N (in total)."""
    _, first_dir = first
    before = digest(first_dir / "checkpoints" / "last.ckpt")
    root = tmp_path_factory.mktemp("resumed")
    with contextlib.chdir(root):
        fit(
            root / "run",
            f"--ckpt_path={first_dir / 'checkpoints' / 'last.ckpt'}",
            f"--model.init_args.max_frames={2 * N}",
        )
    assert digest(first_dir / "checkpoints" / "last.ckpt") == before, "resume overwrote its source"
    return root / "run"


def test_fit_writes_run_folder(first) -> None:
    _, run = first
    for name in ["config.yaml", "metrics.csv", "summary.json", "run.json", "checkpoints/last.ckpt"]:
        assert (run / name).is_file(), name
    assert (run / "returns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "slm_lightning.algorithms.PPO"
    assert config["model"]["init_args"]["max_frames"] == N
    assert config["model"]["init_args"]["env"]["num_envs"] == NUM_ENVS

    run_info = json.loads((run / "run.json").read_text())
    assert "git_sha" in run_info and isinstance(run_info["git_sha"], str) and run_info["git_sha"]
    assert run_info["algorithm"] == "PPO" and run_info["env"] == "CartPole-v1"

    s = summary(run)
    assert s["algorithm"] == "PPO" and s["env"] == "CartPole-v1"
    assert N <= s["frames"] < N + ROLLOUT
    assert s["frames"] % ROLLOUT == 0
    assert s["start_frames"] == 0
    assert s["episodes"] > 0
    assert 8 <= s["return_ma"] <= 500  # CartPole returns

    rows = metrics_rows(run)
    assert [r["rollout/frames"] for r in rows] == sorted(r["rollout/frames"] for r in rows)
    assert rows[-1]["rollout/frames"] == s["frames"]
    assert rows[-1]["rollout/episodes"] == s["episodes"]
    assert rows[-1]["episode/return_ma"] == pytest.approx(s["return_ma"], abs=1e-3)
    assert len(rows) >= N // 512


def test_checkpoint_round_trip(first) -> None:
    cli, run = first
    trained = cli.model
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = load(ckpt_path)

    state = trained.state_dict()
    assert set(ckpt["state_dict"]) == set(state)
    for key, tensor in state.items():
        assert torch.equal(ckpt["state_dict"][key], tensor), key

    # Optimizer state: Adam's moments and step counts equal the trained optimizer's.
    optimizer = cli.trainer.optimizers[0].state_dict()
    saved = ckpt["optimizer_states"][0]
    assert saved["param_groups"] == optimizer["param_groups"]
    assert set(saved["state"]) == set(optimizer["state"])
    for index, param_state in optimizer["state"].items():
        for name, value in param_state.items():
            assert torch.equal(saved["state"][index][name], value), (index, name)
    # The frame clock travels with the checkpoint.
    (rollout_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert rollout_state["frames"] == summary(run)["frames"] == trained.frames

    loaded = PPO.load_from_checkpoint(ckpt_path, weights_only=False, map_location="cpu")
    assert loaded.max_frames == N and loaded.env_spec.num_envs == NUM_ENVS
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key

    generator = torch.Generator().manual_seed(123)
    obs = torch.randn(256, 4, generator=generator) * torch.tensor([1.0, 1.0, 0.1, 1.0])
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        dist_a, value_a = trained.policy(obs)
        dist_b, value_b = loaded.policy(obs)
    greedy = trained.policy.greedy(dist_a)
    assert torch.equal(greedy, loaded.policy.greedy(dist_b))
    assert torch.equal(value_a, value_b)
    assert 0 < greedy.float().mean() < 1, "a trained CartPole policy uses both actions"


def test_resume_continues_to_a_total_budget(first, resumed) -> None:
    _, first_dir = first
    s1, s2 = summary(first_dir), summary(resumed)
    ckpt1, ckpt2 = (
        load(first_dir / "checkpoints" / "last.ckpt"),
        load(resumed / "checkpoints" / "last.ckpt"),
    )

    # The budget is total: 2N frames, not N more than the first run's.
    assert 2 * N <= s2["frames"] < 2 * N + ROLLOUT
    assert s2["start_frames"] == s1["frames"]
    assert s2["episodes"] > s1["episodes"]

    # The resumed run's log continues the first run's clock, episode count and global step.
    first_row = metrics_rows(resumed)[0]
    final_row = metrics_rows(first_dir)[-1]
    assert first_row["rollout/frames"] > N
    assert first_row["rollout/frames"] > final_row["rollout/frames"]
    assert first_row["rollout/updates"] > final_row["rollout/updates"]
    assert first_row["rollout/episodes"] >= final_row["rollout/episodes"]

    # Global step and Adam's step counts continue: one update per minibatch of every new rollout.
    updates_per_rollout = 2 * 2  # training_epochs x num_minibatches
    new_rollouts = (s2["frames"] - s1["frames"]) // ROLLOUT
    assert ckpt2["global_step"] == ckpt1["global_step"] + new_rollouts * updates_per_rollout
    steps1 = {float(s["step"]) for s in ckpt1["optimizer_states"][0]["state"].values()}
    steps2 = {float(s["step"]) for s in ckpt2["optimizer_states"][0]["state"].values()}
    assert steps1 == {float(ckpt1["global_step"])}
    assert steps2 == {float(ckpt2["global_step"])}

    # Episode history and the return moving average carry over.
    tracker1, tracker2 = ckpt1["callbacks"]["MetricsTracker"], ckpt2["callbacks"]["MetricsTracker"]
    n1 = len(tracker1["history"]["returns"])
    assert tracker2["history"]["returns"][:n1] == tracker1["history"]["returns"]
    assert tracker2["history"]["frames"][:n1] == tracker1["history"]["frames"]
    assert tracker2["episodes"] == s2["episodes"] == len(tracker2["history"]["returns"])
    rollouts1 = ckpt1["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["rollouts"]
    rollouts2 = ckpt2["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["rollouts"]
    assert rollouts2 == rollouts1 + new_rollouts

    # And it trained: parameters moved on from the checkpoint it started from.
    assert any(not torch.equal(ckpt1["state_dict"][k], v) for k, v in ckpt2["state_dict"].items())


def test_resume_with_spent_budget_trains_nothing(first, tmp_path) -> None:
    _, first_dir = first
    s1 = summary(first_dir)
    ckpt1 = load(first_dir / "checkpoints" / "last.ckpt")
    cli = fit(
        tmp_path / "again",
        f"--ckpt_path={first_dir / 'checkpoints' / 'last.ckpt'}",
        f"--model.init_args.max_frames={N}",
    )
    s3 = summary(tmp_path / "again")
    assert s3["frames"] == s3["start_frames"] == s1["frames"]
    assert s3["episodes"] == s1["episodes"]
    assert cli.trainer.global_step == ckpt1["global_step"]
    for key, tensor in cli.model.state_dict().items():
        assert torch.equal(ckpt1["state_dict"][key], tensor), key
