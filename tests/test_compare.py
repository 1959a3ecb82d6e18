"""``slm-lab compare`` on tiny hand-written trial and run folders: the table's figures against
hand computation, the probability of improvement with ties, and the one-line errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from slm_lightning import cli as cli_module
from slm_lightning.errors import ConfigError
from slm_lightning.lab import compare
from slm_lightning.lab.compare import COLUMNS, compare_main, probability_of_improvement

FRAMES = (1000, 2000, 3000)


def write_session(folder: Path, return_ma, *, seconds=(1, 2, 4), frames_to_target=None) -> None:
    folder.mkdir(parents=True)
    lines = ["episode/return_ma,rollout/frames,rollout/seconds,rollout/updates"]
    for ma, f, s in zip(return_ma, FRAMES, seconds, strict=True):
        lines.append(f"{'' if ma is None else ma},{f},{s},{f // 100}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    summary = {"algorithm": "?", "frames_to_target": frames_to_target, "status": "finished"}
    (folder / "summary.json").write_text(json.dumps(summary))


def write_trial(
    folder: Path, algorithm: str, env: str, sessions: list[dict], overrides: tuple = ()
) -> Path:
    """A trial folder: ``session-<i>/`` run folders and ``trial.json`` naming them."""
    for index, session in enumerate(sessions):
        write_session(folder / f"session-{index}", **session)
    info = {
        "config": f"configs/{algorithm.lower()}_cartpole.yaml",
        "name": f"{algorithm.lower()}_cartpole",
        "algorithm": algorithm,
        "env": env,
        "target_return": 100.0,
        "random_return": 10.0,
        "overrides": list(overrides),
        "seeds": list(range(len(sessions))),
        "sessions": [{"seed": i, "folder": f"session-{i}"} for i in range(len(sessions))],
    }
    (folder / "trial.json").write_text(json.dumps(info))
    return folder


@pytest.fixture
def ppo(tmp_path: Path) -> Path:
    # Final return MA 50, 100, 80, 120; sessions 1 and 3 reach the target 100 (the summary's
    # exact frames: 2900 and 1800); session 3 trains at 3000 frames / 3 s, the others / 4 s.
    return write_trial(
        tmp_path / "ppo",
        "PPO",
        "CartPole-v1",
        [
            {"return_ma": (None, 20, 50)},
            {"return_ma": (30, 60, 100), "frames_to_target": 2900},
            {"return_ma": (40, 70, 80)},
            {"return_ma": (50, 110, 120), "seconds": (1, 2, 3), "frames_to_target": 1800},
        ],
    )


@pytest.fixture
def dqn(tmp_path: Path) -> Path:
    # Final return MA 100 and 50: each ties one PPO session. The third session never finished
    # an episode: it counts in N, and has no return.
    return write_trial(
        tmp_path / "dqn",
        "DQN",
        "CartPole-v1",
        [
            {"return_ma": (60, 90, 100), "frames_to_target": 2500},
            {"return_ma": (10, 30, 50)},
            {"return_ma": (None, None, None)},
        ],
        overrides=("--model.init_args.lr=0.001",),
    )


def table_rows(text: str) -> list[dict[str, str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == list(COLUMNS)
    return [
        dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
        for row in rows[1:]
    ]


def numbers(cell: str) -> list[float]:
    return [
        float(x)
        for x in cell.replace("[", " ")
        .replace("]", " ")
        .replace(",", " ")
        .replace("±", " ")
        .split()
    ]


def test_probability_of_improvement_by_hand_with_ties():
    # Pairs (x, y): 100 beats 50 and 80, ties 100, loses to 120; 50 ties 50, loses to the rest.
    x, y = np.array([100.0, 50.0]), np.array([50.0, 100.0, 80.0, 120.0])
    assert probability_of_improvement(x, y) == pytest.approx((2 + 0.5 * 2) / 8)
    assert probability_of_improvement(y, x) == pytest.approx((4 + 0.5 * 2) / 8)
    assert probability_of_improvement(x, x) == 0.5
    assert probability_of_improvement(np.array([3.0]), np.array([1.0, 2.0])) == 1.0
    assert math.isnan(probability_of_improvement(np.array([]), y))


def test_compare_two_trials_table_and_plot(ppo: Path, dqn: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    compare_main([str(ppo), str(dqn), "--out", str(out)])
    text = (out / "compare.md").read_text()
    assert capsys.readouterr().out.strip() == "\n".join(
        line for line in text.splitlines() if line.startswith("|")
    )
    first, second = table_rows(text)

    assert (first["algorithm"], first["config"], first["sessions"]) == ("PPO", "ppo_cartpole", "4")
    # IQM of 50, 80, 100, 120: int(0.25 * 4) = 1 cut at each end -> (80 + 100) / 2.
    iqm, low, high = numbers(first["final return IQM [95% CI]"])
    assert iqm == 90.0 and 50.0 <= low <= iqm <= high <= 120.0
    mean, std = numbers(first["mean ± std"])
    assert mean == 87.5 and std == pytest.approx(math.sqrt(2675 / 3), abs=0.05)
    assert first["solved"] == "2/4"
    assert first["median frames to target"] == "2350"  # median of the summaries' 2900, 1800
    assert first["fps"] == "750"  # median of 750, 750, 750, 1000
    # Strength: mean over sessions of mean(R_i - 10): 25, 53.33, 53.33, 83.33.
    assert float(first["strength"]) == pytest.approx(53.75, abs=0.05)
    assert first["P(improve)"] == "–"

    # Two returns: IQM = mean, and the bootstrap interval is [min, max] (see test_lab_plots).
    assert (second["config"], second["sessions"]) == ("dqn_cartpole lr=0.001", "3")
    assert numbers(second["final return IQM [95% CI]"]) == [75.0, 50.0, 100.0]
    assert second["solved"] == "1/3"
    assert second["median frames to target"] == "2500"
    assert second["P(improve)"] == f"{(2 + 0.5 * 2) / 8:.2f}"

    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_a_single_run_folder(ppo: Path, tmp_path: Path, monkeypatch):
    run = tmp_path / "runs" / "ppo_cartpole" / "2030_01_01_000000"
    write_session(run, (None, 15, 110), frames_to_target=2700)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(algorithm="PPO", env="CartPole-v1", target_return=100.0)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(
        "model:\n  class_path: slm_lightning.algorithms.PPO\n  init_args:\n"
        "    env:\n      name: CartPole-v1\n      num_envs: 4\n"
    )
    asked = []
    monkeypatch.setattr(compare, "_random_return_of_run", lambda f: asked.append(f) or 10.0)
    out = tmp_path / "out"
    compare_main([str(run), str(ppo), "--out", str(out)])
    assert asked == [run]
    first, second = table_rows((out / "compare.md").read_text())
    assert (first["algorithm"], first["config"], first["sessions"]) == ("PPO", "ppo_cartpole", "1")
    assert first["mean ± std"] == "110.0 ± –"  # one session has no spread
    assert first["consistency"] == "–"
    assert first["solved"] == "1/1" and first["median frames to target"] == "2700"
    assert float(first["strength"]) == pytest.approx(((15 - 10) + (110 - 10)) / 2, abs=0.05)
    # PPO's four sessions against the run's 110: only 120 is above it.
    assert second["P(improve)"] == f"{1 / 4:.2f}"


def test_compare_of_different_envs_is_one_line_and_exit_2(ppo: Path, tmp_path: Path, capsys):
    acrobot = write_trial(tmp_path / "acrobot", "PPO", "Acrobot-v1", [{"return_ma": (1, 2, 3)}])
    message = f"compare: {ppo} is CartPole-v1 but {acrobot} is Acrobot-v1; compare runs of one env"
    with pytest.raises(ConfigError) as err:
        compare_main([str(ppo), str(acrobot), "--out", str(tmp_path / "out")])
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit) as exc:
        cli_module.main(["compare", str(ppo), str(acrobot), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "compare: give at least one trial or run folder"),
        (["{tmp}"], "compare: {tmp} is neither a trial folder (trial.json) nor a run folder"),
        (["{tmp}", "--bins", "3"], "compare: unknown argument --bins"),
    ],
)
def test_compare_bad_arguments(tmp_path: Path, argv: list[str], message: str):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(ConfigError) as err:
        compare_main(argv)
    assert str(err.value).startswith(message.format(tmp=tmp_path))
