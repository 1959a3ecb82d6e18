"""The processes of a trial's sessions: at most ``workers`` fit processes at once, each on its
own share of the cores and GPUs, their progress, and how each ended.

Used by :mod:`slm_lightning.lab.trial`; a session's command line is the trial's ``fit`` with
the session's seed, run folder and ``--ckpt_path last`` (a fresh start, or a resume).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from slm_lightning.lab.runs import FRAMES, RETURN_MA, read_metrics
from slm_lightning.run_folder import RUN_STAMP_VAR


@dataclass
class Session:
    """One session of a trial and, once it ran, how it ended.

    Args:
        seed: its ``seed_everything``.
        folder: its run folder ``DIR/session-<seed>``.
        status: ``pending``, ``running``, ``finished``, ``stopped`` or ``crashed``.
        exit_code: the fit process's exit status (None until it ends or if kept from before).
        error: the last error line of a crashed session's log.
        command: the fit command line before the per-session options (set by the trial).
        max_frames: its frame budget (shown in the progress lines).
        torch_threads: the config's ``torch_threads``; the session gets at most as many as
            its share of the cores.
        label: its name in log lines (``session-0``, ``trial-3/session-0``).
    """

    seed: int
    folder: Path
    status: str = "pending"
    exit_code: int | None = None
    error: str | None = None
    command: list[str] = field(default_factory=list)
    max_frames: int = 0
    torch_threads: int = 1
    label: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)
    signalled: bool = False

    def __post_init__(self) -> None:
        self.label = self.label or f"session-{self.seed}"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (none on a CPU
    machine)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def core_slots(workers: int) -> list[list[int]]:
    """Split this process's cores into ``workers`` disjoint shares, one per running session
    (every share gets the whole machine where the OS cannot pin processes)."""
    if not hasattr(os, "sched_getaffinity"):
        return [[] for _ in range(workers)]
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // workers)
    return [cores[(i * per) % len(cores) :][:per] for i in range(workers)]


def _stop_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` that has Linux send the session SIGTERM when the trial's process dies
    (even by SIGKILL), so that it stops at a checkpoint instead of running on orphaned."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def last_error_line(log: Path) -> str:
    """The line of a session's log that says why it failed: the last line naming an error,
    else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if "Error" in line or "ERROR" in line or "error:" in line:
            return line
    return lines[-1] if lines else "no output"


class SessionPool:
    """Runs sessions' fit processes, at most ``workers`` at once, for one trial or for the
    many trials of a search.

    Each session is ``<its command> --seed_everything <seed> --trainer.default_root_dir
    <folder> --ckpt_path last`` (a fresh start where the folder has no checkpoint yet, else a
    resume), with its output in ``<folder>/session.log``. A session is pinned to its own share
    of the cores (``sched_setaffinity``; the env factory sizes its worker processes to it) and,
    on a machine with GPUs, sees one GPU (``CUDA_VISIBLE_DEVICES``, round-robin). Inside
    :meth:`signals`, SIGTERM or Ctrl-C sets :attr:`stop_signal` (the caller stops its sessions
    with :meth:`stop`; they stop at a checkpoint); a second Ctrl-C kills them.

    Args:
        workers: sessions at once.
        progress_every: seconds between progress lines (0: none).
    """

    def __init__(self, workers: int, progress_every: float = 0.0) -> None:
        self.workers = workers
        self.progress_every = progress_every
        self.stop_signal: int | None = None
        self.kills = 0
        self.slots = core_slots(workers)
        self.gpus = visible_gpus()
        self.started = 0
        self.free = list(range(workers))
        self.running: dict[int, Session] = {}  # slot -> session
        self.next_progress = time.monotonic() + progress_every

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            self.kills += 1  # a second Ctrl-C: stop now
            self.stop(list(self.running.values()))
        self.stop_signal = signum

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Catch SIGTERM and Ctrl-C while sessions run; on leaving, kill any session still
        running (the caller failed) so that none is left orphaned."""
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for session in self.running.values():
                if session.process is not None and session.process.poll() is None:
                    session.process.kill()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self, sessions: list[Session]) -> None:
        """Run every session that has not finished to its end, or until stopped.

        Args:
            sessions: one trial's sessions.
        """
        with self.signals():
            pending = [s for s in sessions if s.status != "finished"]
            while pending or self.running:
                if self.stop_signal is not None:
                    self.stop(list(self.running.values()))
                    pending = []
                while pending and self.free and self.stop_signal is None:
                    self.start(pending.pop(0))
                self.poll()
                time.sleep(0.2)

    def start(self, session: Session) -> None:
        """Start a session's process on a free share of the cores.

        Args:
            session: the session (``command`` set).
        """
        slot = self.free.pop(0)
        self.running[slot] = session
        session.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != RUN_STAMP_VAR}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[self.started % len(self.gpus)]
        self.started += 1
        args = [
            *session.command,
            f"--seed_everything={session.seed}",
            f"--trainer.default_root_dir={session.folder}",
            "--ckpt_path=last",
        ]
        share = self.slots[slot]
        if share and session.torch_threads > len(share):
            # More intra-op threads than the session's cores would take its neighbours' time.
            args.append(f"--torch_threads={len(share)}")
        log = (session.folder / "session.log").open("a")
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
        session.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # Its own process group: a terminal's Ctrl-C reaches the trial alone, which passes
            # it on once to every session (a session signalled twice would stop at once).
            start_new_session=True,
            preexec_fn=_stop_with_parent(os.getpid()),
        )
        log.close()  # the child holds its own descriptor
        session.signalled = False
        if share:
            # Pinned from here, before the child imports torch or forks env workers (which
            # inherit it): its threads and workers stay on this share of the cores.
            with contextlib.suppress(OSError):  # already gone: _finish reports how it ended
                os.sched_setaffinity(session.process.pid, share)
        session.status = "running"
        cores = f" on cores {share}" if share else ""
        gpu = f" GPU {env['CUDA_VISIBLE_DEVICES']}" if self.gpus else ""
        logger.info(f"{session.label}: started{cores}{gpu} (log: {session.folder}/session.log)")

    def poll(self) -> list[Session]:
        """The sessions that ended since the last call (their shares of the cores are free
        again); shows the progress lines when they are due."""
        ended = []
        for slot, session in list(self.running.items()):
            if session.process is not None and session.process.poll() is not None:
                self._finish(session)
                del self.running[slot]
                self.free.append(slot)
                ended.append(session)
        if self.progress_every > 0 and time.monotonic() >= self.next_progress:
            for session in self.running.values():
                self._show_progress(session)
            self.next_progress = time.monotonic() + self.progress_every
        return ended

    def stop(self, sessions: list[Session]) -> None:
        """Ask running sessions to stop at a checkpoint (SIGTERM, or the Ctrl-C that stopped
        the caller); once only, so that a session is not signalled twice, unless a second
        Ctrl-C asked to kill them.

        Args:
            sessions: the sessions to stop (ended ones are skipped).
        """
        for session in sessions:
            process = session.process
            if process is None or process.poll() is not None:
                continue
            if self.kills:
                process.kill()
            elif not session.signalled:
                process.send_signal(self.stop_signal or signal.SIGTERM)
                session.signalled = True

    def _finish(self, session: Session) -> None:
        assert session.process is not None
        session.exit_code = session.process.returncode
        summary_path = session.folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if session.exit_code == 0:
            session.status = "finished"
        elif session.signalled and summary.get("status") != "crashed":
            session.status = "stopped"
        else:
            session.status = "crashed"
            session.error = last_error_line(session.folder / "session.log")
        line = f"{session.label}: {session.status} (exit {session.exit_code})"
        if session.error:
            line += f": {session.error}"
        (logger.error if session.status == "crashed" else logger.info)(line)

    def _show_progress(self, session: Session) -> None:
        columns = read_metrics(session.folder / "metrics.csv", training_only=True)
        if FRAMES not in columns:
            logger.info(f"{session.label}: starting")
            return
        frames = int(columns[FRAMES][-1])
        fps = columns.get("rollout/fps", [math.nan])[-1]
        ma = columns.get(RETURN_MA, [math.nan])[-1]
        logger.info(
            f"{session.label}: frames={frames}/{session.max_frames} fps={fps:.0f} "
            f"return_ma={ma:.4g}"
        )
