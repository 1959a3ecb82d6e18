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
