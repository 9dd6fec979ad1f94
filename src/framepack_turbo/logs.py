"""Logging set-up shared by the CLI and bench workers. Nothing here runs at import."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

# Loggers that report harmless import-time noise (torchao's optional CUDA extensions on a CPU
# machine, torch's pytree deprecation notes, diffusers' torchao probe) and library chatter.
NOISY_LOGGERS = (
    "diffusers",
    "transformers",
    "huggingface_hub",
    "httpx",
    "torchao",
    "torch.utils._pytree",
    "torch.onnx",
    "onnx_ir",
    "onnxscript",
)


def quiet_libraries() -> None:
    """Keep library chatter to errors. Call before the libraries are imported where possible.

    diffusers and transformers set their own levels when first imported, so their verbosity is also
    set through the variables they read and, once imported, their own functions.
    """
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")  # torchao tensors under compile


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """Raise one logger's level for a block (a library notice that repeats on every call)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)
