"""INT-N weight quantization (ENABLE_QUANT, QUANT_BITS) of the transformer's block linears, through torchao.

`quantize_(model, config, filter_fn)` replaces each selected weight with a torchao quantized tensor
whose matmul runs a low-bit kernel; nothing is dequantized to full size per forward. Which kernel:

| bits | device | torchao config | what it buys |
|---|---|---|---|
| 8 | any | Int8DynamicActivationInt8WeightConfig (per-row) | int8 x int8 matmuls: faster where compute-bound, 4x smaller than fp32 |
| 8 (weight-only) | any | Int8WeightOnlyConfig | 2x/4x smaller than bf16/fp32; speed where memory-bound |
| 4 | CUDA | Int4WeightOnlyConfig, tile-packed (tinygemm) | true 4-bit weights, bf16 activations |
| 4 | CPU | IntxWeightOnlyConfig(int4, per group) | int4 values stored one per byte (no packed int4 CPU kernel in this torchao build): 4x smaller than fp32, slower |

Eager int8-dynamic pays for quantizing activations in separate kernels; torch.compile fuses that
away, which is where the speed-up on CPU comes from (see docs/optimizations.md).
Only linears inside the block stacks are touched: norms, modulation, embedders and the final
projection stay in high precision (optim/select.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from framepack_turbo.optim.backends import torchao_quantization
from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.select import LinearFilter, block_stacks, selected, weight_bytes

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    bits: Literal[4, 8] = 8
    int8_mode: Literal["dynamic", "weight-only"] = "dynamic"
    group_size: int = 128


def torchao_config(config: QuantConfig, device: torch.device):
    """(torchao config, kernel description) for this device."""
    q = torchao_quantization()
    if config.bits == 8 and config.int8_mode == "dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(), "int8 dynamic activations x int8 weights (per row)"
    if config.bits == 8:
        return q.Int8WeightOnlyConfig(), "int8 weight-only"
    if device.type == "cuda":
        cfg = q.Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format="tile_packed_to_4d")
        return cfg, f"int4 weight-only, tile-packed tinygemm, group {config.group_size}"
    from torchao.quantization.granularity import PerGroup

    cfg = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(config.group_size))
    return cfg, f"int4 weight-only, one value per byte (no packed int4 CPU kernel), group {config.group_size}"


def quantize_transformer(transformer: torch.nn.Module, config: QuantConfig) -> dict:
    base = LinearFilter(block_stacks(transformer))
    if config.bits == 4:  # group-wise scales need the input width to divide into groups

        def keep(module: torch.nn.Module, fqn: str) -> bool:
            return base(module, fqn) and module.in_features % config.group_size == 0
    else:
        keep = base
    names = selected(transformer, keep)
    left_out = len(selected(transformer, base)) - len(names)
    before = weight_bytes(transformer, names)
    ao_config, kernel = torchao_config(config, next(transformer.parameters()).device)
    torchao_quantization().quantize_(transformer, ao_config, filter_fn=keep)
    after = weight_bytes(transformer, names)
    return {
        "modules": len(names),
        "left_out": left_out,
        "weight_bytes_before": before,
        "weight_bytes_after": after,
        "kernel": kernel,
    }


class QuantPass:
    name = "quant"

    def config(self, settings: Settings) -> QuantConfig:
        return QuantConfig(settings.quant_bits, settings.quant_int8_mode, settings.quant_group_size)

    def apply(self, bundle: ModelBundle, config: QuantConfig, context: PassContext) -> PassReport:
        log.info("Applying INT-%d quantization to transformer...", config.bits)
        counters = quantize_transformer(bundle.transformer, config)
        ratio = counters["weight_bytes_before"] / max(counters["weight_bytes_after"], 1)
        left_out = (
            f" ({counters['left_out']} left out: width not a multiple of the group)" if counters["left_out"] else ""
        )
        detail = (
            f"{counters['kernel']}; {counters['modules']} linears{left_out}, weights "
            f"{counters['weight_bytes_before'] / 2**20:.1f} -> {counters['weight_bytes_after'] / 2**20:.1f} MiB ({ratio:.1f}x smaller)"
        )
        return PassReport(self.name, "applied", detail, counters)
