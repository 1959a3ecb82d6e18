"""Every fixture spec of tests/fixtures/specs runs through SLM Lab's own command line, as its
users type it: ``slm-lab SPEC_FILE SPEC_NAME dev`` imports it with the real importer and
finishes a short fit in ``runs/<SPEC_NAME>/dev-<timestamp>/``."""

import json
from pathlib import Path

import pytest
import yaml

from slm_lightning.cli import main

SPECS = Path(__file__).parent / "fixtures" / "specs"

# (file, spec name, frames, extra arguments); a budget of a few rollouts of each spec.
RUNS = [
    ("v4_classic.json", "dqn_cartpole", 600, []),
    ("v4_classic.json", "reinforce_cartpole", 600, []),
    ("v4_classic.json", "ddqn_per_concat_lunar", 600, []),
    ("v4_ppo.json", "ppo_shared_cartpole", 1024, []),
    ("v4_ppo.json", "ppo_bipedalwalker", 8192, []),
    pytest.param("v4_ppo.json", "ppo_pong", 4096, [], marks=pytest.mark.slow),
    ("v5_anchors.yaml", "ppo_lunar", 2048, []),
    (
        "v5_families.json",
        "a2c_gae_cartpole",
        1024,
        ["-s", "env=CartPole-v1", "-s", "max_frame=5000"],
    ),
    ("v5_families.json", "sarsa_cartpole", 600, []),
    ("v5_families.json", "sac_pendulum", 1200, []),  # learning starts at 1000
]


@pytest.mark.parametrize(("file", "name", "frames", "extra"), RUNS)
def test_dev_mode_finishes_a_short_fit_of_each_spec(file, name, frames, extra, tmp_path) -> None:
    main([str(SPECS / file), name, "dev", *extra, f"--model.init_args.max_frames={frames}"])
    (folder,) = (tmp_path / "runs" / name).glob("dev-*")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["frames"] >= frames
    # The run folder holds the imported config and its report beside the run.
    header = (folder / f"{name}.yaml").read_text().splitlines()[0]
    assert header.startswith("# Imported by `slm-lab import` from ")
    assert f"{SPECS / file} ({name}, SLM Lab v" in header
    assert yaml.safe_load((folder / "config.yaml").read_text())["metrics"]["print_metrics"]
    assert (folder / "import.txt").read_text().startswith("exact:")


def test_search_mode_runs_the_specs_search_section(tmp_path) -> None:
    # v4 grid search over lam (-> gae_lambda) and training_frequency (which PPO has no use for
    # here: reported), two trials of one session instead of the spec's 8 x 4.
    main([str(SPECS / "v4_ppo.json"), "ppo_shared_cartpole", "search", "--trials", "2",
          "--sessions", "1", "--progress-every", "0", "--model.init_args.max_frames=1024"])  # fmt: skip
    (folder,) = (tmp_path / "runs" / "ppo_shared_cartpole").glob("search-*")
    assert yaml.safe_load((folder / "space.yaml").read_text()) == {
        "model.init_args.gae_lambda": {"choice": [0.9, 0.95]}
    }
    assert "training_frequency__grid_search" in (folder / "import.txt").read_text()
    rows = (folder / "study.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",COMPLETE," in row for row in rows[1:])
    assert {row.split(",")[3] for row in rows[1:]} <= {"0.9", "0.95"}
    assert (folder / "best.yaml").is_file()
