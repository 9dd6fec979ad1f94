"""The one place optional backends are imported, each behind a function (never at module import)."""

from __future__ import annotations

import logging


def torchao_quantization():
    """`torchao.quantization`, with its import-time notes about CUDA extensions a CPU lacks kept quiet."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.ERROR))
    import torchao.quantization

    return torchao.quantization
