"""The frame-clock progress display: status lines in a log, a tqdm bar in a terminal."""

import re
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from slm_lightning.callbacks import FrameProgressBar
from slm_lightning.cli import main
from tests.cli_helpers import instantiate

ROOT = Path(__file__).parents[1]
PPO_CARTPOLE = str(ROOT / "configs" / "ppo_cartpole.yaml")
# ppo_cartpole: 64 envs x 16 steps = 1024 frames per rollout cycle; 6 cycles.
FIT = ["fit", "--config", PPO_CARTPOLE, "--model.init_args.max_frames=6144"]
STATUS = re.compile(
    r"progress: frames=(\d+)/6144 \((\d+\.\d)%\) fps=(\d+) episodes=(\d+) "
    r"return_ma=\S+ (?:best_return_ma=\S+ )?eta=(\d+:\d\d:\d\d)$",
    re.MULTILINE,
)


def test_status_lines_when_stderr_is_not_a_terminal(capsys) -> None:
    main([*FIT, "--progress.interval=1e-6"])  # capsys' stderr is not a terminal

    err = capsys.readouterr().err
    lines = STATUS.findall(err)
    frames = [int(line[0]) for line in lines]
    # A line after every cycle, as the interval is shorter than one: 1024, 2048, … frames.
    assert frames == [1024 * i for i in range(1, 7)]
    assert [float(line[1]) for line in lines] == [16.7, 33.3, 50.0, 66.7, 83.3, 100.0]
    assert all(int(line[2]) > 0 for line in lines)
    episodes = [int(line[3]) for line in lines]
    assert episodes == sorted(episodes) and episodes[-1] > 0
    assert lines[-1][4] == "0:00:00"  # nothing left
    assert "frames/s" not in err  # no bar


@pytest.mark.parametrize(
    "extra", [[], ["--trainer.enable_progress_bar=false", "--progress.interval=1e-6"]]
)
def test_no_status_line_within_the_interval_or_when_disabled(extra, capsys) -> None:
    main([*FIT, *extra])  # the default interval (30 s) is longer than this run
    err = capsys.readouterr().err
    assert "progress:" not in err and "frames/s" not in err
    assert "summary: frames=6144" in err


def test_terminal_bar_counts_frames(capsys) -> None:
    main([*FIT, "--progress.terminal=true"])

    err = capsys.readouterr().err
    assert "progress:" not in err
    # tqdm redraws the line in place; its last state is the whole budget.
    last = err.split("summary:")[0].replace("\n", "\r").split("\r")
    final = [line for line in last if line.startswith("PPO:")][-1]
    assert re.match(r"PPO: 100%\|█+\| 6\.14k/6\.14k \[\S+, \S+ frames/s, episodes=\d+", final)
    assert re.search(r"return_ma=[\d.]+", final)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], FrameProgressBar),
        (["--trainer.enable_progress_bar=false"], type(None)),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], TQDMProgressBar),
    ],
    ids=["default", "disabled", "user's own bar"],
)
def test_frame_bar_is_the_trainers_progress_bar(extra, expected) -> None:
    cli = instantiate(["--config", PPO_CARTPOLE, *extra])
    assert type(cli.trainer.progress_bar_callback) is expected


def test_interval_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*FIT, "--progress.interval=0"])
    assert exc.value.code == 2
    assert "progress.interval must be > 0 seconds, got 0" in capsys.readouterr().err
