"""A fit's run folder, the checkpoint round trip, and ``--ckpt_path`` resumes on the frame clock."""

import contextlib
import copy
import hashlib
import json
import random
from pathlib import Path

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from slm_lightning import cli as cli_module
from slm_lightning.algorithms import PPO
from slm_lightning.callbacks import MetricsTracker
from slm_lightning.checkpoints import saved_memory_state
from slm_lightning.data.replay import ReplayMemory
from tests.cli_helpers import FitRun, fit_in, read_metrics

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


def fit(run_dir: Path, *extra: str) -> FitRun:
    """``slm-lab fit`` of the PPO CartPole config with ``SMALL`` in-process, in ``run_dir``."""
    return fit_in(run_dir, *SMALL, *extra, config=CONFIG)


# Where a checkpoint keeps the tracker's state (the default window of 100 episodes).
TRACKER_KEY = MetricsTracker().state_key


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One short PPO fit of N frames, shared by this module's tests (which only read it)."""
    root = tmp_path_factory.mktemp("first")
    with contextlib.chdir(root):
        cli = fit(root / "run", f"--model.init_args.max_frames={N}").cli
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

    # Every finished episode, in order, with the frame clock at its end.
    history = load(run / "checkpoints" / "last.ckpt")["callbacks"][TRACKER_KEY]["history"]
    returns, ends = history["returns"], history["frames"]
    assert len(returns) == s["episodes"]
    assert ends == sorted(ends) and ends[-1] <= s["frames"]
    # A CartPole return is the episode's length; each step of a sub-env is one frame, and so is
    # the NEXT_STEP reset after each episode: no episode is counted twice or runs into the next.
    assert all(r == int(r) and 8 <= r <= 500 for r in returns)
    assert sum(returns) + len(returns) <= s["frames"]
    # The moving average is the mean of the last 100 (window) returns.
    assert s["return_ma"] == pytest.approx(np.mean(returns[-100:]), abs=1e-3)

    rows = read_metrics(run)
    assert [r["rollout/frames"] for r in rows] == sorted(r["rollout/frames"] for r in rows)
    assert rows[-1]["rollout/frames"] == s["frames"]
    assert len(rows) >= N // 512
    for row in rows:  # each row's episode figures are those of the episodes finished by then
        done = [r for r, end in zip(returns, ends, strict=True) if end <= row["rollout/frames"]]
        assert row["rollout/episodes"] == len(done)
        if done:
            assert row["episode/return"] == done[-1]
            assert row["episode/return_ma"] == pytest.approx(np.mean(done[-100:]))


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
    rollout_state = ckpt["rollout"]
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
    first_row = read_metrics(resumed)[0]
    final_row = read_metrics(first_dir)[-1]
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
    tracker1, tracker2 = ckpt1["callbacks"][TRACKER_KEY], ckpt2["callbacks"][TRACKER_KEY]
    n1 = len(tracker1["history"]["returns"])
    assert tracker2["history"]["returns"][:n1] == tracker1["history"]["returns"]
    assert tracker2["history"]["frames"][:n1] == tracker1["history"]["frames"]
    assert tracker2["episodes"] == s2["episodes"] == len(tracker2["history"]["returns"])
    rollouts1 = ckpt1["rollout"]["rollouts"]
    rollouts2 = ckpt2["rollout"]["rollouts"]
    assert rollouts2 == rollouts1 + new_rollouts

    # And it trained: parameters moved on from the checkpoint it started from.
    assert any(not torch.equal(ckpt1["state_dict"][k], v) for k, v in ckpt2["state_dict"].items())


def test_resume_with_spent_budget_trains_nothing(first, tmp_path) -> None:
    _, first_dir = first
    s1 = summary(first_dir)
    ckpt1 = load(first_dir / "checkpoints" / "last.ckpt")
    again = fit(
        tmp_path / "again",
        f"--ckpt_path={first_dir / 'checkpoints' / 'last.ckpt'}",
        f"--model.init_args.max_frames={N}",
    )
    cli, s3 = again.cli, again.summary
    assert s3["frames"] == s3["start_frames"] == s1["frames"]
    assert s3["episodes"] == s1["episodes"]
    assert cli.trainer.global_step == ckpt1["global_step"]
    for key, tensor in cli.model.state_dict().items():
        assert torch.equal(ckpt1["state_dict"][key], tensor), key


# --- --ckpt_path last, SIGTERM, an exception mid-fit, and what a resume restores -----------------


def test_ckpt_path_last_starts_then_continues_the_run_in_its_folder(isolated_run) -> None:
    # No checkpoint yet: "last" starts a new run (one command for a preemptible job).
    fit_default = ["--config", str(CONFIG), *SMALL, "--ckpt_path=last"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["slm-lab"])
        cli_module.main(["fit", *fit_default, f"--model.init_args.max_frames={N}"])
        (run,) = (isolated_run / "runs" / "ppo_cartpole").iterdir()
        rows1 = read_metrics(run)
        cli_module.main(["fit", *fit_default, f"--model.init_args.max_frames={2 * N}"])
    assert list((isolated_run / "runs" / "ppo_cartpole").iterdir()) == [run], "a new run folder"
    s = summary(run)
    assert s["start_frames"] == rows1[-1]["rollout/frames"] and s["frames"] >= 2 * N
    rows = read_metrics(run)
    assert rows[: len(rows1)] == rows1  # the first session's rows are kept, then appended to
    frames = [r["rollout/frames"] for r in rows]
    assert frames == sorted(set(frames)) and frames[-1] == s["frames"]
    assert (
        load(run / "checkpoints" / "last.ckpt")["callbacks"][TRACKER_KEY]["episodes"]
        == (s["episodes"])
    )


def test_sigterm_saves_a_resumable_checkpoint(isolated_run) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    run = isolated_run / "run"
    cmd = [sys.executable, "-m", "slm_lightning.cli", "fit", "--config", str(CONFIG), *SMALL,
           f"--trainer.default_root_dir={run}", "--model.init_args.max_frames=100000000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").is_file():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    assert "SIGTERM" in out and "resume with --ckpt_path last" in out, out
    ckpt = load(run / "checkpoints" / "last.ckpt")
    state = ckpt["rollout"]
    frames = state["frames"]
    assert frames > 0 and frames % ROLLOUT == 0  # stopped between rollout cycles
    assert ckpt["global_step"] == state["rollouts"] * 2 * 2  # every rollout fully trained on
    assert read_metrics(run)[-1]["rollout/frames"] <= frames  # the logger was flushed

    s = fit(run, "--ckpt_path=last", f"--model.init_args.max_frames={frames + 2 * ROLLOUT}").summary
    assert s["start_frames"] == frames and s["frames"] == frames + 2 * ROLLOUT


class FailingCartPole(gym.Wrapper):
    """CartPole that raises after ``fail_after`` steps of this env copy (never when None)."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(gym.make("CartPole-v1"))
        self.fail_after, self.steps = fail_after, 0

    def step(self, action):
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise RuntimeError("env crashed")
        return self.env.step(action)


def test_exception_mid_fit_leaves_a_resumable_checkpoint(isolated_run) -> None:
    gym.register("SlmTestFailingCartPole-v0", entry_point=FailingCartPole)
    try:
        env = ["--model.init_args.env.name=SlmTestFailingCartPole-v0",
               "--model.init_args.env.vectorization=sync"]  # fmt: skip
        run = isolated_run / "run"
        with pytest.raises(RuntimeError, match="env crashed"):
            fit(run, *env, "--model.init_args.env.kwargs={fail_after: 300}",
                f"--model.init_args.max_frames={N}")  # fmt: skip
        ckpt = load(run / "checkpoints" / "last.ckpt")
        state = ckpt["rollout"]
        frames = state["frames"]  # saved at the failing step, mid-rollout
        assert frames >= 300 * NUM_ENVS and frames % ROLLOUT != 0
        rows = read_metrics(run)  # closed loggers: every logged row reached the file
        logged = [r["rollout/frames"] for r in rows]
        assert logged == [512.0 * (i + 1) for i in range(frames // 512)], logged
        assert (run / "summary.json").is_file()

        s = fit(run, *env, "--ckpt_path=last", f"--model.init_args.max_frames={4 * N}").summary
        assert s["start_frames"] == frames and 4 * N <= s["frames"] < 4 * N + ROLLOUT
    finally:
        gym.registry.pop("SlmTestFailingCartPole-v0", None)


class RestoredState(L.Callback):
    """Records what a resumed fit holds when training starts, before any new step."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.rollout = copy.deepcopy(pl_module.rollout.state_dict())
        memory = getattr(pl_module, "memory", None)
        replay = isinstance(memory, ReplayMemory)
        self.memory = copy.deepcopy(memory.state_dict()) if replay else None
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.tracker = copy.deepcopy(
            next(cb for cb in trainer.callbacks if isinstance(cb, MetricsTracker)).state_dict()
        )
        self.weights = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "lr"):
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("config", ["ppo_cartpole", "dqn_cartpole"])
def test_resume_restores_every_state_exactly(config, isolated_run) -> None:
    path = CONFIG.parent / f"{config}.yaml"
    small = [
        "--model.init_args.env.num_envs=4",
        "--metrics.log_frequency=256",
        # A schedule that ends before max_frames, so the lr of the first resumed update
        # depends on the saved frame clock and on end_frame.
        "--model.init_args.lr={start: 0.004, end: 0.0, start_frame: 0, end_frame: 3072}",
    ]
    if config == "dqn_cartpole":
        small.append("--model.init_args.learning_starts=200")
    run = isolated_run / "run"
    args = ["fit", "--config", str(path), *small, f"--trainer.default_root_dir={run}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["slm-lab"])
        cli_module.main([*args, "--model.init_args.max_frames=1024"])
        ckpt = load(run / "checkpoints" / "last.ckpt")
        probe = RestoredState()

        class Probed(cli_module.SLMLabCLI):
            def before_fit(self) -> None:
                super().before_fit()
                self.trainer.callbacks.append(probe)

        mp.setattr(cli_module, "SLMLabCLI", Probed)
        cli_module.main([*args, "--ckpt_path=last", "--model.init_args.max_frames=2048"])
    saved = ckpt["rollout"]
    torch_rng, numpy_rng, python_rng = probe.rng
    assert torch.equal(torch_rng, saved["torch_rng"])
    assert all(np.array_equal(a, b) for a, b in zip(numpy_rng, saved["numpy_rng"], strict=True))
    assert python_rng == saved["python_rng"]
    assert probe.rollout["frames"] == saved["frames"]
    for key in ("rng", "rollouts"):  # minibatch shuffling (on-policy)
        assert probe.rollout.get(key) == saved.get(key), key
    assert (saved_memory_state(ckpt) is not None) == (config == "dqn_cartpole")
    if config == "dqn_cartpole":  # replay contents, cursor and sampling generator
        for key, value in saved_memory_state(ckpt).items():
            np.testing.assert_array_equal(probe.memory[key], value, err_msg=key)
    for index, state in ckpt["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(probe.optimizer["state"][index][name], value), (index, name)
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(probe.weights[key], value), key
    tracker = ckpt["callbacks"][TRACKER_KEY]
    for key in ("recent", "episodes", "history", "best_return_ma", "next_log"):
        assert probe.tracker[key] == tracker[key], key  # the moving-average window included
    # The learning rate of the first resumed update is the schedule's value at the saved frame:
    # 0.004 * (1 - 1024 / 3072) = 0.0026667.
    assert saved["frames"] == 1024
    assert probe.lr == pytest.approx(0.004 * 2 / 3)


@pytest.mark.parametrize("greedy", [True, False])
def test_validate_prints_evaluation_returns(first, tmp_path, capsys, greedy) -> None:
    """``slm-lab validate --ckpt_path`` plays eval_episodes and prints one summary line
    whose mean lies within its min and max; the checkpoint is left untouched."""
    _, first_dir = first
    ckpt = first_dir / "checkpoints" / "last.ckpt"
    before = digest(ckpt)
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(tmp_path):
        mp.setattr("sys.argv", ["slm-lab"])
        cli_module.main(
            [
                "validate",
                "--config",
                str(CONFIG),
                f"--ckpt_path={ckpt}",
                f"--trainer.default_root_dir={tmp_path / 'eval'}",
                "--model.init_args.eval_episodes=3",
                f"--model.init_args.eval_greedy={str(greedy).lower()}",
                *SMALL,
            ]
        )
    line = next(text for text in capsys.readouterr().err.splitlines() if " eval: episodes=" in text)
    fields = dict(item.split("=") for item in line.split(" eval: ")[1].split())
    assert fields["episodes"] == "3" and fields["greedy"] == str(greedy)
    low, mean, high = (float(fields[key]) for key in ("min", "return_mean", "max"))
    assert 0 < low <= mean <= high <= 500  # CartPole returns are episode lengths
    assert float(fields["std"]) >= 0
    assert digest(ckpt) == before


def test_validate_with_a_runs_own_config_leaves_the_run_untouched(first, tmp_path, capsys) -> None:
    """A run's ``config.yaml`` names the run folder as its root and CSV logger folder:
    validating with it writes into ``<run>/evaluations/<timestamp>/``, never over the
    training run's ``metrics.csv`` and ``config.yaml``."""
    _, first_dir = first
    kept = {name: digest(first_dir / name) for name in ("metrics.csv", "config.yaml")}
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(tmp_path):
        mp.setattr("sys.argv", ["slm-lab"])
        cli_module.main(
            [
                "validate",
                "--config",
                str(first_dir / "config.yaml"),
                "--ckpt_path=last",
                "--model.init_args.eval_episodes=2",
            ]
        )
    assert " eval: episodes=2 " in capsys.readouterr().err
    assert {name: digest(first_dir / name) for name in kept} == kept
    (evaluation,) = (first_dir / "evaluations").iterdir()
    assert (evaluation / "config.yaml").is_file() and (evaluation / "metrics.csv").is_file()


def test_target_kl_stops_each_rollouts_update_early(tmp_path) -> None:
    """target_kl=0: the first minibatch (KL exactly 0, nothing updated yet) trains, the second
    one's KL is positive, so the rollout's updates end there without a step on it: one
    optimizer step per rollout instead of training_epochs x num_minibatches = 4."""
    with contextlib.chdir(tmp_path):
        cli = fit(
            tmp_path / "run", "--model.init_args.max_frames=512", "--model.init_args.target_kl=0.0"
        ).cli
    rollouts = cli.model.rollout.rollouts
    assert rollouts == 512 // ROLLOUT
    assert cli.trainer.global_step == rollouts
    assert cli.model.train_metrics["train/approx_kl"] > 0
