"""The run's loggers without a CLI: metrics.csv continued on a resume, the logger entries."""

import csv
from pathlib import Path

from jsonargparse import Namespace

from slm_lightning.loggers import RunCSVLogger, run_loggers


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_continued_metrics_file_keeps_its_rows_until_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    # eval/return_mean: a column the resumed session's first row does not have.
    path.write_text("episode/return_ma,eval/return_mean,step\n10.0,,100\n20.0,9.5,200\n30.0,,300\n")
    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    assert logger.metrics_file == path
    logger.continue_metrics_file()
    assert len(rows(path)) == 3  # nothing lost before the session logs

    # The session resumed from frame 200: the row of frame 300 came from a crashed session.
    logger.drop_rows_after(200)
    logger.log_metrics({"episode/return_ma": 25.0}, step=300)
    logger.save()
    assert rows(path) == [
        {"episode/return_ma": "10.0", "eval/return_mean": "", "step": "100"},
        {"episode/return_ma": "20.0", "eval/return_mean": "9.5", "step": "200"},
        {"episode/return_ma": "25.0", "eval/return_mean": "", "step": "300"},
    ]


def test_a_new_session_starts_the_file_afresh(tmp_path: Path) -> None:
    # Without continue_metrics_file, Lightning's behaviour: the old file is replaced.
    (tmp_path / "metrics.csv").write_text("step\n100\n")
    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    logger.log_metrics({"train/loss": 1.5}, step=50)
    logger.save()
    assert rows(tmp_path / "metrics.csv") == [{"train/loss": "1.5", "step": "50"}]


def test_run_loggers_makes_every_plain_csv_logger_ours(tmp_path: Path) -> None:
    run_dir = str(tmp_path)
    default = run_loggers(None, run_dir, "ppo", resolved_config=dict)
    assert default.class_path == "slm_lightning.loggers.RunCSVLogger"
    assert default.init_args == Namespace(save_dir=run_dir, name="", version="")

    given = Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="logs")
    )
    (entry,) = run_loggers([given], run_dir, "ppo", resolved_config=dict)
    assert entry.class_path == "slm_lightning.loggers.RunCSVLogger"  # no second CSV logger
    assert entry.init_args.save_dir == "logs"
    assert run_loggers(False, run_dir, "ppo", resolved_config=dict) is False
