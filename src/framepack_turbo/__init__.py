"""FramePack Turbo: FramePack image-to-video where every speed-up is real, checked and measured."""

from framepack_turbo.errors import Cancelled, FramePackError, InputError, ModelUnavailableError

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "FramePack",
    "FramePackError",
    "InputError",
    "ModelUnavailableError",
    "Result",
    "__version__",
]


def __getattr__(name: str):
    # Lazy: `import framepack_turbo` must stay cheap (the CLI validates input before torch loads).
    if name in ("FramePack", "Result"):
        from framepack_turbo import api

        return getattr(api, name)
    raise AttributeError(name)
