"""VideoRecorder: MP4s of the current policy's episodes in the run folder, uploaded to W&B."""

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from gymnasium.wrappers import NormalizeObservation, RecordVideo
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from loguru import logger
from typing_extensions import override

from slm_lightning.envs.atari import is_atari, make_atari_render_env
from slm_lightning.envs.factory import EnvSpec, make_single_env


class Mp4RecordVideo(RecordVideo):
    """gymnasium's ``RecordVideo`` writing its MP4s with imageio-ffmpeg (H.264, yuv420p).

    ``RecordVideo`` hands its frames to moviepy, whose clip length (frames / fps, in floating
    point) drops the last frame of some episodes (31 frames at 30 fps come out as 30);
    here every captured frame reaches the file: the reset frame and one per step.
    """

    @override
    def stop_recording(self) -> None:
        if self.recorded_frames:
            # Imported here: runs that record no video never load ffmpeg's bindings.
            import imageio_ffmpeg

            height, width = self.recorded_frames[0].shape[:2]
            path = os.path.join(self.video_folder, f"{self._video_name}.mp4")
            writer = imageio_ffmpeg.write_frames(
                path, (width, height), fps=self.frames_per_sec, macro_block_size=2
            )
            writer.send(None)  # start the ffmpeg process
            for frame in self.recorded_frames:
                writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
            writer.close()
        self.recorded_frames = []
        self.recording = False
        self._video_name = None


class VideoRecorder(Callback):
    """Plays whole episodes with the current policy in one rendering env and saves them as MP4.

    The env is built from the training spec (migrated id, kwargs, time limit, frame stack)
    with ``render_mode="rgb_array"`` and wrapped in gymnasium's ``RecordVideo``
    (:class:`Mp4RecordVideo`); observation
    normalisation uses the training statistics, frozen. Videos are written to
    ``<run folder>/videos/<stage>-frame<N>-episode-<k>.mp4`` (one frame per env step plus the
    reset frame) and, when a ``WandbLogger`` is active, logged to it as ``video/<stage>``.
    Recording runs on rank 0 only, in eval mode, and restores the torch RNG so that a run
    with videos trains exactly as one without. MuJoCo renders headless through EGL unless
    ``MUJOCO_GL`` says otherwise. Atari ids train in ale-py's vector env, which does not
    render: they play in one ALE env with the same preprocessing
    (:func:`~slm_lightning.envs.atari.make_atari_render_env`), so the policy sees the
    observations it trained on and the MP4 shows the game's RGB screen at 60 Hz / frame skip.

    Args:
        every_n_frames: record during training every N frames; None records only at the end.
        at_train_end: record when training ends (at its budget or stopped early).
        on_evaluation: record after ``slm-lab validate`` / ``test`` evaluates a checkpoint.
        episodes: episodes per recording.
        greedy: act greedily; None follows the algorithm's ``eval_greedy``.
        fps: frames per second of the MP4; None uses the env's ``render_fps``.
        dirpath: where to write; None means ``<run folder>/videos``.
        seed: seed of the recording env (each recording replays the same start states).
    """

    def __init__(
        self,
        every_n_frames: int | None = None,
        at_train_end: bool = True,
        on_evaluation: bool = True,
        episodes: int = 1,
        greedy: bool | None = None,
        fps: int | None = None,
        dirpath: str | None = None,
        seed: int = 12345,
    ) -> None:
        if every_n_frames is not None and every_n_frames < 1:
            raise ValueError(f"video.every_n_frames must be >= 1 or null, got {every_n_frames}")
        if episodes < 1:
            raise ValueError(f"video.episodes must be >= 1, got {episodes}")
        if fps is not None and fps < 1:
            raise ValueError(f"video.fps must be >= 1 or null, got {fps}")
        self.every_n_frames = every_n_frames
        self.at_train_end = at_train_end
        self.on_evaluation = on_evaluation
        self.episodes = episodes
        self.greedy = greedy
        self.fps = fps
        self.dirpath = dirpath
        self.seed = seed
        self.next_record = every_n_frames
        self.disabled_reason: str | None = None
        self.last_recorded: int | None = None  # frame of the last training recording
        self.videos: list[Path] = []

    @property
    def state_key(self) -> str:
        return "VideoRecorder"

    def directory(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "videos"

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.next_record is None or self.every_n_frames is None:
            return
        if pl_module.frames >= self.next_record:
            self.next_record = (pl_module.frames // self.every_n_frames + 1) * self.every_n_frames
            self.record(trainer, pl_module, "train")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and self.last_recorded != pl_module.frames:
            self.record(trainer, pl_module, "train")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_evaluation and trainer.validating:
            self.record(trainer, pl_module, "validate")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_evaluation:
            self.record(trainer, pl_module, "test")

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[Path]:
        """Play ``episodes`` episodes, save them, and log them to W&B; returns the MP4 paths."""
        if not trainer.is_global_zero or self.disabled_reason is not None:
            return []
        folder = self.directory(trainer)
        prefix = f"{stage}-frame{pl_module.frames}" if stage == "train" else stage
        if stage == "train":
            self.last_recorded = pl_module.frames
        env = self._make_env(pl_module, folder, prefix)
        if env is None:
            return []
        greedy = pl_module.eval_greedy if self.greedy is None else self.greedy
        was_training = pl_module.training
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=cuda), torch.inference_mode():
                returns = self._play(env, pl_module, greedy)
        finally:
            env.close()  # RecordVideo writes the last episode's file on close
            pl_module.train(was_training)
        videos = sorted(folder.glob(f"{prefix}-episode-*.mp4"))
        self.videos += videos
        shown = ", ".join(f"{r:.4g}" for r in returns)
        logger.info(f"video: {len(videos)} episode(s) (returns {shown}) in {folder}")
        step = pl_module.frames
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and videos:
                lg.log_video(f"video/{stage}", [str(v) for v in videos], step=step)
        return videos

    def _make_env(self, pl_module: L.LightningModule, folder: Path, prefix: str) -> gym.Env | None:
        """The recording env, or None (with one warning) where the env cannot be rendered."""
        spec: EnvSpec = pl_module.env_spec
        atari = is_atari(spec.name)
        if not atari:
            entry = spec.registry_spec().entry_point
            mujoco = isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco")
            if mujoco and not os.environ.get("DISPLAY"):  # no X server: GLFW fails
                os.environ.setdefault("MUJOCO_GL", "egl")
            if not os.environ.get("DISPLAY"):  # pygame (classic control, Box2D) draws off-screen
                os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        try:
            if atari:  # ale-py's vector env does not render: one ALE env with its preprocessing
                env = make_atari_render_env(spec)
            else:
                render_spec = replace(spec, kwargs={**spec.kwargs, "render_mode": "rgb_array"})
                env = make_single_env(render_spec)
            modes = env.metadata.get("render_modes") or []
            if env.render_mode != "rgb_array" or "rgb_array" not in modes:
                env.close()
                return self._disable(
                    f"{spec.env_id} cannot render rgb_array (render modes {modes})"
                )
            env.reset(seed=self.seed)
            if env.render() is None:  # a missing GL backend fails here, before any recording
                raise RuntimeError("render() returned no frame")
            with warnings.catch_warnings():  # a second recording reuses the folder
                warnings.filterwarnings("ignore", message=".*Overwriting existing videos.*")
                env = Mp4RecordVideo(
                    env,
                    str(folder),
                    episode_trigger=lambda _: True,
                    name_prefix=prefix,
                    fps=self.fps or env.metadata.get("render_fps") or 30,
                )
        except Exception as err:  # a missing GL backend, a renderer crash, …
            return self._disable(f"{spec.env_id} cannot be rendered: {type(err).__name__}: {err}")
        normalizers = self._normalizers(pl_module)
        if "obs_rms" in normalizers:
            env = NormalizeObservation(env)
            saved = normalizers["obs_rms"]
            env.obs_rms.mean = np.asarray(saved["mean"], dtype=env.obs_rms.mean.dtype).copy()
            env.obs_rms.var = np.asarray(saved["var"], dtype=env.obs_rms.var.dtype).copy()
            env.obs_rms.count = saved["count"]
            env.update_running_mean = False
        return env

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        logger.warning(f"video: no videos recorded: {reason}")
        return None

    @staticmethod
    def _normalizers(pl_module: L.LightningModule) -> dict[str, Any]:
        """The training observation statistics: the live rollout's, else the checkpoint's."""
        return pl_module.training_normalizers() or {}

    def _play(self, env: gym.Env, agent: Any, greedy: bool) -> list[float]:
        """Play ``episodes`` whole episodes (the first from ``seed``); returns their returns."""
        device = agent.device
        returns: list[float] = []
        obs, _ = env.reset(seed=self.seed)
        for episode in range(self.episodes):
            if episode > 0:
                obs, _ = env.reset()
            state = agent.initial_state(1)
            start, done, total = True, False, 0.0
            while not done:
                obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)[None]
                start_t = None if state is None else torch.tensor([start], device=device)
                actions, state = agent.eval_step(obs_t, state, start_t, greedy)
                action = agent.env_actions(actions.cpu().numpy())[0]
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                start, done = False, bool(terminated or truncated)
            returns.append(total)
        return returns

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_record": self.next_record}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_record = state_dict["next_record"]
