"""Evaluation during fit (PeriodicEval): rows on the frame clock, values equal to the shared
episode player's, training untouched, the schedule across a resume, bad settings."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slm_lightning.callbacks import PeriodicEval
from slm_lightning.callbacks import run_summary as run_summary_module
from slm_lightning.cli import main
from slm_lightning.data.evaluation import evaluation_env_spec, play_episodes
from slm_lightning.envs.factory import make_vector_env
from slm_lightning.lab.plots import metrics_figure
from slm_lightning.lab.runs import FRAMES, RETURN_MA, read_metrics, read_run
from tests.cli_helpers import recording_cli

# PPO on the Corridor: 2 envs x 16 steps, so the frame clock moves by 32 a rollout.
ROLLOUT = 32
CONFIG = {
    "seed_everything": 3,
    "trainer": {"accelerator": "cpu"},
    "model": {
        "class_path": "slm_lightning.algorithms.PPO",
        "init_args": {
            "env": {"name": "tests.envs_fixture:Corridor-v0", "num_envs": 2},
            "max_frames": 288,
            "time_horizon": 16,
            "training_epochs": 2,
            "num_minibatches": 1,
            "actor": {"hidden_sizes": [8]},
            "critic": {"hidden_sizes": [8]},
        },
    },
    "metrics": {"log_frequency": 64, "window": 10},
    "checkpoint": {"every_n_frames": 1000},
    "progress": {"interval": 60.0},
}
# Sampled actions: the Corridor's episodes then differ in length (and some time out).
EVAL = ["--eval.frequency=100", "--eval.episodes=3", "--eval.greedy=false"]
EVAL_KEYS = {"eval/return_mean", "eval/return_std", "eval/length_mean"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "corridor.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def eval_rows(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [row for row in rows if "eval/return_mean" in row]


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_evaluation_rows_at_the_frame_clock_hold_the_played_episodes(
    config, run_fit, monkeypatch
) -> None:
    """frequency 100 on a clock moving by 32: evaluations after the rollouts ending at 128
    (first >= 100) and 224 (first >= 200), and at the budget's last frame 288 when training
    ends. The last row's figures equal the shared player's on the final weights with the
    algorithm's evaluation seed; the rows reach metrics.png and returns.png, and the eval env
    is closed."""
    drawn: list = []
    plot_returns = run_summary_module.plot_returns
    monkeypatch.setattr(
        run_summary_module,
        "plot_returns",
        lambda *args: drawn.append(args[5]) or plot_returns(*args),
    )
    run = run_fit(*EVAL, config=config)
    rows = eval_rows(run.rows)
    assert [row["rollout/frames"] for row in rows] == [128, 224, 288]
    assert [row["step"] for row in rows] == [128, 224, 288]
    assert all(set(row) == {*EVAL_KEYS, "rollout/frames", "step"} for row in rows)
    # The training rows are as without evaluation: every 64 frames.
    assert [r["rollout/frames"] for r in run.rows if RETURN_MA in r or "rollout/fps" in r] == [
        64 * i for i in range(1, 5)
    ] + [288]

    model = run.model
    callback = next(c for c in run.trainer.callbacks if isinstance(c, PeriodicEval))
    assert callback.env is None  # closed at fit end
    seed = model.evaluation_seed()
    env = make_vector_env(evaluation_env_spec(model.env_spec, 3, in_process=True), seed=seed)
    model.eval()
    torch.manual_seed(999)  # the global stream is not what the evaluation drew from
    try:
        returns, lengths = play_episodes(model, env, seed, 3, greedy=False)
    finally:
        env.close()
    assert len(set(lengths.tolist())) > 1  # sampled episodes: the check below is not trivial
    assert rows[-1]["eval/return_mean"] == pytest.approx(returns.mean(), abs=1e-12)
    assert rows[-1]["eval/return_std"] == pytest.approx(returns.std(), abs=1e-12)
    assert rows[-1]["eval/length_mean"] == pytest.approx(lengths.mean(), abs=1e-12)

    record = read_run(run.run_dir)
    fig = metrics_figure(record, "t")
    (panel,) = [ax for ax in fig.axes if [t.get_text() for t in ax.texts] == ["eval/return_mean"]]
    np.testing.assert_array_equal(panel.lines[0].get_xdata(), [128, 224, 288])
    ((x, y),) = drawn
    np.testing.assert_array_equal(x, [128, 224, 288])
    np.testing.assert_array_equal(y, [row["eval/return_mean"] for row in rows])


def test_evaluation_leaves_training_as_it_was_and_is_off_by_default(config, run_fit) -> None:
    """Two fits with one seed, the second evaluating with sampled actions every 64 frames:
    bit-identical final weights and training rows. The first, with no eval settings, logs no
    eval column."""
    plain = run_fit(config=config, run_dir="plain")
    assert not any(key.startswith("eval/") for row in plain.rows for key in row)
    evaluated = run_fit(
        "--eval.frequency=64", "--eval.episodes=4", "--eval.greedy=false", config=config
    )
    assert len(eval_rows(evaluated.rows)) == 288 // 64 + 1
    before, after = parameters(plain.model), parameters(evaluated.model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    volatile = {"rollout/fps", "rollout/seconds"}

    def training(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [
            {k: v for k, v in row.items() if k not in volatile}
            for row in rows
            if "eval/return_mean" not in row
        ]

    assert training(evaluated.rows) == training(plain.rows)


def test_a_resume_continues_the_evaluation_schedule(config, run_fit) -> None:
    """Budget 160, then resumed to 288, then resumed again at 288: evaluations at 128 and
    at the end (160), then at 224 and at the end (288), and none more: the resumed session
    neither repeats the evaluation at its starting frame nor misses the one due next."""
    run_fit(*EVAL, "--model.init_args.max_frames=160", config=config)
    run_fit(*EVAL, "--ckpt_path=last", config=config)
    again = run_fit(*EVAL, "--ckpt_path=last", config=config)
    assert [row["rollout/frames"] for row in eval_rows(again.rows)] == [128, 160, 224, 288]


def test_the_evaluation_env_is_closed_when_training_fails(config, tmp_path) -> None:
    """A training env that raises at frame ~200, after the evaluation at 128 built its env:
    the failure ends fit and the evaluation env is closed on the way out."""
    crash = tmp_path / "crash"
    crash.touch()
    kwargs = f"{{crash_seed: 3, crash_file: '{crash}', fail_after: 100}}"
    env = f"{{name: 'tests.envs_fixture:FaultyCorridor-v0', num_envs: 2, kwargs: {kwargs}}}"
    with recording_cli() as made, pytest.raises(RuntimeError, match="sensor failed"):
        main(["fit", "--config", str(config), *EVAL, f"--model.init_args.env={env}",
              f"--trainer.default_root_dir={tmp_path / 'run'}"])  # fmt: skip
    callback = next(c for c in made[0].trainer.callbacks if isinstance(c, PeriodicEval))
    assert callback.last_eval == 128 and callback.env is None


def test_read_metrics_training_only_leaves_out_the_evaluation_rows(tmp_path: Path) -> None:
    """A trial's progress line and a search's pruner read the training rows: the last row, or
    the first past a frame, must not be an evaluation row (no return MA)."""
    path = tmp_path / "metrics.csv"
    path.write_text(
        "episode/return_ma,eval/return_mean,rollout/frames,step\n"
        "1.0,,64,64\n"
        ",5.0,100,100\n"
        "2.0,,128,128\n"
        ",6.0,128,128\n"
    )
    every = read_metrics(path)
    np.testing.assert_array_equal(every[FRAMES], [64, 100, 128, 128])
    training = read_metrics(path, training_only=True)
    np.testing.assert_array_equal(training[FRAMES], [64, 128])
    np.testing.assert_array_equal(training[RETURN_MA], [1.0, 2.0])


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        ("--eval.frequency=-1", "eval.frequency: must be >= 0, got -1"),
        ("--eval.episodes=0", "eval.episodes: must be > 0, got 0"),
    ],
)
def test_bad_evaluation_settings_get_one_line_and_status_2(
    config, arg, line, capsys, tmp_path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), arg])
    assert exc.value.code == 2
    errors = re.findall(r"ERROR\s+(.*)", capsys.readouterr().err)
    assert errors == [line]
    assert not (tmp_path / "runs").exists()


def test_the_callback_rejects_bad_settings_when_built_in_code() -> None:
    with pytest.raises(ValueError, match=r"^eval\.frequency must be >= 0"):
        PeriodicEval(frequency=-5)
    with pytest.raises(ValueError, match=r"^eval\.episodes must be >= 1"):
        PeriodicEval(frequency=10, episodes=0)
