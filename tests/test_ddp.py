"""DDP on two CPU ranks (gloo): the ``slm-lab`` command as users run it, one process per rank.

Each rank reports through :class:`RankReport`, a test-only callback added on the command line
(``--trainer.callbacks+=tests.test_ddp.RankReport``): its parameter hash, env seed, RNG
state, local frames and local episodes. The run must end with equal parameters, distinct
seeds and sampling streams, a frame clock that sums both ranks, all ranks' episodes in the
metrics, and one writer.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).parents[1]
TIMEOUT_S = 150  # a hung collective must fail the test, not the suite


def tensor_hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankReport(Callback):
    """Writes ``$SLM_TEST_RANK_DIR/rank<N>.json`` at the end of fit (test only).

    Args:
        out: where to write; None reads ``SLM_TEST_RANK_DIR``.
    """

    def __init__(self, out: str | None = None) -> None:
        self.out = Path(out or os.environ["SLM_TEST_RANK_DIR"])
        self.local_episodes = 0
        self.rng_hash = ""

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # The rollout exists (train_dataloader ran): count the episodes this rank's envs finish
        # before MetricsTracker drains and gathers them.
        episodes = pl_module.rollout.episodes
        drain = episodes.drain

        def counting_drain() -> tuple[list[int], list[float], list[int]]:
            out = drain()
            self.local_episodes += len(out[1])
            return out

        episodes.drain = counting_drain
        self.rng_hash = tensor_hash([torch.get_rng_state()])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        rollout = pl_module.rollout
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "params": tensor_hash([p for p in pl_module.parameters()]),
            "env_seed": pl_module.env_seed(),
            "rng_hash": self.rng_hash,
            "frames": pl_module.frames,
            "local_frames": getattr(rollout, "rollouts", 0)
            * getattr(rollout, "time_horizon", 0)
            * rollout.env.num_envs,
            "local_episodes": self.local_episodes,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class FailOnRank(Callback):
    """Raises RuntimeError on one rank alone at the end of a rollout cycle (test only).

    Args:
        rank: the failing rank.
        epoch: the cycle (1-based) at whose end it fails.
    """

    def __init__(self, rank: int = 1, epoch: int = 2) -> None:
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch + 1 >= self.epoch:
            raise RuntimeError(f"rank {self.rank} failed")


def run_slm_lab(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``slm-lab`` in its own process group; kill the whole group if it hangs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "slm_lightning.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank processes ignore SIGTERM mid-collective
        out, _ = proc.communicate()
        pytest.fail(f"DDP run hung for {TIMEOUT_S} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


# (config, budget): on-policy PPO, 2 ranks x 64 envs x 16 steps = 2048 frames per rollout, and
# off-policy DQN (each rank its own replay memory), 2 ranks x 12 envs x 2 steps = 48 frames
# per round of updates, past its learning_starts of 1000 so that gradients flow.
# PPO with target_kl=0 stops every rollout's update early, on both ranks at once (they decide
# on the mean KL).
CASES = [
    ("ppo_cartpole", 6144, []),
    ("dqn_cartpole", 3072, []),
    ("ppo_cartpole", 6144, ["--model.init_args.target_kl=0.0"]),
]
IDS = ["ppo_cartpole", "dqn_cartpole", "ppo_cartpole_target_kl"]


@pytest.mark.parametrize(("config_name", "budget", "extra"), CASES, ids=IDS)
def test_ddp_two_cpu_ranks(tmp_path: Path, config_name: str, budget: int, extra: list) -> None:
    ranks = tmp_path / "ranks"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "SLM_TEST_RANK_DIR": str(ranks),
    }
    env.pop("SLM_RUN_STAMP", None)
    result = run_slm_lab(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / f"{config_name}.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            f"--model.init_args.max_frames={budget}",
            "--metrics.log_frequency=2048",
            "--checkpoint.every_n_frames=2048",
            "--trainer.callbacks+=tests.test_ddp.RankReport",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:]

    reports = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    r0, r1 = reports
    assert r0["world_size"] == r1["world_size"] == 2
    # DDP averaged the gradients: both ranks end with the same parameters.
    assert r0["params"] == r1["params"]
    # Each rank rolled out its own envs and sampled from its own RNG stream.
    assert r0["env_seed"] != r1["env_seed"]
    assert r0["rng_hash"] != r1["rng_hash"]
    # The frame clock counts both ranks: same clock, same stopping epoch, local frames summed.
    assert r0["frames"] == r1["frames"] == budget
    assert r0["epoch"] == r1["epoch"] and r0["global_step"] == r1["global_step"]
    assert r0["global_step"] > 0
    if extra:  # target_kl=0: the first minibatch's KL is exactly 0 (nothing updated yet), the
        # second's mean is positive, so both ranks stop after 1 step per 2048-frame rollout
        assert r0["global_step"] == budget // 2048
    if config_name.startswith("ppo"):  # whole rollouts: each rank stepped half the frames
        assert r0["local_frames"] + r1["local_frames"] == budget

    # One writer: one run folder (the ranks agreed on its timestamp), one of each file.
    run_dirs = list((tmp_path / "runs" / config_name).iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1
    assert len(list(tmp_path.rglob("summary.json"))) == 1
    assert result.stdout.count("summary: ") == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frames"] == budget
    # The metrics hold every rank's episodes, gathered before logging.
    assert summary["episodes"] == r0["local_episodes"] + r1["local_episodes"]
    assert r0["local_episodes"] > 0 and r1["local_episodes"] > 0
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("rollout/episodes")]) == summary["episodes"]
    assert float(last[header.index("rollout/frames")]) == budget
    # The checkpoint is rank 0's at the end of training, resumable by a single process.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == r0["global_step"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert str(config["trainer"]["devices"]) == "2"


def test_a_rank_failing_alone_stops_every_rank(tmp_path: Path) -> None:
    """Rank 1 raises while rank 0 trains on: its on_exception hooks run no collective (which
    rank 0 would never join), so it exits; rank 0's next collective then fails, and rank 0
    saves a resumable checkpoint on its way out (without waiting for rank 1)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("SLM_RUN_STAMP", None)
    run = tmp_path / "run"
    result = run_slm_lab(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "ppo_cartpole.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            f"--trainer.default_root_dir={run}",
            "--model.init_args.max_frames=100000000",
            "--model.init_args.env.num_envs=8",
            "--trainer.callbacks+=tests.test_ddp.FailOnRank",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "rank 1 failed" in result.stdout, result.stdout[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    state = checkpoint["rollout"]
    assert state["frames"] >= 2 * 2 * 8 * 16  # two rollout cycles of both ranks
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
