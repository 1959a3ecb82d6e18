"""What the ``slm-lab`` command sets for its whole process before anything runs, and the exit
status of an interrupted command."""

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Iterator

import torch
from loguru import logger

from slm_lightning.callbacks.checkpoint import SIGINT_EXIT_CODE


def configure_process() -> None:
    """The console log format, one torch thread, torch's plain CUDA check, and no warnings
    that do not apply to RL runs."""
    logger.remove()
    logger.add(
        sys.stderr,
        format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
        level="INFO",
    )
    # Small policy networks run faster on one intra-op thread than split across cores
    # that are also stepping the environments (``--torch_threads`` changes it per run).
    torch.set_num_threads(1)
    # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import so that checking for GPUs does not
    # initialise CUDA before a fork. Torch then answers every torch.cuda.is_available() with a
    # fresh NVML probe (~0.1 ms), and every optimizer.step() asks: 10% of a small update. Our
    # fork-based children (async env workers) never use CUDA, so the plain check is safe.
    # For the fork-based DDP strategies (ddp_fork, ddp_notebook) set SLM_NVML_CUDA_CHECK=1.
    if os.environ.get("SLM_NVML_CUDA_CHECK") != "1":
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    # Noise that does not apply to RL runs: we log on the frame clock, not every N steps.
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


@contextlib.contextmanager
def interrupt_exit_status() -> Iterator[None]:
    """Within the block, Ctrl-C ends the process with the shell's status 130, however it
    arrives (while parsing, or through Lightning's interrupted fit)."""
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C outside fit (parsing, instantiating)
        sys.exit(SIGINT_EXIT_CODE)
    except SystemExit as err:
        # Lightning 2.6 ends a fit interrupted by KeyboardInterrupt with sys.exit(1)
        # (trainer/call.py, _call_and_handle_interrupt); a shell reports Ctrl-C as 130.
        if err.code == 1 and isinstance(err.__context__, KeyboardInterrupt):
            err = SystemExit(SIGINT_EXIT_CODE)
        if err.code == SIGINT_EXIT_CODE:
            # Fit has saved and closed what it owns. Another Ctrl-C while the interpreter
            # exits (W&B's atexit hook finishing its run) ends the process at once, as the
            # shell's 130, rather than raising KeyboardInterrupt inside an atexit hook.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise err from None
