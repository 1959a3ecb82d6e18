"""The search space: every distribution kind parses to the Optuna distribution it names; every
bad entry is one line naming the file and the key; sampled params become fit options that
the CLI parses back to exactly the sampled values; the grid; keys checked against a config;
every shipped space checks against its config and a sample from it instantiates."""

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from slm_lightning.errors import ConfigError
from slm_lightning.lab.space import SearchSpace, check_space_keys, load_space, parse_space
from slm_lightning.lab.trial import ConfigFacts, describe_config

REPO = Path(__file__).resolve().parents[1]
SRC = "space.yaml"
KEY = "model.init_args.lr"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"loguniform": [1.0e-4, 1.0e-2]}, FloatDistribution(1.0e-4, 1.0e-2, log=True)),
        ({"uniform": [0.95, 0.999]}, FloatDistribution(0.95, 0.999)),
        ({"uniform": [1.0e-4, 0.1], "log": True}, FloatDistribution(1.0e-4, 0.1, log=True)),
        ({"uniform": [0.1, 0.3], "step": 0.05}, FloatDistribution(0.1, 0.3, step=0.05)),
        ({"uniform": [0, 1]}, FloatDistribution(0.0, 1.0)),  # int bounds: still a float range
        ({"int": [2, 10]}, IntDistribution(2, 10)),
        ({"int": [2, 8], "step": 2}, IntDistribution(2, 8, step=2)),
        ({"int": [16, 512], "log": True}, IntDistribution(16, 512, log=True)),
        ({"choice": [16, 32, 64]}, CategoricalDistribution([16, 32, 64])),
        (
            {"choice": [True, False, None, "relu"]},
            CategoricalDistribution([True, False, None, "relu"]),
        ),
        ({"choice": [[64, 64], [128]]}, CategoricalDistribution(["[64, 64]", "[128]"])),
    ],
)
def test_each_kind_parses_to_its_optuna_distribution(entry: dict, expected: Any) -> None:
    dist = parse_space({KEY: entry}, SRC).distributions[KEY]
    # Optuna's == compares the class and every attribute (low, high, log, step, choices).
    assert dist == expected
    assert type(dist) is type(expected)
    if isinstance(expected, FloatDistribution):
        assert isinstance(dist.low, float) and isinstance(dist.high, float)


def test_keys_keep_file_order_and_list_options_decode() -> None:
    raw = {
        "model.init_args.gamma": {"uniform": [0.9, 0.99]},
        "model.init_args.actor.hidden_sizes": {"choice": [[64, 64], [128, 128]]},
        "model.init_args.lr": {"choice": [{"start": 0.001, "end": 0.0}, 0.003]},
    }
    space = parse_space(raw, SRC)
    assert list(space.distributions) == list(raw)
    params = {
        "model.init_args.gamma": 0.95,
        "model.init_args.actor.hidden_sizes": "[128, 128]",
        "model.init_args.lr": '{"start": 0.001, "end": 0.0}',
    }
    assert space.values(params) == {
        "model.init_args.gamma": 0.95,
        "model.init_args.actor.hidden_sizes": [128, 128],
        "model.init_args.lr": {"start": 0.001, "end": 0.0},
    }
    assert space.overrides(params) == [
        "--model.init_args.gamma=0.95",
        "--model.init_args.actor.hidden_sizes=[128, 128]",
        '--model.init_args.lr={"start": 0.001, "end": 0.0}',
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"unifrom": [0, 1]}, "unknown 'unifrom'; did you mean uniform?"),
        ({"uniform": [0, 1], "steps": 0.1}, "unknown 'steps'; did you mean step?"),
        ({}, "give exactly one of loguniform, uniform, int, choice; got none"),
        ({"log": True}, "got none"),
        ({"uniform": [0, 1], "int": [0, 1]}, "got uniform and int"),
        ([0.1, 0.2], "expected a distribution such as {uniform: [0.9, 0.99]}, got [0.1, 0.2]"),
        (0.1, "expected a distribution"),
        ({"uniform": [0]}, "uniform takes two numbers [lo, hi], got [0]"),
        ({"uniform": 0.5}, "uniform takes two numbers"),
        ({"uniform": ["1e-4", 1]}, "uniform takes two numbers"),
        ({"uniform": [True, 2]}, "uniform takes two numbers"),
        ({"uniform": [0, float("inf")]}, "uniform takes two numbers"),
        ({"uniform": [1, 1]}, "uniform needs lo < hi, got [1, 1]"),
        ({"int": [8, 2]}, "int needs lo < hi, got [8, 2]"),
        ({"uniform": [0, 1], "log": True}, "a log-scaled range needs lo > 0, got [0, 1]"),
        ({"loguniform": [-1, 1]}, "a log-scaled range needs lo > 0"),
        ({"int": [0, 8], "log": True}, "a log-scaled range needs lo > 0"),
        ({"uniform": [0.1, 1], "log": "yes"}, "log must be true or false, got 'yes'"),
        ({"loguniform": [0.1, 1], "log": False}, "loguniform is log-scaled"),
        ({"int": [1.5, 4]}, "int takes whole-number bounds and step, got [1.5, 4]"),
        ({"int": [1, 4.0]}, "int takes whole-number bounds"),
        ({"int": [1, 5], "step": 1.5}, "int takes whole-number bounds and step"),
        ({"int": [1, 5], "step": 0}, "step must be a number > 0, got 0"),
        ({"uniform": [0, 1], "step": -0.1}, "step must be a number > 0, got -0.1"),
        ({"uniform": [0.1, 1], "log": True, "step": 0.1}, "log and step cannot be combined"),
        ({"loguniform": [0.1, 1], "step": 0.1}, "log and step cannot be combined"),
        ({"int": [2, 9], "step": 2}, "hi - lo (7) is not a multiple of step 2"),
        ({"uniform": [0.1, 0.35], "step": 0.1}, "is not a multiple of step 0.1"),
        ({"choice": []}, "choice takes a non-empty list of options, got []"),
        ({"choice": 3}, "choice takes a non-empty list"),
        ({"choice": [1, 2, 1]}, "choice repeats an option (1 and 1)"),
        ({"choice": [1, True]}, "choice repeats an option (1 and true)"),
        ({"choice": [[64, 64], [64, 64]]}, "choice repeats an option ([64, 64] and [64, 64])"),
        ({"choice": [1, 2], "log": True}, "choice takes no log"),
    ],
)
def test_bad_entry_is_one_line_naming_file_and_key(entry: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_space({KEY: entry}, SRC)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{SRC}: {KEY}: ")
    assert message in str(err.value)


@pytest.mark.parametrize("key", ["model..lr", "model.init-args.lr", "", 3, None])
def test_key_that_is_not_dotted_is_refused(key: Any) -> None:
    with pytest.raises(ConfigError) as err:
        parse_space({key: {"uniform": [0, 1]}}, SRC)
    assert str(err.value) == (f"{SRC}: {key!r} is not a dotted config key (model.init_args.lr)")


def test_optuna_rejection_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def reject(*args: Any, **kwargs: Any) -> None:
        raise ValueError("`low <= high` must hold")

    monkeypatch.setattr("slm_lightning.lab.space.FloatDistribution", reject)
    with pytest.raises(
        ConfigError, match=r"^space.yaml: model.init_args.lr: `low <= high` must hold$"
    ):
        parse_space({KEY: {"uniform": [0, 1]}}, SRC)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read the file"),
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- model.init_args.lr\n", "expected a mapping of dotted config keys to distributions"),
        ("{}\n", "the space has no keys"),
        ("model.init_args.lr: {uniform: [0, 1]\n", "not valid YAML at line 2"),
    ],
)
def test_unusable_file_is_one_line(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "space.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert "\n" not in str(err.value)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_exponent_without_a_dot_reads_as_a_number(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) would read 1e-4 as the string "1e-4"; the configs' parser does not.
    path = tmp_path / "space.yaml"
    path.write_text("model.init_args.lr: {loguniform: [1e-4, 1E-2]}\n")
    assert load_space(path).distributions[KEY] == FloatDistribution(1e-4, 1e-2, log=True)


# Values that a careless formatter would lose: 17 significant digits, an exponent, bool and
# None options, a string, a list option.
ROUND_TRIP_SPACE = {
    "model.init_args.lr": {"loguniform": [1.0e-6, 1.0e-2]},
    "model.init_args.gamma": {"uniform": [0.9, 0.999]},
    "model.init_args.training_epochs": {"int": [2, 10]},
    "model.init_args.normalize_advantages": {"choice": [True, False]},
    "model.init_args.max_grad_norm": {"choice": [None, 0.5]},
    "model.init_args.actor.activation": {"choice": ["tanh", "relu"]},
    "model.init_args.actor.hidden_sizes": {"choice": [[64, 64], [32, 16, 8]]},
}
ROUND_TRIP_PARAMS = {
    "model.init_args.lr": 1.2345678901234568e-05,
    "model.init_args.gamma": 0.9712345678901234,
    "model.init_args.training_epochs": 7,
    "model.init_args.normalize_advantages": False,
    "model.init_args.max_grad_norm": None,
    "model.init_args.actor.activation": "relu",
    "model.init_args.actor.hidden_sizes": "[32, 16, 8]",
}


@pytest.fixture(scope="module")
def round_trip() -> tuple[SearchSpace, dict[str, Any], ConfigFacts]:
    """The space, Optuna's params for one trial of it (enqueued, then asked as the search
    asks) and the PPO CartPole config parsed with the overrides: one parse, ~0.5 s."""
    space = parse_space(ROUND_TRIP_SPACE, SRC)
    study = optuna.create_study()
    study.enqueue_trial(ROUND_TRIP_PARAMS)
    params = study.ask(space.distributions).params
    facts = describe_config([str(REPO / "configs/ppo_cartpole.yaml")], space.overrides(params))
    return space, params, facts


def test_overrides_parse_back_to_exactly_the_sampled_values(round_trip) -> None:
    space, params, facts = round_trip
    assert params == ROUND_TRIP_PARAMS  # Optuna accepted every value as in its distribution
    values = space.values(params)
    assert values["model.init_args.actor.hidden_sizes"] == [32, 16, 8]
    for key, value in values.items():
        parsed = facts.values[key]
        assert parsed == value and type(parsed) is type(value), key
    assert space.overrides(params)[0] == "--model.init_args.lr=1.2345678901234568e-05"


def test_check_space_keys_on_a_parsed_config(round_trip) -> None:
    _, _, facts = round_trip
    config = "configs/ppo_cartpole.yaml"
    ok = {
        "model.init_args.gamma": {"uniform": [0.9, 0.99]},
        # recurrent is None there: fit's own parse checks what lies below it.
        "model.init_args.recurrent.hidden_size": {"choice": [32, 64]},
        "model.init_args.env.kwargs.sutton_barto_reward": {"choice": [True, False]},
        # The whole actor spec (a group of known keys) in one value.
        "model.init_args.actor": {"choice": [None, {"hidden_sizes": [32]}]},
    }
    check_space_keys(parse_space(ok, SRC), facts.values, config)
    typo = parse_space({"model.init_args.lrr": {"uniform": [0.001, 0.01]}}, SRC)
    with pytest.raises(ConfigError) as err:
        check_space_keys(typo, facts.values, config)
    assert str(err.value) == (
        "space.yaml: model.init_args.lrr is not a key of configs/ppo_cartpole.yaml; "
        "did you mean model.init_args.lr?"
    )
    # A key below a number is not a key, even though its parent is.
    below = parse_space({"model.init_args.gamma.start": {"uniform": [0.9, 0.99]}}, SRC)
    with pytest.raises(ConfigError, match=r"gamma.start is not a key of .*; did you mean"):
        check_space_keys(below, facts.values, config)


@pytest.mark.parametrize(
    "key", ["seed_everything", "trainer.default_root_dir", "ckpt_path", "config"]
)
def test_keys_the_search_sets_are_refused(key: str) -> None:
    space = parse_space({key: {"choice": [1, 2]}}, SRC)
    values = {"seed_everything": 0, "trainer.default_root_dir": None, "model.init_args.lr": 0.1}
    with pytest.raises(ConfigError) as err:
        check_space_keys(space, values, "c.yaml")
    assert str(err.value).startswith(f"space.yaml: {key} is set by the search itself")
    assert f"leave {key} out of the space" in str(err.value)


def test_group_of_known_keys_is_a_key() -> None:
    # lr is a Schedule in the config (lr.start, lr.end): a number in its place replaces it.
    values = {"model.init_args.lr.start": 5e-4, "model.init_args.lr.end": 0.0}
    check_space_keys(parse_space({KEY: {"uniform": [0.001, 0.01]}}, SRC), values, "c.yaml")
    with pytest.raises(ConfigError, match=r"did you mean model.init_args.lr.start\?"):
        check_space_keys(
            parse_space({"model.init_args.lr.strat": {"uniform": [0.001, 0.01]}}, SRC),
            values,
            "c.yaml",
        )


def test_grid_lists_every_value_and_the_grid_sampler_visits_each_point() -> None:
    space = parse_space(
        {
            "model.init_args.actor.hidden_sizes": {"choice": [[64, 64], [128]]},
            "model.init_args.num_minibatches": {"int": [2, 8], "step": 2},
            "model.init_args.clip_eps": {"uniform": [0.1, 0.3], "step": 0.05},
        },
        SRC,
    )
    grid = space.grid()
    assert grid == {
        "model.init_args.actor.hidden_sizes": ["[64, 64]", "[128]"],
        "model.init_args.num_minibatches": [2, 4, 6, 8],
        "model.init_args.clip_eps": [0.1, 0.15, 0.2, 0.25, 0.3],
    }
    assert space.size() == 2 * 4 * 5
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = set()
    for n in range(space.size()):
        trial = study.ask(space.distributions)
        values = space.values(trial.params)
        assert values["model.init_args.actor.hidden_sizes"] in ([64, 64], [128])
        seen.add(tuple(map(str, values.values())))
        if n < space.size() - 1:  # the last tell calls study.stop(), an error outside optimize
            study.tell(trial, 0.0)
    assert len(seen) == 40


def test_grid_refuses_a_continuous_range() -> None:
    space = parse_space(
        {
            "model.init_args.time_horizon": {"choice": [16, 32]},
            "model.init_args.lr": {"loguniform": [1.0e-4, 1.0e-2]},
        },
        "configs/search/x.yaml",
    )
    with pytest.raises(ConfigError) as err:
        space.grid()
    assert str(err.value) == (
        "--sampler grid: configs/search/x.yaml: model.init_args.lr is a continuous range; "
        "use {choice: [...]} or {int: [...]} for a grid"
    )
    assert space.size() is None


SHIPPED = sorted((REPO / "configs/search").glob("*.yaml"))


def test_a_space_ships_for_each_algorithm_family() -> None:
    assert {p.stem for p in SHIPPED} >= {
        "ppo_lunar",
        "ppo_cartpole",
        "a2c_cartpole",
        "dqn_cartpole",
        "sac_pendulum",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_checks_against_its_config_and_a_sample_instantiates(path: Path) -> None:
    assert path.read_text().startswith(f"# Search space for configs/{path.name}")
    space = load_space(path)
    config = str(REPO / "configs" / path.name)
    check_space_keys(space, describe_config([config], []).values, config)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(
        space.distributions
    )
    values = describe_config([config], space.overrides(trial.params)).values
    for key, value in space.values(trial.params).items():
        assert values[key] == value, key
