"""Stopping never hangs and never loses data, with env worker processes (``blocks``, ``async``).

SIGTERM, SIGINT (once: at the end of the rollout cycle; twice: at once; Ctrl-C to the whole
process group) and an exception mid-fit end the process within seconds with status 143, 130
or 1, a finite ``last.ckpt`` that ``--ckpt_path last`` resumes to the budget, flushed metrics,
and no worker process left. The process boundary matters for exit statuses and for what the
interpreter waits on at exit, so those runs are subprocesses; the rest runs in-process.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from slm_lightning.callbacks import FrameCheckpoint
from slm_lightning.callbacks.checkpoint import SIGINTException
from slm_lightning.cli import SLMLabCLI
from slm_lightning.envs.factory import EnvSpec, make_vector_env
from tests.cli_helpers import recording_cli, run_main

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "ppo_cartpole.yaml"
NUM_ENVS, HORIZON, EPOCHS, MINIBATCHES = 4, 32, 2, 2
ROLLOUT = NUM_ENVS * HORIZON  # frames per rollout cycle (one Lightning epoch)
STEPS_PER_ROLLOUT = EPOCHS * MINIBATCHES
# What FrameCheckpoint.on_train_start reads, for the unit tests of its signal handler.
NO_TRAINER = SimpleNamespace(ckpt_path=None)
NO_MODULE = SimpleNamespace(frames=0)
EXIT_BOUND_S = 45  # from the signal to the exit; the runs take ~2 s here, a hang takes for ever


def small(mode: str) -> list[str]:
    return [
        f"--model.init_args.env.vectorization={mode}",
        f"--model.init_args.env.num_envs={NUM_ENVS}",
        f"--model.init_args.time_horizon={HORIZON}",
        f"--model.init_args.training_epochs={EPOCHS}",
        f"--model.init_args.num_minibatches={MINIBATCHES}",
        "--metrics.log_frequency=512",
    ]


class FailAtEpoch(Callback):
    """Raises RuntimeError at the end of the ``epoch``-th rollout cycle (test only)."""

    def __init__(self, epoch: int = 5) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epoch:
            raise RuntimeError("callback failed")


class SigintTwiceMidEpoch(Callback):
    """Sends this process SIGINT twice before the first update of the second rollout cycle, and
    records the env's worker processes (test only)."""

    def __init__(self) -> None:
        self.worker_pids: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.worker_pids = [p.pid for p in pl_module.rollout.env.unwrapped.processes]
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs here; the second one raises


class InterruptAtEpoch(Callback):
    """Raises KeyboardInterrupt at the end of the first rollout cycle (test only)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise KeyboardInterrupt


def fit(run: Path, mode: str, *extra: str) -> SLMLabCLI:
    """``slm-lab fit`` in-process through ``main``; returns the CLI object."""
    return run_main(
        ["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={run}", *small(mode)]
        + list(extra)
    )


def children(pid: int) -> list[int]:
    return [
        int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()
    ]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: only its exit status waits to be read)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def last_checkpoint(run: Path) -> tuple[dict, int]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    state = ckpt["rollout"]
    return ckpt, state["frames"]


def assert_resumes_to_budget(run: Path, mode: str, frames: int) -> None:
    budget = frames + 2 * ROLLOUT
    fit(run, mode, "--ckpt_path=last", f"--model.init_args.max_frames={budget}")
    summary = (run / "summary.json").read_text()
    assert f'"start_frames": {frames},' in summary and f'"frames": {budget},' in summary, summary


# --- the signal handler ----------------------------------------------------------------------


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_second_sigint_stops_now_and_later_signals_are_ignored(tmp_path, restore_signals) -> None:
    checkpoint = FrameCheckpoint(dirpath=str(tmp_path))
    checkpoint.on_train_start(NO_TRAINER, NO_MODULE)  # installs the handlers (dirpath set)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert checkpoint.stop_signal == signal.SIGINT and not checkpoint.stopping
    with pytest.raises(SIGINTException) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert stopped.value.code == 130 and checkpoint.stopping
    os.kill(os.getpid(), signal.SIGINT)  # during the shutdown: ignored
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert checkpoint.stop_signal == signal.SIGINT


def test_forked_child_leaves_the_trainer_signals_alone(tmp_path, restore_signals) -> None:
    """A forked child inherits the handler: SIGINT must not reach its flag, SIGTERM must end it."""
    checkpoint = FrameCheckpoint(dirpath=str(tmp_path))
    checkpoint.on_train_start(NO_TRAINER, NO_MODULE)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGINT)
        child.join(0.5)
        assert child.is_alive()  # SIGINT is the trainer's to handle
        child.terminate()
        child.join(10)
        assert not child.is_alive() and child.exitcode == -signal.SIGTERM
    finally:
        kill_all([child.pid])
    assert checkpoint.stop_signal is None  # the parent's state is untouched


@pytest.mark.parametrize("mode", ["blocks", "async"])
def test_env_workers_leave_the_trainer_signals_alone(mode: str, restore_signals) -> None:
    """Workers forked under Python's SIGINT handler (a KeyboardInterrupt in the worker) and a
    flag-setting SIGTERM handler (Lightning's is one) ignore SIGINT and exit on SIGTERM."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    env = make_vector_env(EnvSpec(num_envs=4, vectorization=mode, num_workers=2), seed=0)
    processes = env.unwrapped.processes
    try:
        for process in processes:
            os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)
        env.step(env.action_space.sample())  # every worker still serves
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(10)
        assert [p.exitcode for p in processes] == [-signal.SIGTERM] * len(processes)
    finally:
        kill_all([p.pid for p in processes])


# --- whole runs ------------------------------------------------------------------------------


# (vectorization, how it is stopped, exit status)
CASES = [
    ("blocks", "SIGTERM", 143),  # preemption, to the trainer alone; with W&B (offline)
    ("async", "Ctrl-C", 130),  # SIGINT to the process group, workers included
    ("blocks", "exception", 1),  # a callback raises in the main process
]


@pytest.mark.parametrize(("mode", "how", "status"), CASES, ids=[c[1] for c in CASES])
def test_stopped_run_exits_in_time_and_resumes(mode: str, how: str, status: int, tmp_path) -> None:
    run = tmp_path / "run"
    extra = {
        "SIGTERM": ["--config", str(ROOT / "callbacks" / "wandb.yaml")],
        "exception": ["--trainer.callbacks+=tests.test_stopping.FailAtEpoch"],
    }.get(how, [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "slm_lightning.cli", "fit", "--config", str(CONFIG),
           f"--trainer.default_root_dir={run}", *small(mode),
           "--model.init_args.max_frames=100000000", *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").is_file():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        workers = children(proc.pid)
        assert len(workers) >= 2, workers  # the env's workers (and W&B's service)
        start = time.monotonic()
        if how == "SIGTERM":
            os.kill(proc.pid, signal.SIGTERM)
        elif how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=EXIT_BOUND_S)
        seconds = time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running {EXIT_BOUND_S} s after {how}:\n{out[-3000:]}")
    finally:
        kill_all([proc.pid, *workers])
    assert proc.returncode == status, out[-3000:]
    assert not [pid for pid in workers if alive(pid)], "a child process outlived the run"
    print(f"{how}: exited {seconds:.1f} s after the signal")
    reason = {"SIGTERM": "SIGTERM", "Ctrl-C": "SIGINT"}.get(how, "the error")
    assert f"after {reason}; resume with --ckpt_path last" in out, out[-3000:]
    if how != "exception":
        assert "Traceback" not in out, out[-3000:]
    if how == "SIGTERM":
        assert "wandb sync" in out  # W&B finished its run (the offline footer)

    ckpt, frames = last_checkpoint(run)
    assert frames > 0 and frames % ROLLOUT == 0  # at the end of a rollout cycle
    assert ckpt["global_step"] == frames // ROLLOUT * STEPS_PER_ROLLOUT  # each fully trained on
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [float(r.split(",")[header.index("rollout/frames")]) for r in rows[1:]]
    assert logged == [512.0 * (i + 1) for i in range(frames // 512)]  # the CSV was flushed
    assert_resumes_to_budget(run, mode, frames)


def test_second_sigint_stops_mid_cycle_and_closes_the_workers(tmp_path, restore_signals) -> None:
    run = tmp_path / "run"
    with recording_cli() as made, pytest.raises(SystemExit) as stopped:
        fit(run, "blocks", "--trainer.callbacks+=tests.test_stopping.SigintTwiceMidEpoch",
            "--model.init_args.max_frames=100000")  # fmt: skip
    assert stopped.value.code == 130
    (callback,) = [c for c in made[0].trainer.callbacks if isinstance(c, SigintTwiceMidEpoch)]
    assert len(callback.worker_pids) == 2
    assert not [pid for pid in callback.worker_pids if alive(pid)]
    ckpt, frames = last_checkpoint(run)
    assert frames == 2 * ROLLOUT  # the second cycle's rollout, before any of its updates
    assert ckpt["global_step"] == STEPS_PER_ROLLOUT
    assert_resumes_to_budget(run, "blocks", frames)


def test_keyboard_interrupt_in_fit_exits_130(tmp_path, restore_signals) -> None:
    """Lightning turns a KeyboardInterrupt in fit into ``sys.exit(1)``; ``slm-lab`` exits 130."""
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path / "run", "sync", "--trainer.callbacks+=tests.test_stopping.InterruptAtEpoch")
    assert stopped.value.code == 130
    assert last_checkpoint(tmp_path / "run")[1] == ROLLOUT
