"""Tracking presets: W&B offline and TensorBoard read back, early stopping, MP4 videos."""

import csv
import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import imageio_ffmpeg
import numpy as np
import pytest
import wandb
import yaml
from google.protobuf.message import DecodeError
from gymnasium.wrappers import NormalizeObservation
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from slm_lightning.callbacks import EarlyStopOnReturn, MetricsTracker, VideoRecorder
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
    trainer = SimpleNamespace(callbacks=[MetricsTracker()])
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
