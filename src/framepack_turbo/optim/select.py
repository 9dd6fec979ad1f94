"""Which modules a weight pass touches: a filter `(module, fqn) -> bool` from include/exclude name parts.

Model facts live in registries, not in the passes: the repeated block stacks of each transformer
class, and the parts that stay in high precision by default (norms and their modulation linears,
embedders, the final projection), as diffusers' layerwise casting skips them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# transformer class -> the ModuleLists of repeated blocks (what regional compile and pruning work on)
BLOCK_STACKS: dict[str, tuple[str, ...]] = {
    "HunyuanVideoFramepackTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
}
# name parts that stay in high precision unless the user includes them explicitly
# The FramePack transformer's parts that map into and out of the block stacks: no weight pass changes them.
EMBEDDERS: tuple[str, ...] = (
    "x_embedder",
    "clean_x_embedder",
    "context_embedder",
    "time_text_embed",
    "image_projection",
)
FINAL_PROJECTION = "proj_out"  # the top-level one; blocks have their own proj_out, which is quantized
OUTPUT_LAYERS: tuple[str, ...] = ("norm_out", FINAL_PROJECTION)  # the final norm and projection
DEFAULT_EXCLUDE: tuple[str, ...] = ("norm", *EMBEDDERS)


def block_stacks(model: torch.nn.Module) -> tuple[str, ...]:
    try:
        return BLOCK_STACKS[type(model).__name__]
    except KeyError:
        raise ValueError(f"no block layout registered for {type(model).__name__}") from None


@dataclass(frozen=True)
class LinearFilter:
    """Linear layers inside the block stacks whose name contains an `include` part (empty: all) and no
    `exclude` part. The final projection is never selected."""

    stacks: tuple[str, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def __call__(self, module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or fqn == FINAL_PROJECTION:
            return False
        if not fqn.startswith(tuple(f"{s}." for s in self.stacks)):
            return False
        if self.include and not any(part in fqn for part in self.include):
            return False
        return not any(part in fqn for part in self.exclude)


def selected(model: torch.nn.Module, keep: Callable[[torch.nn.Module, str], bool]) -> list[str]:
    return [fqn for fqn, m in model.named_modules() if keep(m, fqn)]


def weight_bytes(model: torch.nn.Module, names: list[str]) -> int:
    """Storage of the named modules' weights, quantized tensors included (data + scales)."""
    modules = dict(model.named_modules())
    return sum(tensor_bytes(modules[n].weight) for n in names)


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor, looking inside tensor subclasses (quantized data + scales)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
