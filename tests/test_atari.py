"""Atari through ale-py's native vector env, and the conv nets that read its frames."""

from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector import VectorWrapper

from slm_lightning.cli import main
from slm_lightning.data.frame_replay import FrameReplay
from slm_lightning.data.offpolicy_rollout import OffPolicyRollout
from slm_lightning.data.onpolicy_memory import OnPolicyMemory
from slm_lightning.data.onpolicy_rollout import OnPolicyRollout
from slm_lightning.data.replay import ReplayLayout
from slm_lightning.data.returns import MonteCarloReturns
from slm_lightning.envs.atari import AtariGameEpisodes, AtariSpec, make_atari_render_env
from slm_lightning.envs.factory import EnvSpec, make_vector_env, probe_spaces
from slm_lightning.errors import ConfigError
from slm_lightning.nets.actor_critic import ActorCritic
from slm_lightning.nets.conv import ConvBody, ConvSpec, FlatBody
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.nets.q_network import QNetwork

CONFIGS = Path(__file__).parents[1] / "configs"
FRAMES = spaces.Box(0, 255, (4, 84, 84), np.uint8)


# --- the env -------------------------------------------------------------------------------


def test_pong_frames_are_stacked_uint8_and_rewards_clipped():
    env = make_vector_env(EnvSpec(name="ALE/Pong-v5", num_envs=2), seed=0)
    try:
        obs, info = env.reset(seed=0)
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        assert env.single_observation_space == FRAMES
        assert env.single_action_space == spaces.Discrete(6)  # Pong's minimal action set
        assert env.metadata["autoreset_mode"].value == "NextStep"
        rewards = []
        for _ in range(200):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            rewards.append(reward)
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        assert reward.dtype == np.float32 and terminated.dtype == bool
        assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}
        assert min(np.min(r) for r in rewards) == -1.0  # random play concedes points
        # The last frame of the stack is the newest: consecutive stacks overlap by 3 frames.
        before = obs
        obs, *_ = env.step(np.zeros(2, dtype=np.int64))
        np.testing.assert_array_equal(obs[:, :3], before[:, 1:])
    finally:
        env.close()


def test_atari_options_reach_the_native_env():
    spec = EnvSpec(
        name="ALE/Breakout-v5",
        num_envs=1,
        max_episode_steps=5,
        atari=AtariSpec(stack_num=2, full_action_space=True, frameskip=2),
        kwargs={"img_height": 64, "img_width": 48},
    )
    obs_space, act_space = probe_spaces(spec)
    assert obs_space == spaces.Box(0, 255, (2, 64, 48), np.uint8)
    assert act_space == spaces.Discrete(18)
    env = make_vector_env(spec, seed=0)
    try:
        _, info = env.reset(seed=0)
        frame = int(info["frame_number"][0])
        _, _, _, _, info = env.step(np.zeros(1, dtype=np.int64))
        assert int(info["frame_number"][0]) - frame == 2  # frameskip 2
        for _ in range(4):
            _, _, terminated, truncated, info = env.step(np.zeros(1, dtype=np.int64))
        # max_episode_steps counts agent steps (ale-py's limit is in emulator frames).
        assert truncated[0] and not terminated[0]
        assert info["_episode"][0] and info["episode"]["l"][0] == 5
    finally:
        env.close()


def test_legacy_pong_id_builds_the_v5_native_env():
    spec = EnvSpec(name="PongNoFrameskip-v4", num_envs=2)
    assert probe_spaces(spec) == (FRAMES, spaces.Discrete(6))
    env = make_vector_env(spec, seed=0)
    try:
        assert type(env.unwrapped).__name__ == "AtariVectorEnv"
        assert env.reset(seed=0)[0].shape == (2, 4, 84, 84)
    finally:
        env.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kwargs": {"reward_clipping": False}}, r"env\.kwargs\.reward_clipping.*atari"),
        ({"kwargs": {"img_hieght": 64}}, r"env\.kwargs\.img_hieght.*img_height"),
        ({"frame_stack": 4}, r"env\.frame_stack.*stack_num"),
    ],
)
def test_bad_atari_options_are_config_errors(kwargs: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        probe_spaces(EnvSpec(name="ALE/Pong-v5", num_envs=1, **kwargs))


def test_bad_atari_spec_is_a_config_error():
    with pytest.raises(ConfigError, match=r"env\.atari\.repeat_action_probability"):
        AtariSpec(repeat_action_probability=1.5)


class RawRewards(VectorWrapper):
    """Records what the native env returns, before AtariGameEpisodes clips and relabels it."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def step(self, actions: np.ndarray):
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        self.steps.append((rewards.copy(), terminated | truncated, info["lives"].copy()))
        return obs, rewards, terminated, truncated, info


def test_reported_return_is_the_raw_score_summed_over_all_lives():
    # SpaceInvaders: 3 lives and rewards of 5-30 points, so clipped sums and per-life sums
    # both differ from the game score.
    spec = EnvSpec(
        name="ALE/SpaceInvaders-v5",
        num_envs=4,
        atari=AtariSpec(episodic_life=True, reward_clipping=True),
    )
    env = make_vector_env(spec, seed=1)
    wrapper = env
    while not isinstance(wrapper, AtariGameEpisodes):
        wrapper = wrapper.env
    wrapper.env = raw = RawRewards(wrapper.env)
    rng = np.random.default_rng(0)
    reported: list[list[float]] = [[] for _ in range(4)]
    lengths: list[list[int]] = [[] for _ in range(4)]
    trained_rewards, life_terminals = [], 0
    try:
        env.reset(seed=1)
        for _ in range(1500):
            actions = rng.integers(0, 6, size=4)
            _, reward, terminated, _, info = env.step(actions)
            trained_rewards.append(reward)
            life_terminals += int(terminated.sum())
            for i in np.flatnonzero(info.get("_episode", np.zeros(4, bool))):
                reported[i].append(float(info["episode"]["r"][i]))
                lengths[i].append(int(info["episode"]["l"][i]))
    finally:
        env.close()

    # Ground truth from the native env: raw rewards from a reset to the game over; the step
    # after a game over is the NEXT_STEP reset and belongs to no game.
    expected: list[list[float]] = [[] for _ in range(4)]
    expected_lengths: list[list[int]] = [[] for _ in range(4)]
    lives_per_game: list[int] = []
    for i in range(4):
        score, length, prev_done, lives = 0.0, 0, False, set()
        for rewards, done, lives_now in raw.steps:
            if prev_done:
                score, length, lives = 0.0, 0, set()
            else:
                score += float(rewards[i])
                length += 1
                lives.add(int(lives_now[i]))
            if done[i]:
                expected[i].append(score)
                expected_lengths[i].append(length)
                lives_per_game.append(len(lives))
            prev_done = bool(done[i])
    games = sum(len(scores) for scores in expected)
    assert games >= 4, "the test needs finished games"
    assert reported == expected
    assert lengths == expected_lengths
    assert max(lives_per_game) >= 3  # a reported game spans several lives
    assert life_terminals > games  # episodic_life: a terminal per life lost, not per game
    # Training sees sign-clipped rewards, the reported returns the raw 5-30 point rewards.
    assert set(np.unique(trained_rewards)) == {0.0, 1.0}
    assert max(float(rewards.max()) for rewards, _, _ in raw.steps) >= 5


class AlwaysFire:
    """A rollout agent that always presses FIRE (Breakout action 1): the paddle stays put and
    each new ball is served at once, so with sticky actions and no-op starts off the game
    loses its 5 lives at fixed steps."""

    device = torch.device("cpu")
    max_frames = 10**9
    learning_starts = 10**9

    def initial_state(self, num_envs: int) -> None:
        return None

    def act(
        self, obs: torch.Tensor, state: None, episode_starts: None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        n = len(obs)
        return torch.ones(n, dtype=torch.int64), torch.zeros(n), torch.zeros(n), None

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(obs), dtype=torch.int64)

    def bootstrap_values(self, obs: torch.Tensor, state: None, starts: None) -> torch.Tensor:
        return torch.zeros(len(obs))

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        return actions


BREAKOUT_LIVES = EnvSpec(
    name="ALE/Breakout-v5",
    num_envs=1,
    atari=AtariSpec(episodic_life=True, repeat_action_probability=0.0, noop_max=0),
)


def test_step_after_a_life_loss_is_a_real_transition():
    # 128 steps of FIRE: Breakout's 5 lives are lost, the last one at game over. Each life
    # lost is terminal for training; only the step after the game over is the NEXT_STEP
    # reset, so 128 - 1 steps are transitions (a life-loss mask would leave 128 - 5).
    obs_space, action_space = probe_spaces(BREAKOUT_LIVES)
    memory = OnPolicyMemory.for_spaces(128, 1, obs_space, action_space, MonteCarloReturns(0.99))
    rollout = OnPolicyRollout(AlwaysFire(), BREAKOUT_LIVES, memory, 0, 1, 1)
    rollout.collect()
    mem = rollout.memory
    terminals = np.flatnonzero(mem.terminated[:, 0])
    assert len(terminals) == 5
    game_over = terminals[-1]
    assert np.flatnonzero(~mem.valid[:, 0]).tolist() == [game_over + 1]
    assert mem.valid.sum() == 127
    # The step after each life lost continues the frame stream: its observation is the
    # life-loss step's next observation (stacks shifted by one frame), not a reset.
    for t in terminals[:-1]:
        np.testing.assert_array_equal(mem.obs[t + 1, 0, :3], mem.obs[t, 0, 1:])
    assert not mem.obs[game_over + 2, 0, :3].any()  # after the reset step: a zero-padded stack
    rollout.close()

    # DQN's frame replay keeps the same 127 transitions, with the same observations.
    memory = FrameReplay(ReplayLayout(1000, 1, (4, 84, 84), np.uint8, (), np.int64))
    offpolicy = OffPolicyRollout(AlwaysFire(), BREAKOUT_LIVES, memory, 0, learning_starts=10**9)
    for _ in range(128):
        offpolicy.step()
    offpolicy.close()
    assert len(memory) == 127
    batch = memory.batch(np.arange(127))
    np.testing.assert_array_equal(batch.obs, mem.obs[mem.valid[:, 0], 0])
    np.testing.assert_array_equal(np.flatnonzero(batch.terminated), terminals)


@pytest.mark.parametrize("game", ["Breakout", "Pong"])
def test_render_env_sees_the_vector_env_observations(game: str):
    # Without no-ops and sticky actions both envs are deterministic: the same actions give
    # the same stacks, pixel for pixel, through lives lost and up to the game over (random
    # play loses Breakout in about 200 steps and Pong in about 950).
    spec = EnvSpec(
        name=f"ALE/{game}-v5",
        num_envs=1,
        atari=AtariSpec(repeat_action_probability=0.0, noop_max=0),
    )
    vector = make_vector_env(spec, seed=0)
    single = make_atari_render_env(spec)
    try:
        vector_obs, _ = vector.reset(seed=0)
        obs, info = single.reset(seed=0)
        np.testing.assert_array_equal(obs, vector_obs[0])
        assert info["episode_frame_number"] == 1  # the FIRE frame, as in the vector env
        rng = np.random.default_rng(0)
        for _ in range(2000):
            action = int(rng.integers(single.action_space.n))
            vector_obs, _, vector_terminated, vector_truncated, _ = vector.step(np.array([action]))
            obs, _, terminated, truncated, info = single.step(action)
            np.testing.assert_array_equal(obs, vector_obs[0])
            assert (terminated, truncated) == (vector_terminated[0], vector_truncated[0])
            if terminated:
                break
        assert terminated and info["lives"] == 0  # a whole game was compared
        assert obs.shape == (4, 84, 84) and single.render().shape == (210, 160, 3)
        assert single.metadata["render_fps"] == 15  # 60 Hz over frame skip 4
    finally:
        vector.close()
        single.close()


def test_atari_fit_records_a_video_of_the_game(isolated_run: Path):
    run_dir = isolated_run / "run"
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "ppo_atari.yaml"),
            "--config",
            str(CONFIGS.parent / "callbacks" / "video.yaml"),
            "--model.init_args.env.num_envs=2",
            "--model.init_args.env.max_episode_steps=40",
            "--model.init_args.env.atari.noop_max=0",
            "--model.init_args.time_horizon=16",
            "--model.init_args.training_epochs=1",
            "--model.init_args.max_frames=32",
            f"--trainer.default_root_dir={run_dir}",
        ]
    )
    # One episode at the end of training, cut at 40 agent steps: 40 frames plus the reset
    # frame, each the game's 160x210 RGB screen.
    video = run_dir / "videos" / "train-frame32-episode-0.mp4"
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(video))
    assert frames == 41
    assert seconds == pytest.approx(41 / 15, abs=0.1)
    meta = next(imageio_ffmpeg.read_frames(str(video)))
    assert meta["size"] == (160, 210)


# --- the conv nets ---------------------------------------------------------------------------


def test_nature_cnn_is_the_default_for_frames_and_scales_uint8():
    torch.manual_seed(0)
    net = ActorCritic(FRAMES, spaces.Discrete(6), MLPSpec([]), MLPSpec([]), shared=True)
    assert isinstance(net.encoder, ConvBody) and net.encoder.out_features == 512
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)),
        (64, (4, 4), (2, 2)),
        (64, (3, 3), (1, 1)),
    ]
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    dist, values = net(frames)
    assert dist.logits.shape == (5, 6) and values.shape == (5,)
    assert dist.logits.dtype == torch.float32
    # uint8 pixels are divided by 255 inside the net: the same as feeding [0, 1] floats
    # through a net that does not scale.
    unscaled = ConvBody((4, 84, 84), ConvSpec(), scale=1.0)
    unscaled.load_state_dict(net.encoder.state_dict())
    torch.testing.assert_close(net.encoder(frames), unscaled(frames.float() / 255.0))
    # The conv trunk is shared: one copy, trained with the actor's parameter group.
    encoder_params = {id(p) for p in net.encoder.parameters()}
    assert encoder_params <= {id(p) for p in net.actor_parameters()}
    assert not encoder_params & {id(p) for p in net.critic_parameters()}
    torch.testing.assert_close(net.value(frames), values)


def test_flat_observations_keep_the_mlp_without_conv():
    net = ActorCritic(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), MLPSpec(), MLPSpec())
    assert isinstance(net.encoder, FlatBody) and not list(net.encoder.parameters())
    assert net(torch.zeros(3, 4))[0].logits.shape == (3, 2)


def test_conv_spec_is_configurable():
    spec = ConvSpec(channels=[16, 32], kernel_sizes=[8, 4], strides=[4, 2], hidden_size=256)
    net = QNetwork(FRAMES, spaces.Discrete(4), MLPSpec([]), conv=spec)
    assert net.encoder.out_features == 256
    assert net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 4)
    with pytest.raises(
        ConfigError,
        match=r"^model\.init_args\.conv\.channels, kernel_sizes and strides must have the same length",
    ):
        ConvSpec(channels=[32, 64], kernel_sizes=[8], strides=[4]).check("model.init_args.conv")


def test_dueling_conv_head_has_two_streams_and_centred_advantages():
    torch.manual_seed(0)
    net = QNetwork(FRAMES, spaces.Discrete(6), MLPSpec([]), dueling=True)
    assert net.encoder.out_features == 64 * 7 * 7  # streams start from the conv features
    for stream, out in ((net.head, 6), (net.value_head, 1)):
        linears = [m for m in stream.modules() if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(3136, 512), (512, out)]
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    q = net(frames)
    assert q.shape == (3, 6)
    with torch.no_grad():
        features = net.body(net.encoder(frames))
        torch.testing.assert_close(q.mean(-1), net.value_head(features).squeeze(-1))


def test_bf16_conv_trunk_keeps_float32_heads_close_to_float32():
    torch.manual_seed(0)
    net32 = ActorCritic(FRAMES, spaces.Discrete(6), MLPSpec([]), MLPSpec([]), shared=True)
    net16 = ActorCritic(
        FRAMES,
        spaces.Discrete(6),
        MLPSpec([]),
        MLPSpec([]),
        shared=True,
        conv=ConvSpec(precision="bfloat16"),
    )
    net16.load_state_dict(net32.state_dict())
    frames = torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8)
    dist32, v32 = net32(frames)
    dist16, v16 = net16(frames)
    assert dist16.logits.dtype == torch.float32 and v16.dtype == torch.float32
    torch.testing.assert_close(dist16.probs, dist32.probs, atol=2e-3, rtol=0)
    torch.testing.assert_close(v16, v32, atol=2e-2, rtol=2e-2)
    dist16.log_prob(torch.zeros(4, dtype=torch.long)).sum().backward()  # trains in bf16
    assert all(p.grad.dtype == torch.float32 for p in net16.encoder.parameters())


# --- a short run through the CLI -------------------------------------------------------------


def test_ppo_pong_fit_completes(run_fit):
    run = run_fit(
        "--model.init_args.env.num_envs=2",
        "--model.init_args.time_horizon=32",
        "--model.init_args.num_minibatches=2",
        "--model.init_args.training_epochs=1",
        "--model.init_args.max_frames=128",
        config=CONFIGS / "ppo_pong.yaml",
    )
    run_dir, summary = run.run_dir, run.summary
    assert summary["frames"] == 128  # 2 rollouts of 2 envs x 32 steps
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "train/policy_loss" in header and "rollout/frames" in header
