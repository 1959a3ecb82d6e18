"""Tracking presets: W&B offline and TensorBoard read back, early stopping, MP4 videos."""

import csv
import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import imageio_ffmpeg
import lightning as L
import numpy as np
import pytest
import torch
import wandb
import yaml
from google.protobuf.message import DecodeError
from gymnasium.wrappers import NormalizeObservation
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from slm_lightning import cli as cli_module
from slm_lightning.callbacks import (
    EarlyStopOnReturn,
    FrameCheckpoint,
    MetricsTracker,
    VideoRecorder,
)
from slm_lightning.checkpoints import checkpoint_frames
from slm_lightning.cli import main
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from tests.cli_helpers import instantiate

ROOT = Path(__file__).parents[1]
PRESETS = ROOT / "callbacks"
PPO_CARTPOLE = str(ROOT / "configs" / "ppo_cartpole.yaml")
PPO_PENDULUM = str(ROOT / "configs" / "ppo_pendulum.yaml")
# ppo_cartpole: 64 envs x 16 steps = 1024 frames per rollout.
SHORT = ["--model.init_args.max_frames=2048", "--metrics.log_frequency=1024"]


def run_folder(root: Path, config: str) -> Path:
    (folder,) = (root / "runs" / Path(config).stem).iterdir()
    return folder


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline ``run-<id>.wandb`` file.

    The file is a LevelDB-style log (wandb's ``datastore``): a 7-byte ``:W&B`` header, then
    32 KiB blocks of chunks with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) whose payloads join into serialized ``Record`` protobufs.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, payload, records = 7, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:
            break
        payload += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wait_for_records(path: Path, kinds: set[str], timeout: float = 30.0) -> list:
    """The records of ``path`` once it holds every record type in ``kinds``.

    W&B's service process writes the offline file on its own schedule: right after
    ``wandb.finish()`` returns on a busy machine it may still hold only its header, or end in
    a record not yet whole.
    """
    deadline = time.monotonic() + timeout
    size = -1
    while True:
        try:
            records = read_wandb_records(path)
        except (DecodeError, struct.error, ValueError):  # read while a record is being written
            if time.monotonic() > deadline:
                raise
            records = []
        if kinds <= {r.WhichOneof("record_type") for r in records} and path.stat().st_size == size:
            return records  # every kind there, and nothing written for the last 0.2 s
        size = path.stat().st_size
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} holds no {sorted(kinds)} records after {timeout} s")
        time.sleep(0.2)


def test_wandb_and_tensorboard_presets_log_metrics_config_and_video(isolated_run: Path) -> None:
    presets = [str(PRESETS / name) for name in ("wandb.yaml", "tensorboard.yaml", "video.yaml")]
    main(["fit", "--config", PPO_CARTPOLE, *(a for p in presets for a in ("--config", p)), *SHORT])
    wandb.finish()  # in-process: flush the offline run file, as the end of `slm-lab` does
    folder = run_folder(isolated_run, PPO_CARTPOLE)

    # metrics.csv stays in the run folder beside W&B and TensorBoard.
    with (folder / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["rollout/frames"])) for r in rows] == [1024, 2048]

    # W&B: an offline run under $WANDB_DIR named after the config, with the resolved config,
    # every metric row with frames as its step, and the video.
    (run_file,) = isolated_run.glob("wandb/offline-run-*/run-*.wandb")
    records = wait_for_records(run_file, {"run", "history"})
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "ppo_cartpole"
    assert "slm-lab" in run.tags
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model/class_path"] == "slm_lightning.algorithms.PPO"
    assert config["model/init_args/max_frames"] == 2048
    assert config["model/init_args/env/name"] == "CartPole-v1"
    assert config["metrics/log_frequency"] == 1024
    history = [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    metric_rows = [h for h in history if "rollout/frames" in h]
    assert [h["trainer/global_step"] for h in metric_rows] == [1024, 2048]
    expected = {"rollout/fps", "episode/return", "episode/return_ma", "train/loss", "train/lr"}
    assert expected <= set(metric_rows[-1])
    videos = [h for h in history if "video/train/_type" in h]
    assert len(videos) == 1 and videos[0]["trainer/global_step"] == 2048

    # TensorBoard: event files in <run>/tensorboard with our tags, stepped by frames.
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("episode/return_ma")] == [1024, 2048]
    assert (folder / "videos" / "train-frame2048-episode-0.mp4").is_file()


def test_early_stop_ends_before_max_frames_and_writes_the_run(isolated_run: Path) -> None:
    main(
        [
            "fit",
            "--config",
            PPO_CARTPOLE,
            "--config",
            str(PRESETS / "early_stop.yaml"),
            "--model.init_args.max_frames=100000",
            "--metrics.window=5",
            # A trivially reachable target: any 5 CartPole episodes average more than 1.
            "--trainer.callbacks.init_args.target_return=1",
        ]
    )
    folder = run_folder(isolated_run, PPO_CARTPOLE)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["frames"] == 1024  # the first rollout finishes > 5 episodes
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    with (folder / "metrics.csv").open() as f:
        assert [int(float(r["rollout/frames"])) for r in csv.DictReader(f)] == [1024]


def test_early_stop_without_a_target_names_the_key() -> None:
    module = SimpleNamespace(env_spec=EnvSpec(name="Pendulum-v1"))  # no reward threshold
    trainer = SimpleNamespace(callback_metrics={})  # MetricsTracker has no target to publish
    with pytest.raises(ConfigError, match="target_return"):
        EarlyStopOnReturn().target(trainer, module)
    assert EarlyStopOnReturn(target_return=-300).target(trainer, module) == -300


def test_video_mp4s_have_one_frame_per_step_plus_reset(isolated_run: Path) -> None:
    # Pendulum never terminates: every episode is truncated at max_episode_steps, so each
    # MP4 holds exactly 30 steps + the reset frame. normalize_obs exercises frozen statistics.
    cli = instantiate(
        [
            "--config",
            PPO_PENDULUM,
            "--config",
            str(PRESETS / "video.yaml"),
            "--model.init_args.max_frames=512",
            "--model.init_args.time_horizon=32",  # 8 envs x 32 = 256 frames per rollout
            "--model.init_args.training_epochs=1",
            "--model.init_args.env.max_episode_steps=30",
            "--trainer.callbacks.init_args.every_n_frames=256",
            "--trainer.callbacks.init_args.episodes=2",
        ]
    )
    cli.trainer.fit(cli.model)
    (recorder,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, VideoRecorder)]
    folder = Path(cli.trainer.log_dir) / "videos"
    names = [f"train-frame{f}-episode-{e}.mp4" for f in (256, 512) for e in (0, 1)]
    assert recorder.videos == [folder / name for name in names]  # no duplicate at the end
    for path in recorder.videos:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        assert frames == 31, path.name
    assert recorder.state_dict() == {"next_record": 768}


def test_video_env_uses_frozen_training_statistics(isolated_run: Path) -> None:
    spec = EnvSpec(name="Pendulum-v1", normalize_obs=True, max_episode_steps=5)
    saved = {"obs_rms": {"mean": np.array([1.0, 2.0, 3.0]), "var": np.full(3, 4.0), "count": 9.0}}
    module = SimpleNamespace(env_spec=spec, training_normalizers=lambda: saved)
    env = VideoRecorder()._make_env(module, isolated_run / "videos", "x")
    assert isinstance(env, NormalizeObservation) and not env.update_running_mean
    np.testing.assert_allclose(env.obs_rms.mean, [1.0, 2.0, 3.0])
    obs, _ = env.reset(seed=0)
    raw = env.unwrapped._get_obs()
    np.testing.assert_allclose(obs, (raw - [1.0, 2.0, 3.0]) / np.sqrt(4.0 + 1e-8), rtol=1e-5)
    env.step(env.action_space.sample())
    np.testing.assert_allclose(env.obs_rms.mean, [1.0, 2.0, 3.0])  # frozen
    env.close()


class _NoRender(gym.Env):
    metadata = {"render_modes": []}
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode


def test_video_warns_once_when_the_env_cannot_render(isolated_run: Path, caplog) -> None:
    gym.register("NoRender-v0", entry_point=_NoRender)
    try:
        module = SimpleNamespace(env_spec=EnvSpec(name="NoRender-v0"), rollout=None)
        recorder = VideoRecorder()
        assert recorder._make_env(module, isolated_run, "x") is None
        assert "NoRender-v0 cannot render rgb_array" in recorder.disabled_reason
        trainer = SimpleNamespace(is_global_zero=True)
        assert recorder.record(trainer, module, "train") == []  # disabled: no second try
    finally:
        gym.registry.pop("NoRender-v0")


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_prints_with_a_config(preset: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", PPO_CARTPOLE, "--config", str(preset), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(preset.read_text())
    for key, added in raw.get("trainer", {}).items():  # logger+ / callbacks+ appended entries
        wanted = [entry["class_path"] for entry in added]
        entries = printed["trainer"][key.rstrip("+")]
        assert [e["class_path"] for e in entries][-len(wanted) :] == wanted
    for section in ("metrics", "checkpoint"):
        for key, value in raw.get(section, {}).items():
            assert printed[section][key] == value
    assert printed["model"]["class_path"] == "slm_lightning.algorithms.PPO"


def wandb_run_ids(root: Path) -> list[str]:
    """The W&B run id of each offline run folder under ``root``, from its ``run-<id>.wandb``.

    Not from the folder name ``offline-run-<second>-<id>``: wandb (0.31,
    ``_WandbInit.set_sync_dir_suffix``) appends ``-1`` to it when the same run already has a
    folder of that second, as a resume started within the same second does.
    """
    files = sorted(root.glob("wandb/offline-run-*/run-*.wandb"))
    return [path.stem.removeprefix("run-") for path in files]


def test_in_place_resume_continues_the_same_wandb_run(isolated_run: Path) -> None:
    """``--ckpt_path last`` resumes the run folder in place and the W&B run with it."""
    preset = ["--config", str(PRESETS / "wandb.yaml")]
    main(["fit", "--config", PPO_CARTPOLE, *preset, *SHORT])
    wandb.finish()
    folder = run_folder(isolated_run, PPO_CARTPOLE)
    run_id = (folder / "wandb_run_id").read_text()
    assert wandb_run_ids(isolated_run) == [run_id]

    main(
        [
            "fit",
            "--config",
            PPO_CARTPOLE,
            *preset,
            "--ckpt_path=last",
            "--model.init_args.max_frames=4096",
            "--metrics.log_frequency=1024",
        ]
    )
    wandb.finish()
    assert run_folder(isolated_run, PPO_CARTPOLE) == folder  # resumed in place
    assert (folder / "wandb_run_id").read_text() == run_id
    assert wandb_run_ids(isolated_run) == [run_id, run_id]  # two sessions of one W&B run
    with (folder / "metrics.csv").open() as f:
        frames = [int(float(row["rollout/frames"])) for row in csv.DictReader(f)]
    assert frames == [1024, 2048, 3072, 4096]


def reversed_trainer(**config: Any) -> L.Trainer:
    """A Trainer given the CLI's callbacks in the reverse order (Lightning still orders them)."""
    return L.Trainer(**{**config, "callbacks": config["callbacks"][::-1]})


class ReversedCallbacksCLI(cli_module.SLMLabCLI):
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self.trainer_class = reversed_trainer
        return super().instantiate_trainer(**kwargs)


def fit_run(root: Path, args: list[str], reverse: bool) -> dict[str, Any]:
    """What a fit leaves: summary figures, the frames of best.ckpt and the stop, metrics rows."""
    with pytest.MonkeyPatch.context() as mp:
        if reverse:
            mp.setattr(cli_module, "SLMLabCLI", ReversedCallbacksCLI)
        main(["fit", "--config", PPO_CARTPOLE, *args, f"--trainer.default_root_dir={root}"])
    summary = json.loads((root / "summary.json").read_text())
    timing = ("seconds", "fps", "seconds_to_target", "git_sha")
    best = torch.load(root / "checkpoints" / "best.ckpt", weights_only=False)
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    stops = [s for k, s in last["callbacks"].items() if k.startswith("EarlyStopOnReturn")]
    with (root / "metrics.csv").open() as f:
        rows = [(r["rollout/frames"], r["episode/return_ma"]) for r in csv.DictReader(f)]
    return {
        "summary": {k: v for k, v in summary.items() if k not in timing},
        "best.ckpt": checkpoint_frames(best),
        "best_return_ma": next(
            s["best_return_ma"] for k, s in last["callbacks"].items() if k.startswith("Frame")
        ),
        "stopped_frame": stops[0]["stopped_frame"] if stops else None,
        "rows": rows,
    }


# ppo_cartpole, seed 0, metrics.window=5: return_ma after each 1024-frame rollout is 15.2,
# 20.4, 26.4, 38.8, 46.6, 41.4, 64.4. A callback reading the previous rollout's average would
# keep best.ckpt at 6144 (46.6 read there) instead of 5120, or stop at 8192 instead of 7168.
ORDER_CASES = {
    "best.ckpt before a dip": (["--model.init_args.max_frames=6144"], 5120, 46.6, None),
    "early stop": (
        [
            "--model.init_args.max_frames=12288",
            "--config",
            str(PRESETS / "early_stop.yaml"),
            "--trainer.callbacks.init_args.target_return=60",
        ],  # fmt: skip
        7168,
        64.4,
        7168,
    ),
}


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_callback_order_does_not_change_the_run(isolated_run: Path, case: str) -> None:
    args, best_frame, best_ma, stopped = ORDER_CASES[case]
    args = [*args, "--metrics.window=5", "--metrics.log_frequency=1024",
            "--checkpoint.every_n_frames=1024"]  # fmt: skip
    given = fit_run(isolated_run / "given", args, reverse=False)
    reverse = fit_run(isolated_run / "reversed", args, reverse=True)
    assert given["best.ckpt"] == best_frame
    assert given["best_return_ma"] == pytest.approx(best_ma)
    assert given["stopped_frame"] == stopped
    assert given["summary"]["frames"] == (stopped or 6144)
    assert reverse == given


def epoch_end(stop: EarlyStopOnReturn, episodes: int, window: int, ma: float, **metrics) -> bool:
    """One rollout's end as EarlyStopOnReturn sees it (one rank); whether it stopped the run."""
    trainer = SimpleNamespace(
        callback_metrics={
            "rollout/window_episodes": torch.tensor(episodes),
            "rollout/window": torch.tensor(window),
            "episode/return_ma": torch.tensor(ma, dtype=torch.float64),
            **{k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()},
        },
        should_stop=False,
        state=SimpleNamespace(fn="fit"),
        sanity_checking=False,
        fast_dev_run=False,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        current_epoch=3,
        is_global_zero=True,
    )
    module = SimpleNamespace(frames=4096, max_frames=10_000, env_spec=EnvSpec(name="CartPole-v1"))
    stop.on_train_epoch_end(trainer, module)
    return trainer.should_stop


def test_early_stop_counts_a_full_window_reaching_the_target_and_never_a_plateau() -> None:
    stop = EarlyStopOnReturn()  # CartPole-v1's reward threshold: 475
    # No episode has ended: nothing to check, no error, no warning.
    trainer = SimpleNamespace(callback_metrics={}, should_stop=False)
    stop.on_train_epoch_end(trainer, SimpleNamespace())
    assert not trainer.should_stop
    assert not epoch_end(stop, episodes=99, window=100, ma=500.0)  # the window is not full
    for i in range(10):  # falling below the target for longer than Lightning's patience of 3
        assert not epoch_end(stop, episodes=100, window=100, ma=474.0 - i)
    assert stop.stopped_frame is None
    assert epoch_end(stop, episodes=100, window=100, ma=475.0)  # reaching it is enough
    state = stop.state_dict()
    assert state["stopped_frame"] == 4096
    assert state["stopping_reason_message"] == "episode/return_ma=475 >= 475 at frame 4096 of 10000"
    restored = EarlyStopOnReturn()
    restored.load_state_dict(state)
    assert restored.stopped_frame == 4096


def test_early_stop_target_and_window_follow_the_metrics_settings() -> None:
    # metrics.target_return (published by MetricsTracker) replaces the env's threshold ...
    assert epoch_end(EarlyStopOnReturn(), episodes=100, window=100, ma=30.0, **{
        "episode/target_return": 30.0})  # fmt: skip
    # ... and early_stop.target_return both.
    stop = EarlyStopOnReturn(target_return=40.0)
    assert not epoch_end(stop, episodes=100, window=100, ma=35.0, **{"episode/target_return": 30.0})
    # min_episodes counts fewer episodes than the window, never more than it holds.
    assert epoch_end(EarlyStopOnReturn(min_episodes=10), episodes=10, window=100, ma=475.0)
    assert not epoch_end(EarlyStopOnReturn(min_episodes=10), episodes=9, window=100, ma=475.0)
    assert epoch_end(EarlyStopOnReturn(min_episodes=10), episodes=5, window=5, ma=475.0)
    with pytest.raises(ConfigError, match=r"^early_stop.min_episodes must be >= 1 or null, got 0$"):
        EarlyStopOnReturn(min_episodes=0)


def test_state_keys_name_the_settings_that_tell_instances_apart() -> None:
    assert MetricsTracker(window=5).state_key != MetricsTracker(window=6).state_key
    # A resume may log at another frequency or target and keep its episodes.
    assert MetricsTracker(window=5).state_key == MetricsTracker(log_frequency=7, window=5).state_key
    assert FrameCheckpoint(dirpath="a").state_key != FrameCheckpoint(dirpath="b").state_key
    assert FrameCheckpoint().state_key == FrameCheckpoint(every_n_frames=7).state_key
    assert EarlyStopOnReturn(1.0).state_key != EarlyStopOnReturn(2.0).state_key
    assert EarlyStopOnReturn(1.0).state_key != EarlyStopOnReturn(1.0, min_episodes=5).state_key


def test_a_checkpoint_with_the_old_constant_state_keys_resumes_the_callbacks(
    isolated_run: Path,
) -> None:
    # Checkpoints written before state keys named the settings keep the tracker's and the
    # checkpoint callback's state under "MetricsTracker" and "FrameCheckpoint".
    run = isolated_run / "run"
    args = ["fit", "--config", PPO_CARTPOLE, "--metrics.window=5", "--metrics.log_frequency=1024",
            f"--trainer.default_root_dir={run}"]  # fmt: skip
    main([*args, "--model.init_args.max_frames=2048"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    tracker_key, saver_key = MetricsTracker(window=5).state_key, FrameCheckpoint().state_key
    tracker, saver = ckpt["callbacks"].pop(tracker_key), ckpt["callbacks"].pop(saver_key)
    ckpt["callbacks"].update({"MetricsTracker": tracker, "FrameCheckpoint": saver})
    torch.save(ckpt, run / "old.ckpt")
    main([*args, "--model.init_args.max_frames=3072", f"--ckpt_path={run / 'old.ckpt'}"])
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert set(resumed) == {tracker_key, saver_key}
    n = tracker["episodes"]
    assert resumed[tracker_key]["history"]["returns"][:n] == tracker["history"]["returns"]
    assert resumed[tracker_key]["episodes"] > n
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["start_frames"] == 2048 and summary["episodes"] == resumed[tracker_key]["episodes"]
    )
    # The checkpoint callback's state moves to its key, where Lightning loads it from.
    old = {"callbacks": {"FrameCheckpoint": {"best_return_ma": 9.5, "next_save": 3072}}}
    FrameCheckpoint().on_load_checkpoint(None, None, old)
    assert old["callbacks"] == {saver_key: {"best_return_ma": 9.5, "next_save": 3072}}
