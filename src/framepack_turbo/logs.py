"""Logging set-up shared by the CLI and bench workers. Nothing here runs at import."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Keep library chatter (dtype notes, torchvision fallbacks, hub retries) to errors.

    diffusers and transformers set their own levels when first imported, so this goes through their
    verbosity functions rather than only `logging.getLogger(...).setLevel`.
    """
    for name in ("diffusers", "transformers", "huggingface_hub", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
