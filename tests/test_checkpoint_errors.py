"""Bad ``--ckpt_path`` / ``--warm_start`` checkpoints: one line, exit 2, nothing written; and
warm start, which takes another run's weights but none of its counters."""

import contextlib
import re
from pathlib import Path

import pytest
import torch

from slm_lightning.callbacks import MetricsTracker
from slm_lightning.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
PPO = ["--config", str(CONFIGS / "ppo_cartpole.yaml"), "--model.init_args.env.num_envs=4"]
PPO += ["--model.init_args.time_horizon=32", "--metrics.log_frequency=128"]
DQN = ["--config", str(CONFIGS / "dqn_cartpole.yaml"), "--model.init_args.env.num_envs=4"]
DQN += ["--model.init_args.learning_starts=200", "--metrics.log_frequency=200"]
ERROR_LINE = re.compile(r"^\S+ ERROR +(.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A short PPO and a short DQN run on CartPole; tests copy from them, never write them."""
    root = tmp_path_factory.mktemp("sources")
    with contextlib.chdir(root), pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["slm-lab"])
        main(["fit", *PPO, f"--trainer.default_root_dir={root / 'ppo'}", "--model.max_frames=512"])
        main(["fit", *DQN, f"--trainer.default_root_dir={root / 'dqn'}", "--model.max_frames=400"])
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("ppo", "dqn")}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["slm-lab"])


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def fails_with_one_line(args: list[str], root: Path, capsys) -> str:
    """Run ``slm-lab fit``; assert exit 2, one error line and no file created or changed."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = ERROR_LINE.findall(captured.err)
    assert len(errors) == 1, captured.err
    assert snapshot(root) == before
    assert not (root / "runs").exists(), "a failed start created a run folder"
    return errors[0]


@pytest.fixture
def existing_run(isolated_run: Path, sources) -> Path:
    """A run folder whose checkpoint a bad command points at: it must stay untouched."""
    run = isolated_run / "old"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("step\n1\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(sources["ppo"].read_bytes())
    return run


def test_truncated_checkpoint(existing_run, isolated_run, capsys) -> None:
    bad = isolated_run / "truncated.ckpt"
    data = (existing_run / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    line = fails_with_one_line([*PPO, f"--ckpt_path={bad}"], isolated_run, capsys)
    assert "ckpt_path" in line and "truncated.ckpt" in line and "corrupt or truncated" in line


def test_unreadable_and_foreign_files(isolated_run, capsys) -> None:
    corrupt = isolated_run / "corrupt.ckpt"  # a zip directory whose members are garbage
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, corrupt)
    data = bytearray(corrupt.read_bytes())
    data[200:600] = b"\x00" * 400
    corrupt.write_bytes(bytes(data))
    line = fails_with_one_line([*PPO, f"--ckpt_path={corrupt}"], isolated_run, capsys)
    assert "ckpt_path" in line and "not a readable checkpoint" in line

    plain = isolated_run / "weights.pt"  # torch.save of a bare state_dict, not Lightning's
    torch.save({"policy.weight": torch.zeros(2)}, plain)
    line = fails_with_one_line([*PPO, f"--ckpt_path={plain}"], isolated_run, capsys)
    assert "not a Lightning checkpoint" in line


def test_other_algorithm(sources, isolated_run, capsys) -> None:
    line = fails_with_one_line([*PPO, f"--ckpt_path={sources['dqn']}"], isolated_run, capsys)
    assert "written by DQN (CartPole-v1)" in line and "trains PPO" in line


def test_checkpoint_of_the_older_layout(sources, isolated_run, capsys) -> None:
    """A checkpoint whose rollout state Lightning kept (loops.fit_loop.state_dict.
    combined_loader, no "rollout") cannot be resumed; the line says so and names warm start."""
    ckpt = torch.load(sources["ppo"], weights_only=False, map_location="cpu")
    fit_loop = ckpt["loops"]["fit_loop"]["state_dict"]
    assert not fit_loop.get("combined_loader")  # Lightning no longer saves the rollout
    fit_loop["combined_loader"] = [ckpt.pop("rollout")]
    old = isolated_run / "old-layout.ckpt"
    torch.save(ckpt, old)
    line = fails_with_one_line([*PPO, f"--ckpt_path={old}"], isolated_run, capsys)
    assert line == (
        f"ckpt_path: {old} was written by an older slm_lightning and cannot be resumed; "
        "its weights may still be loaded into a new run with --warm_start"
    )


def test_other_spaces(existing_run, isolated_run, capsys) -> None:
    ckpt = existing_run / "checkpoints" / "last.ckpt"
    acrobot = ["--model.init_args.env.name=Acrobot-v1", "--model.init_args.env.vectorization=sync"]
    args = [*PPO, *acrobot, f"--ckpt_path={ckpt}"]
    line = fails_with_one_line(args, isolated_run, capsys)
    assert "does not fit PPO on Acrobot-v1" in line
    assert "policy.actor_body.0.weight (64, 4) vs (64, 6)" in line


@pytest.mark.parametrize(
    ("option", "saved"),
    [
        ("env.num_envs=2", "env.num_envs=4"),
        ("n_steps=1", "n_steps=3"),
        ("memory_size=1000", "memory_size=200000"),
    ],
)
def test_other_replay_layout(option, saved, sources, isolated_run, capsys) -> None:
    args = [*DQN, f"--model.init_args.{option}", f"--ckpt_path={sources['dqn']}"]
    line = fails_with_one_line(args, isolated_run, capsys)
    assert line == (
        f"ckpt_path: the replay memory in {sources['dqn']} has {saved}, this config "
        f"model.init_args.{option}; they must match to resume"
    )


def test_best_without_a_run(isolated_run, capsys) -> None:
    line = fails_with_one_line([*PPO, "--ckpt_path=best"], isolated_run, capsys)
    assert "ckpt_path=best" in line and "runs/ppo_cartpole/*/checkpoints/best.ckpt" in line


def test_warm_start_errors(sources, existing_run, isolated_run, capsys) -> None:
    line = fails_with_one_line([*PPO, f"--warm_start={sources['dqn']}"], isolated_run, capsys)
    assert line.startswith("warm_start:") and "does not fit PPO" in line and "missing" in line
    missing = isolated_run / "nope.ckpt"
    line = fails_with_one_line([*PPO, f"--warm_start={missing}"], isolated_run, capsys)
    assert line == f"warm_start: no checkpoint file at {missing}"
    ckpt = existing_run / "checkpoints" / "last.ckpt"
    both = [*PPO, f"--warm_start={ckpt}", f"--ckpt_path={ckpt}"]
    assert "exclude each other" in fails_with_one_line(both, isolated_run, capsys)


def test_warm_start_takes_weights_but_no_counters(sources, isolated_run) -> None:
    source = torch.load(sources["ppo"], weights_only=False, map_location="cpu")
    run = isolated_run / "warm"
    # lr 0: Adam leaves the weights where the warm start put them.
    main(["fit", *PPO, f"--trainer.default_root_dir={run}", "--model.max_frames=256",
          "--model.init_args.lr=0.0", f"--warm_start={sources['ppo']}"])  # fmt: skip
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    for key, tensor in source["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][key], tensor), key
    rollout = ckpt["rollout"]
    assert rollout["frames"] == 256 and rollout["rollouts"] == 2  # counted from 0, not 512
    assert ckpt["global_step"] == 2 * 6 * 2  # rollouts x training_epochs x num_minibatches
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {float(ckpt["global_step"])}  # fresh Adam moments
    tracker = ckpt["callbacks"][MetricsTracker().state_key]
    assert tracker["history"]["frames"] and min(tracker["history"]["frames"]) <= 256
    assert sources["ppo"].is_file()
