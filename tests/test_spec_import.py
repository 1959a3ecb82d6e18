"""``slm-lab import``: SLM Lab spec files (our own fixtures in v4 JSON with trailing commas,
v5 JSON and v5 YAML with anchors) import to the configs we expect, key by key, with every
key reported; the written config instantiates through our CLI."""

from pathlib import Path

import pytest
import yaml

from slm_lightning.cli import main
from slm_lightning.errors import ConfigError
from slm_lightning.lab.space import check_space_keys, parse_space
from slm_lightning.lab.specs.importer import import_spec
from slm_lightning.lab.specs.load import substitute
from slm_lightning.lab.trial import describe_config

SPECS = Path(__file__).parent / "fixtures" / "specs"
EXPECTED = SPECS / "expected"

CASES = [
    # the six runs of SLM Lab's migration guide (v4 JSON, trailing commas)
    ("v4_classic.json", "dqn_cartpole", None),
    ("v4_classic.json", "reinforce_cartpole", None),
    ("v4_classic.json", "ddqn_per_concat_lunar", None),
    ("v4_ppo.json", "ppo_shared_cartpole", None),
    ("v4_ppo.json", "ppo_bipedalwalker", None),
    ("v4_ppo.json", "ppo_pong", None),
    # one per remaining family (v5 JSON with placeholders, v5 YAML with anchors)
    ("v5_families.json", "a2c_gae_cartpole", {"env": "CartPole-v1", "max_frame": "20000"}),
    ("v5_families.json", "sarsa_cartpole", None),
    ("v5_families.json", "sac_pendulum", None),
    ("v5_anchors.yaml", "ppo_lunar", None),
]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {
            k: v
            for key, value in tree.items()
            for k, v in _leaves(value, f"{prefix}{key}.").items()
        }
    return {prefix.rstrip("."): tree}


@pytest.mark.parametrize(("file", "name", "sets"), CASES, ids=[c[1] for c in CASES])
def test_spec_imports_to_the_expected_config(file, name, sets):
    imported = import_spec(SPECS / file, name, sets)
    expected = yaml.safe_load((EXPECTED / f"{name}.yaml").read_text())
    assert _leaves(imported.config) == _leaves(expected)
    assert imported.version == (4 if file.startswith("v4") else 5)
    # every key of the spec is in exactly one list
    report = imported.report
    lines = report.exact + report.converted + report.unsupported
    assert len(lines) == len(set(lines))


@pytest.mark.parametrize(
    ("file", "name", "sets"),
    [CASES[0], CASES[3], CASES[6], CASES[8]],
    ids=["dqn", "ppo", "a2c", "sac"],
)
def test_imported_config_instantiates(file, name, sets, tmp_path):
    imported = import_spec(SPECS / file, name, sets)
    path = tmp_path / f"{name}.yaml"
    path.write_text(imported.yaml_text())
    facts = describe_config([str(path)], [])
    assert facts.algorithm == imported.config["model"]["class_path"].rsplit(".", 1)[1]
    assert (
        facts.values["model.init_args.max_frames"]
        == imported.config["model"]["init_args"]["max_frames"]
    )


def test_meta_settings_and_notes():
    dqn = import_spec(SPECS / "v4_classic.json", "dqn_cartpole")
    assert (dqn.max_session, dqn.max_trial, dqn.search_scheduler) == (2, 5, None)
    # Polyak 0.1 every 32 frames, 32 updates every 4 frames: 1 - 0.9^(1/256)
    assert dqn.config["model"]["init_args"]["tau"] == pytest.approx(1 - 0.9 ** (1 / 256), rel=1e-5)
    pong = import_spec(SPECS / "v4_ppo.json", "ppo_pong")
    assert (
        "v4 Atari defaults kept: no sticky actions (repeat_action_probability 0.0), life loss as terminal (episodic_life true)"
        in pong.report.notes
    )
    assert (
        "gpu: true -> trainer.accelerator: auto (a machine without a GPU runs on CPU)"
        in pong.report.notes
    )
    lunar = import_spec(SPECS / "v5_anchors.yaml", "ppo_lunar")
    assert (lunar.max_session, lunar.max_trial, lunar.search_scheduler) == (4, 16, "ASHA")


def test_report_lists_a_misspelt_and_an_unsupported_key():
    report = import_spec(SPECS / "v5_families.json", "ppo_typo").report
    assert report.unsupported == [
        "agent.net.batch_norm: no normalisation layers in our MLP/conv bodies",
        "agent.algorithm.clip_val_loss: no equivalent key (misspelt? not read by SLM Lab "
        "either; it reads clip_vloss)",
    ]
    assert "agent.algorithm.gamma 0.99 -> model.init_args.gamma" in report.exact
    assert "agent.algorithm.lam 0.95 -> model.init_args.gae_lambda" in report.exact
    assert (
        "agent.net.hid_layers [32] -> model.init_args.actor.hidden_sizes, "
        "model.init_args.critic.hidden_sizes" in report.converted
    )
    lines = report.lines()
    assert lines[0] == "exact:" and "no equivalent:" in lines and "converted:" in lines
    assert lines[lines.index("no equivalent:") + 1] == f"  {report.unsupported[0]}"


def test_strict_refuses_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "typo.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(SPECS / "v5_families.json"), "ppo_typo", "-o", str(out), "--strict"])
    assert exit_info.value.code == 2
    assert not out.exists()


def test_import_command_writes_a_config_that_runs_and_keeps_existing_ones(tmp_path):
    main(["import", str(SPECS / "v4_classic.json"), "ddqn_per_concat_lunar"])
    written = tmp_path / "configs" / "ddqn_per_concat_lunar.yaml"
    text = written.read_text()
    assert text.startswith(f"# Imported by `slm-lab import` from {SPECS / 'v4_classic.json'}")
    assert _leaves(yaml.safe_load(text)) == _leaves(
        yaml.safe_load((EXPECTED / "ddqn_per_concat_lunar.yaml").read_text())
    )
    # a second import does not replace it silently; -o naming it does
    written.write_text("# mine\n")
    with pytest.raises(SystemExit):
        main(["import", str(SPECS / "v4_classic.json"), "ddqn_per_concat_lunar"])
    assert written.read_text() == "# mine\n"
    main(["import", str(SPECS / "v4_classic.json"), "ddqn_per_concat_lunar", "-o", str(written)])
    assert written.read_text() == text


def test_substitution_and_the_unsubstituted_placeholder():
    # numeric values replace the quoted placeholder, so max_frame becomes a number
    assert substitute(
        '{"n": "${max_frame}", "e": "${env}"}', {"max_frame": "3e6", "env": "X-v1"}
    ) == ('{"n": 3e6, "e": "X-v1"}')
    imported = import_spec(
        SPECS / "v5_families.json", "a2c_gae_cartpole", {"env": "Acrobot-v1", "max_frame": "5000"}
    )
    assert imported.config["model"]["init_args"]["env"]["name"] == "Acrobot-v1"
    assert imported.config["model"]["init_args"]["max_frames"] == 5000
    with pytest.raises(ConfigError) as err:
        import_spec(SPECS / "v5_families.json", "a2c_gae_cartpole", {"env": "CartPole-v1"})
    assert str(err.value) == (
        "a2c_gae_cartpole.env.max_frame: placeholder ${max_frame} is not substituted; "
        "pass -s max_frame=VALUE"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "sil_cartpole",
            "agent.algorithm.name SIL: self-imitation learning is not supported; supported: ",
        ),
        (
            "a3c_cartpole",
            "a3c_cartpole: agent.algorithm.name ActorCritic with meta.distributed synced (Hogwild A3C) is not supported; set meta.distributed false",
        ),
        ("ppo_cartpol", "SPEC_NAME ppo_cartpol is not in "),
    ],
)
def test_refusals_are_one_line(name, message):
    with pytest.raises(ConfigError) as err:
        import_spec(SPECS / "v5_families.json", name)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_search_section_becomes_a_space(tmp_path):
    lunar = import_spec(SPECS / "v5_anchors.yaml", "ppo_lunar")
    assert lunar.space == {
        "model.init_args.gamma": {"uniform": [0.98, 0.999]},
        "model.init_args.lr": {"loguniform": [1.0e-4, 1.0e-3]},
        "model.init_args.training_epochs": {"int": [4, 10]},  # randint's high end is exclusive
        # 128 steps x 8 envs / minibatch_size
        "model.init_args.num_minibatches": {"choice": [8, 4, 2]},
    }
    assert lunar.report.unsupported == [
        "search.agent.algorithm.lam__normal: normal has no bounded equivalent here "
        "(uniform, loguniform, int, choice)",
        "search.agent.algorithm.training_batch_iter_choice: no __suffix (uniform, choice …); "
        "SLM Lab would fail on it too",
    ]
    path = tmp_path / "ppo_lunar.yaml"
    path.write_text(lunar.yaml_text())
    space = parse_space(lunar.space, "ppo_lunar space")
    check_space_keys(space, describe_config([str(path)], []).values, str(path))
    # v4 nested search: a key the algorithm ignores is reported, not searched
    shared = import_spec(SPECS / "v4_ppo.json", "ppo_shared_cartpole")
    assert shared.space == {"model.init_args.gae_lambda": {"choice": [0.9, 0.95]}}
    assert shared.report.unsupported == [
        "search.agent.algorithm.training_frequency__grid_search: the algorithm ignores it"
    ]


def test_a_key_known_elsewhere_is_not_called_misspelt(tmp_path):
    # SAC reads no lr schedule: the key is reported as such, not as a typo
    spec = tmp_path / "sac_with_schedule.json"
    text = (
        (SPECS / "v5_families.json")
        .read_text()
        .replace(
            '"polyak_coef": 0.005,',
            '"polyak_coef": 0.005, "lr_scheduler_spec": {"name": "LinearToZero", "frame": 1000},',
        )
    )
    spec.write_text(text)
    report = import_spec(spec, "sac_pendulum").report
    assert report.unsupported == [
        "agent.net.lr_scheduler_spec.name: no equivalent key (this algorithm has no equivalent here)",
        "agent.net.lr_scheduler_spec.frame: no equivalent key (this algorithm has no equivalent here)",
    ]


# The numbers that matter in the migration guide's six runs, derived by hand from the specs,
# SLM Lab v4's code and our signatures, independently of the expected files above.
# Upstream facts used: net_util.polyak_update(src, tar, old_ratio) sets
# tar <- old_ratio * src + (1 - old_ratio) * tar, every update_frequency frames; Net.train_step
# steps the lr scheduler with epoch=frame; DQN trains training_iter x training_batch_iter times
# every training_frequency transitions; PPO's split_minibatch makes int(size / minibatch_size)
# minibatches; losses are nn.MSELoss (no 1/2) where ours are half-MSE.
BY_HAND = {
    "dqn_cartpole": {
        "env.name": "CartPole-v1",  # v0 migrated
        "env.num_envs": 1,  # absent in v4 -> 1 (ours defaults to 8)
        "max_frames": 10_000,
        "double": False,
        "loss": "mse",
        "max_grad_norm": 0.5 / 2,  # clip of nn.MSELoss's gradient; our half-MSE's is half
        "training_frequency": 4,  # 4 transitions / 1 env
        "updates_per_step": 32,  # training_iter 4 x training_batch_iter 8
        "learning_starts": 32,
        "combined_replay": True,
        # tau 0.1 of the online net every 32 frames; 32 / 4 = 8 rounds x 32 updates = 256 lerps
        "tau": pytest.approx(1 - 0.9 ** (1 / 256), rel=1e-4),
        "epsilon.start": 1.0,
        "epsilon.end": 0.1,
        "epsilon.end_frame": 1000,
        "lr.start": 0.02,
        "lr.end": pytest.approx(0.02 * 0.9 ** (10_000 // 1000), rel=1e-5),  # StepLR at frame 1e4
        "lr.kind": "exponential",
        "net.hidden_sizes": [64],
        "net.activation": "selu",
    },
    "reinforce_cartpole": {
        "env.num_envs": 1,
        "max_frames": 100_000,
        "time_horizon": 500,  # 1 episode x CartPole-v1's 500-step limit
        "lr": 0.002,
        "max_grad_norm": None,
        "center_returns": True,
        "entropy_coef.start": 0.01,
        "entropy_coef.end": 0.001,
        "entropy_coef.end_frame": 20_000,
        "actor.hidden_sizes": [64],
        "actor.activation": "selu",
    },
    "ddqn_per_concat_lunar": {
        "env.name": "LunarLander-v3",
        "env.frame_stack": 4,  # frame_op concat, frame_op_len 4
        "env.num_envs": 1,
        "max_frames": 300_000,
        "double": True,
        "prioritized": True,
        "per_alpha": 0.6,
        "per_epsilon": 1e-4,
        "loss": "huber",
        "max_grad_norm": 10.0,  # SmoothL1Loss is the same function here: no rescaling
        "lr": 2.5e-4,
        "tau": None,
        "target_update_frequency": 100,  # frames in both
        "training_frequency": 1,
        "updates_per_step": 1,  # 1 x 1
        "batch_size": 32,
        "memory_size": 50_000,
        "epsilon.end": 0.01,
        "epsilon.end_frame": 50_000,
        "net.hidden_sizes": [256, 128],
    },
    "ppo_shared_cartpole": {
        "env.num_envs": 1,
        "max_frames": 30_000,
        "shared": True,
        "value_coef": 0.1 * 2,  # SLM Lab MSE x 0.1 against our half-MSE
        "time_horizon": 32,
        "num_minibatches": 2,  # 32 steps x 1 env / minibatch 16
        "training_epochs": 4,
        "gae_lambda": 0.95,
        "clip_eps": 0.2,
        "lr": 0.02,
        "critic_lr": None,
        "entropy_coef.start_frame": 1000,
        "entropy_coef.end_frame": 5000,
        "actor.hidden_sizes": [64],
    },
    "ppo_bipedalwalker": {
        "env.name": "BipedalWalker-v3",
        "env.num_envs": 32,
        "max_frames": 4_000_000,  # 4e6 frames over all 32 envs in both
        "shared": False,
        "value_coef": 0.5 * 2,  # the critic's gradient, clipped at 0.5, is then the same
        "time_horizon": 512,
        "num_minibatches": 4,  # 512 steps x 32 envs / minibatch 4096
        "training_epochs": 15,
        "lr": 3e-4,
        "critic_lr": None,  # use_same_optim
        "entropy_coef": 0.01,
        "actor.hidden_sizes": [256, 128],
        "critic.hidden_sizes": [256, 128],
    },
    "ppo_pong": {
        "env.name": "ALE/Pong-v5",
        "env.num_envs": 16,
        "env.atari.stack_num": 4,  # frame_op_len 4
        "env.atari.reward_clipping": True,  # reward_scale sign
        "env.atari.repeat_action_probability": 0.0,  # NoFrameskip-v4: no sticky actions
        "env.atari.episodic_life": True,  # v4 wrap_deepmind in training
        "max_frames": 10_000_000,
        "value_coef": 0.5 * 2,
        "time_horizon": 128,
        "num_minibatches": 8,  # 128 steps x 16 envs / minibatch 256
        "gae_lambda": 0.70,
        "clip_eps": 0.1,
        "lr.start": 2.5e-4,
        "lr.end": 0.0,  # LinearToZero over frame 1e7 = max_frames: end_frame left at max_frames
        "conv.channels": [32, 64, 32],
        "conv.kernel_sizes": [8, 4, 3],
        "conv.strides": [4, 2, 1],
        "conv.hidden_size": 512,  # fc_hid_layers [512]
        "actor.hidden_sizes": [],
        "critic.hidden_sizes": [],
    },
}


@pytest.mark.parametrize(("file", "name", "sets"), CASES[:6], ids=[c[1] for c in CASES[:6]])
def test_migration_runs_import_to_hand_computed_numbers(file, name, sets):
    args = _leaves(import_spec(SPECS / file, name, sets).config["model"]["init_args"])
    for key, value in BY_HAND[name].items():
        assert args.get(key, "<absent>") == value, key
    # a Schedule's end_frame left out means max_frames, which is what these runs had
    if name in ("dqn_cartpole", "ppo_pong"):
        assert args.get("lr.end_frame") in (None, args["max_frames"])
