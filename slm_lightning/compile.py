"""``--torch-compile``: compile the algorithm's networks with lightning-thunder or torch.compile.

Data path: :func:`add_compile_arguments` (the CLI's parser) → :func:`compile_backend` (the
flag's value) → :class:`CompileNetworks` (before fit) → :func:`compile_block` per block.
"""

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser
from loguru import logger
from torch import nn
from typing_extensions import override

from slm_lightning.errors import ConfigError

Backend = Literal["thunder", "torch"]
BACKENDS: tuple[str, ...] = ("thunder", "torch")


def compile_backend(value: bool | str | None) -> Backend | None:
    """The backend a ``--torch-compile`` value asks for: ``true`` means thunder, ``false`` none.

    Args:
        value: the flag as parsed (a YAML bool or a backend name).
    """
    if value is None or value is False:
        return None
    if value is True:
        return "thunder"
    text = str(value).strip().lower()
    if text in ("false", "0", "no", "off", "none"):
        return None
    if text in ("true", "1", "yes", "on"):
        return "thunder"
    if text not in BACKENDS:
        raise ConfigError(
            f"torch_compile must be one of true, false, {', '.join(BACKENDS)}, got {value!r}"
        )
    return text  # type: ignore[return-value]


def compilable_blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost blocks with parameters whose forward is tensors in, tensors out: the
    ``nn.Sequential`` MLP bodies and conv trunks, and modules that declare themselves so
    (``compile_whole = True``, e.g. SAC's batched twin critics).

    Whole policies return distributions and carry recurrent state, which neither compiler
    traces; their tensor-in / tensor-out bodies hold almost all the FLOPs.
    """
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, child in module.named_modules():
        if id(child) in inside:
            continue
        whole = getattr(child, "compile_whole", False) or isinstance(child, nn.Sequential)
        if whole and any(True for _ in child.parameters()):
            blocks.append(child)
            inside.update(id(m) for m in child.modules())
    return blocks


def compile_block(block: nn.Module, backend: Backend) -> None:
    """Compile ``block`` in place: same object, same parameters, same ``state_dict`` keys.

    ``torch.compile``'s and ``thunder.jit``'s wrappers would prefix every key
    (``_orig_mod.``, ``_model.``) and break checkpoints between compiled and eager runs, so
    the wrapper is kept off the module tree: for an ``nn.Sequential`` it compiles an
    unregistered twin ``Sequential`` over the same layers (hence the same parameters, updated
    in place by the optimizer); for a ``compile_whole`` module, its bound ``forward``. The
    compiled callable becomes the block's ``forward``. (``nn.Module.compile()`` would keep
    the keys too, but on torch 2.12 it does not compile a built-in ``nn.Sequential``: dynamo
    skips the frame.)
    """
    target = nn.Sequential(*block) if isinstance(block, nn.Sequential) else block.forward
    if backend == "torch":
        compiled = torch.compile(target)
    else:
        import thunder

        compiled = thunder.jit(target)
    object.__setattr__(block, "forward", compiled)  # not a registered submodule: keys unchanged


class CompileNetworks(Callback):
    """Compiles the algorithm's network blocks (see :func:`compilable_blocks`) before fitting.

    Args:
        backend: ``thunder`` (lightning-thunder's ``thunder.jit``), ``torch``
            (``torch.compile``) or None (eager, the default).
    """

    def __init__(self, backend: Backend | None = None) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ConfigError(
                f"torch_compile must be one of true, false, {', '.join(BACKENDS)}, got {backend!r}"
            )
        self.backend = backend
        self.compiled = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.backend is None or self.compiled:
            return
        if trainer.strategy.root_device.type == "cpu":
            logger.warning(
                f"torch_compile={self.backend} on a CPU: expect it to be slower than eager for "
                "the small networks of RL (thunder.jit of a small MLP measured ~10x slower); "
                "compiling pays on GPUs"
            )
        blocks = compilable_blocks(pl_module)
        for block in blocks:
            compile_block(block, self.backend)
        self.compiled = len(blocks)
        logger.info(f"torch_compile: {self.backend} compiled {len(blocks)} network blocks")


def add_compile_arguments(parser: LightningArgumentParser) -> None:
    """``--torch-compile`` / ``--torch_compile``: thunder, torch or false (true means thunder).

    The flag feeds a :class:`CompileNetworks` callback (config section ``compile``), which
    compiles the network blocks before fitting and leaves the checkpoint keys as they are in
    eager runs.

    Args:
        parser: the CLI's parser (each subcommand's).
    """
    parser.add_lightning_class_args(CompileNetworks, "compile")
    parser.add_argument(
        "--torch_compile",
        "--torch-compile",
        type=bool | str,
        default=False,
        help="compile the networks: true or thunder (lightning-thunder's thunder.jit), torch "
        "(torch.compile), false (eager). Aimed at GPUs; on a CPU expect it to be slower.",
    )
    parser.link_arguments("torch_compile", "compile.backend", compute_fn=compile_backend)
