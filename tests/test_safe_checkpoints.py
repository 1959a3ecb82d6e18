"""Checkpoints and run folders lose nothing: non-finite values stop the run and keep the last
good checkpoint, a failed resume writes nothing, a full disk leaves no temporary file, every
run gets its own folder; and settings that would train nothing are refused."""

import errno
import hashlib
import json
import math
import re
from pathlib import Path

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from slm_lightning.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
NUM_ENVS, HORIZON = 4, 32
ROLLOUT = NUM_ENVS * HORIZON  # frames per PPO rollout
PPO = ["--config", str(CONFIGS / "ppo_cartpole.yaml"), "--seed_everything=0"]
PPO += [f"--model.init_args.env.num_envs={NUM_ENVS}", f"--model.init_args.time_horizon={HORIZON}"]
PPO += ["--model.init_args.training_epochs=2", "--model.init_args.num_minibatches=2"]
PPO += ["--metrics.log_frequency=512", "--checkpoint.every_n_frames=512"]
TOY_ID = "SlmTestToy-v0"
TOY = [f"--model.init_args.env.name={TOY_ID}", "--model.init_args.env.vectorization=sync"]
ERROR_LINE = re.compile(r"^\S+ ERROR +(.*)$", re.MULTILINE)
WARNING_LINE = re.compile(r"^\S+ WARNING +(.*)$", re.MULTILINE)
INFO_LINE = re.compile(r"^\S+ INFO +(.*)$", re.MULTILINE)


class ToyEnv(gym.Env):
    """Zero observations, ``reward`` per step, episodes of 10 steps.

    The copy first reset with seed ``nan_seed`` returns NaN rewards after ``nan_after`` of
    its steps; every copy raises after ``crash_after`` steps if that is set. A vector env
    reset with seed ``s`` seeds its sub-env ``i`` with ``s + i``, and the rollout resets with
    the run seed plus the frame clock, so ``nan_seed`` picks the sub-env.
    """

    def __init__(self, reward=1.0, nan_seed=None, nan_after=0, crash_after=None) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.reward, self.nan_seed, self.nan_after = reward, nan_seed, nan_after
        self.crash_after = crash_after
        self.first_seed, self.steps, self.t = None, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.first_seed is None:
            self.first_seed = seed
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.steps += 1
        self.t += 1
        if self.crash_after is not None and self.steps > self.crash_after:
            raise RuntimeError("env crashed")
        nan = self.nan_seed is not None and self.first_seed == self.nan_seed
        nan = nan and self.steps > self.nan_after
        reward = math.nan if nan else self.reward
        return np.zeros(2, np.float32), reward, self.t >= 10, False, {}


if TOY_ID not in gym.registry:
    gym.register(id=TOY_ID, entry_point=ToyEnv, disable_env_checker=True)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["slm-lab"])


def slm_lab(*args: str) -> int:
    """``slm-lab …`` in-process; its exit status (0 when it returns)."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def frames_of(path: Path) -> int:
    return load(path)["rollout"]["frames"]


def csv_frames(run: Path) -> list[float]:
    lines = (run / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("rollout/frames")
    return [float(line.split(",")[column]) for line in lines[1:]]


# --- non-finite values -------------------------------------------------------------------------


def test_nan_reward_stops_and_keeps_the_last_good_checkpoint(isolated_run, capsys) -> None:
    run = isolated_run / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={run}",
                   "--model.init_args.max_frames=512") == 0  # fmt: skip
    good = ckpt.read_bytes()
    assert frames_of(ckpt) == 512
    capsys.readouterr()
    # Resumed, the envs restart from a reset seeded 0 + 512 (+ i for sub-env i): sub-env 2's
    # reward turns NaN on its 11th step, which comes at the 12th vector step (the 11th only
    # resets the finished 10-step episodes: NEXT_STEP autoreset), frame 512 + 12 x 4 = 560,
    # before the next checkpoint (1024).
    nan = f"--model.init_args.env.kwargs={{nan_seed: {512 + 2}, nan_after: 10}}"
    code = slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={run}", "--ckpt_path=last",
                   "--model.init_args.max_frames=4096", nan)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert ERROR_LINE.findall(err) == [
        f"env {TOY_ID} (sub-env 2) returned a non-finite reward at frame 560"
    ]
    assert WARNING_LINE.findall(err) == [
        f"not saving the state at frame 560 after a non-finite value; kept {ckpt} (frame 512)"
    ]
    assert ckpt.read_bytes() == good, "the last good checkpoint was replaced"
    assert not list(run.rglob("*.tmp"))


def inf_value_loss_run(isolated_run: Path, capsys) -> list[str]:
    """PPO on the toy env with rewards of 1e19 (an inf value loss from the first update):
    the run must fail (exit 1) without a checkpoint; returns its error lines."""
    run = isolated_run / "run"
    code = slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={run}",
                   "--model.init_args.env.kwargs={reward: 1.0e19}",
                   "--model.init_args.normalize_advantages=false",
                   "--model.init_args.max_frames=512")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    assert not (run / "checkpoints" / "last.ckpt").exists()
    return ERROR_LINE.findall(err)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the explained variance
def test_non_finite_loss_names_the_term_before_the_update(isolated_run, capsys) -> None:
    """Rewards of 1e19 over 10-step episodes give returns near 1e20 whose squared error
    overflows float32: the value loss is inf, the policy loss (advantages not normalised)
    stays finite. The first update of the first rollout (step 0, frame 128) is refused."""
    assert inf_value_loss_run(isolated_run, capsys) == [
        f"PPO: train/value_loss is inf at step 0 (frame {ROLLOUT}); stopped before the "
        "optimizer step"
    ]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_on_an_accelerator_the_loss_is_read_once_per_step_and_still_stops_the_run(
    isolated_run, capsys, monkeypatch
) -> None:
    """The same inf value loss where reading a loss waits for the device (forced here on the
    CPU): the flag is read at the end of the training step, after the rollout's 4 updates,
    and the run stops there without a checkpoint. Catches a flag that is never read (the run would go
    on and finish) or read before it is set."""
    from slm_lightning.algorithms import PPO as PPOClass

    monkeypatch.setattr(PPOClass, "defer_loss_checks", property(lambda self: True))
    assert inf_value_loss_run(isolated_run, capsys) == [
        f"PPO: train/value_loss is inf in the updates before step 4 (frame {ROLLOUT}); "
        "stopped before any checkpoint of them"
    ]


class PoisonWeights(L.Callback):
    """Sets one weight to NaN once the clock passes 512 frames (before FrameCheckpoint's save)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.frames > 512:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = math.nan


def test_non_finite_weights_are_not_written(isolated_run, capsys) -> None:
    run = isolated_run / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    # The poisoned policy then samples from NaN logits: torch raises in the next rollout.
    with pytest.raises(RuntimeError, match="probability tensor contains either"):
        main(["fit", *PPO, *TOY, f"--trainer.default_root_dir={run}",
              "--model.init_args.max_frames=4096", "--checkpoint.every_n_frames=256",
              f"--trainer.callbacks+={__name__}.PoisonWeights"])  # fmt: skip
    (error,) = ERROR_LINE.findall(capsys.readouterr().err)
    # Saves at 256 and 512; poisoned at 640, the next rollout fails at its first action, and
    # the exception's checkpoint is refused.
    assert re.fullmatch(
        rf"not saving last\.ckpt at frame 640: the weights are not finite \(\S+\); "
        rf"kept {re.escape(str(ckpt))} \(frame 512\)",
        error,
    ), error
    assert frames_of(ckpt) == 512
    assert all(torch.isfinite(t).all() for t in load(ckpt)["state_dict"].values())


def test_disk_full_keeps_the_checkpoint_and_no_temporary_file(
    isolated_run, capsys, monkeypatch
) -> None:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    run = isolated_run / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={run}",
                   "--model.init_args.max_frames=512") == 0  # fmt: skip
    good = ckpt.read_bytes()
    capsys.readouterr()

    def disk_full(self, checkpoint, path, storage_options=None) -> None:
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    assert slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={run}", "--ckpt_path=last",
                   "--model.init_args.max_frames=1024") == 0  # fmt: skip
    errors = ERROR_LINE.findall(capsys.readouterr().err)
    # The periodic save at 1024 and the final one (every return is 10: no new best.ckpt):
    # training goes on, the old file stays.
    assert (
        errors
        == [
            "disk full: could not save last.ckpt at frame 1024 (No space left on device); "
            f"kept {ckpt} (frame 512)"
        ]
        * 2
    ), errors
    assert ckpt.read_bytes() == good
    assert not list(run.rglob("*.tmp"))
    assert csv_frames(run)[-1] == 1024  # the run finished


# --- a resume that fails writes nothing ---------------------------------------------------------


@pytest.fixture
def finished_run(isolated_run) -> Path:
    """A run folder of 384 frames: last.ckpt at frame 384, one metrics row (at the end)."""
    run = isolated_run / "run"
    assert slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={run}",
                   "--model.init_args.max_frames=300") == 0  # fmt: skip
    return run


@pytest.mark.parametrize(
    ("extra", "code", "line"),
    [
        (
            ["--model.init_args.env.normalize_obs=true"],
            2,
            "ckpt_path: {ckpt} was trained with env.normalize_obs=false; this config has "
            "model.init_args.env.normalize_obs=true: they must match to resume",
        ),
        (["--model.init_args.lr=-1"], 2, "model.init_args.lr: must be >= 0, got -1"),
        (
            ["--model.init_args.lr={start: 0.001, end: -0.1}"],
            2,
            "model.init_args.lr: must be >= 0, got -0.1",
        ),
        # A fault at the first step of the resumed session: no frame collected.
        (["--model.init_args.env.kwargs={crash_after: 0}"], None, None),
    ],
    ids=["normalize_obs", "negative_lr", "negative_lr_schedule", "env_crash"],
)
def test_failed_resume_leaves_the_run_as_it_was(finished_run, capsys, extra, code, line) -> None:
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    before = snapshot(finished_run.parent)
    capsys.readouterr()
    args = ["fit", *PPO, *TOY, f"--trainer.default_root_dir={finished_run}", "--ckpt_path=last",
            "--model.init_args.max_frames=2048", *extra]  # fmt: skip
    if code is None:
        with pytest.raises(RuntimeError, match="env crashed"):
            main(args)
    else:
        assert slm_lab(*args) == code
        assert ERROR_LINE.findall(capsys.readouterr().err) == [line.format(ckpt=ckpt)]
    assert snapshot(finished_run.parent) == before


def test_resume_rewrites_the_config_once_it_trains(finished_run) -> None:
    assert (
        yaml.safe_load((finished_run / "config.yaml").read_text())["model"]["init_args"][
            "max_frames"
        ]
        == 300
    )
    assert slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={finished_run}",
                   "--ckpt_path=last", "--model.init_args.max_frames=512") == 0  # fmt: skip
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config["model"]["init_args"]["max_frames"] == 512
    assert (finished_run / "hparams.yaml").is_file()


def test_resume_off_a_log_boundary_logs_the_next_multiple(finished_run) -> None:
    """The first session ended at 384 frames (rows every 512: only the final row, at 384);
    resumed to 1100 frames, rows come at the first epoch ends at or past 512 and 1024, then
    at the end (1152, nine rollouts of 128)."""
    assert csv_frames(finished_run) == [384]
    assert slm_lab("fit", *PPO, *TOY, f"--trainer.default_root_dir={finished_run}",
                   "--ckpt_path=last", "--model.init_args.max_frames=1100") == 0  # fmt: skip
    assert csv_frames(finished_run) == [384, 512, 1024, 1152]


# --- run folders -------------------------------------------------------------------------------


def test_two_runs_in_the_same_second_get_two_folders(isolated_run, monkeypatch) -> None:
    monkeypatch.setattr("time.strftime", lambda fmt, *args: "2030_01_01_000000")
    for frames in (256, 512):
        assert slm_lab("fit", *PPO, *TOY, f"--model.init_args.max_frames={frames}") == 0
    runs = isolated_run / "runs" / "ppo_cartpole"
    assert sorted(p.name for p in runs.iterdir()) == ["2030_01_01_000000", "2030_01_01_000000-1"]
    for name, frames in (("2030_01_01_000000", 256), ("2030_01_01_000000-1", 512)):
        assert csv_frames(runs / name) == [frames]
        assert frames_of(runs / name / "checkpoints" / "last.ckpt") == frames
        assert json.loads((runs / name / "summary.json").read_text())["frames"] == frames


def test_best_resumes_into_a_new_folder(isolated_run, monkeypatch, capsys) -> None:
    monkeypatch.setattr("time.strftime", lambda fmt, *args: "2030_01_01_000000")
    args = ["fit", *PPO, *TOY, "--checkpoint.every_n_frames=256"]
    assert slm_lab(*args, "--model.init_args.max_frames=512") == 0
    runs = isolated_run / "runs" / "ppo_cartpole"
    first = runs / "2030_01_01_000000"
    best = first / "checkpoints" / "best.ckpt"
    best_frames = frames_of(best)
    before = snapshot(first)
    assert slm_lab(*args, "--ckpt_path=best", "--model.init_args.max_frames=1024") == 0
    assert snapshot(first) == before, "resuming from best rolled the run back in place"
    resumed = json.loads((runs / "2030_01_01_000000-1" / "summary.json").read_text())
    assert resumed["start_frames"] == best_frames and resumed["frames"] == 1024

    capsys.readouterr()
    assert slm_lab(*args, "--ckpt_path=best", f"--trainer.default_root_dir={first}") == 2
    (line,) = ERROR_LINE.findall(capsys.readouterr().err)
    assert line.startswith(f"ckpt_path=best: continuing from {best} in its own folder")
    assert snapshot(first) == before


# --- settings that would train nothing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "extra", "line"),
    [
        (
            "dqn_cartpole",
            ["--model.init_args.learning_starts=1000", "--model.init_args.max_frames=1000"],
            "model.init_args.learning_starts (1000) must be < max_frames (1000): no update "
            "would run",
        ),
        (
            "dqn_cartpole",
            ["--model.init_args.memory_size=255", "--model.init_args.max_frames=2000"],
            "model.init_args.memory_size (255) must be >= batch_size (256)",
        ),
        (
            "sac_pendulum",
            ["--model.init_args.learning_starts=5000", "--model.init_args.max_frames=2000"],
            "model.init_args.learning_starts (5000) must be < max_frames (2000): no update "
            "would run",
        ),
        (
            "crossq_pendulum",
            [
                "--model.init_args.memory_size=100",
                "--model.init_args.batch_size=128",
                "--model.init_args.max_frames=2000",
            ],
            "model.init_args.memory_size (100) must be >= batch_size (128)",
        ),
    ],
    ids=["dqn_learning_starts", "dqn_memory", "sac_learning_starts", "crossq_memory"],
)
def test_settings_that_train_nothing_are_refused(isolated_run, capsys, config, extra, line) -> None:
    assert slm_lab("fit", "--config", str(CONFIGS / f"{config}.yaml"), *extra) == 2
    assert ERROR_LINE.findall(capsys.readouterr().err) == [line]
    assert not list(isolated_run.iterdir())


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluation_needs_a_checkpoint(isolated_run, capsys, subcommand) -> None:
    assert slm_lab(subcommand, *PPO) == 2
    assert ERROR_LINE.findall(capsys.readouterr().err) == [
        f"ckpt_path: {subcommand} evaluates a trained agent; pass --ckpt_path=path/to.ckpt "
        "(or last, or best)"
    ]
    assert not list(isolated_run.iterdir())


def test_non_finite_checkpoint_is_refused(finished_run, isolated_run, capsys) -> None:
    checkpoint = load(finished_run / "checkpoints" / "last.ckpt")
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name][0] = math.nan
    bad = isolated_run / "nan.ckpt"
    torch.save(checkpoint, bad)
    before = snapshot(isolated_run)
    capsys.readouterr()
    for option in ("ckpt_path", "warm_start"):
        assert slm_lab("fit", *PPO, *TOY, f"--{option}={bad}") == 2
        assert ERROR_LINE.findall(capsys.readouterr().err) == [
            f"{option}: {bad} holds non-finite weights ({name}); use an earlier checkpoint"
        ]
    assert snapshot(isolated_run) == before
    assert not (isolated_run / "runs").exists()


def test_resume_without_memory_refills_before_updating(isolated_run, capsys) -> None:
    """DQN, 4 envs, one update per vector step from learning_starts=200: the first session
    updates at frames 200, 204, …, 400 (51 updates). Resumed from 400 without its memory, it
    updates again from frame 400 + 200 = 600 to 800: 51 more, not one at every step (100)."""
    run = isolated_run / "run"
    args = ["fit", "--config", str(CONFIGS / "dqn_cartpole.yaml"), f"--trainer.default_root_dir={run}",
            "--model.init_args.env.num_envs=4", "--model.init_args.learning_starts=200",
            "--model.init_args.batch_size=32", "--model.init_args.checkpoint_memory=false",
            "--model.init_args.training_frequency=1", "--model.init_args.updates_per_step=1"]  # fmt: skip
    assert slm_lab(*args, "--model.init_args.max_frames=400") == 0
    saved = load(run / "checkpoints" / "last.ckpt")
    first = saved["global_step"]
    assert first == 51 and saved["memory"] is None
    capsys.readouterr()
    assert slm_lab(*args, "--ckpt_path=last", "--model.init_args.max_frames=800") == 0
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == first + 51
    assert (
        "the checkpoint holds no replay memory (checkpoint_memory: false): collecting "
        "learning_starts=200 frames, to frame 600, before updating again"
    ) in INFO_LINE.findall(capsys.readouterr().err)
