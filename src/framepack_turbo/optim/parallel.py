"""Context parallelism: one video's transformer calls split over several GPUs (PARALLEL_DEGREE, --gpus N).

A FramePack call is one long sequence: the packed latents (4x, 2x, 1x history, the noisy window) and the
conditioning tokens (SigLIP image, LLaMA text), about 19k tokens at 640 through 60 blocks. diffusers' context
parallelism splits that sequence over the ranks and does the attention across them: Ulysses trades the
sequence split for a head split with all-to-all (heads must divide by the degree), ring passes K/V around and
merges the partial softmaxes by their log-sum-exp. Everything else in a block is per token and runs on the
rank's share alone.

diffusers ships no `_cp_plan` for the FramePack transformer; `cp_plan` is ours. The packing happens inside
`forward` (history and noisy latents concatenated, their rotary tables likewise), so the first place that sees
the packed sequence is the first block:

- the first block's inputs: the packed hidden states and the conditioning tokens, split along the sequence;
- every block's rotary table, split the same way (the forward hands each block the whole table);
- the last block's outputs, gathered (the forward then keeps the last, noisy, tokens).

Shares may be uneven (the text length is the prompt's, the latent length the frame's), so the split is diffusers'
"anything" mode (`tensor_split`, uneven all-to-all, ring's K/V padded to the longest share); the ranks exchange
their share sizes through gloo, beside NCCL on CUDA. The last block's gather is ours (`gather_shares`): diffusers'
all-gathers the uneven shares as they are, which gloo refuses ("invalid tensor size"), so on a CPU every prompt
whose conditioning length is not a multiple of the degree crashed. Each share is padded to the longest for the
collective and cut back after it: the padding never enters a block, so no attention mask is needed and the
result is the unsplit one's.

The split and gather hooks are the outermost on those blocks (the pass is declared after the step caches):
the caches' hooks see a rank's share and take their decision's means over the ranks (distributed.means_over_ranks).
`ModelMixin.enable_parallelism` is not called: it derives the device index from the accelerator count, which
is zero on a CPU, so a gloo mesh (the CI test) could not be built through it; the four things it does are done
here with diffusers' own pieces (the configs, the mesh setup, the processors' config, `apply_context_parallel`
for the splits; `apply_plan`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from framepack_turbo import distributed
from framepack_turbo.errors import FramePackError
from framepack_turbo.optim.base import Extension, PassContext, PassReport

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

# Ring merges partial attention by the softmax log-sum-exp; PyTorch SDPA (diffusers' `native`) does not return
# it, torch's flash kernel does (CUDA, bf16/fp16).
RING_BACKEND = "_native_flash"


@dataclass(frozen=True)
class ParallelConfig:
    mode: Literal["ulysses", "ring"] = "ulysses"
    degree: int = 1


def _stacks(transformer) -> list[tuple[str, torch.nn.ModuleList, str]]:
    """(attribute, blocks, name of the rotary argument) of each non-empty block stack, in execution order."""
    stacks = [("transformer_blocks", "freqs_cis"), ("single_transformer_blocks", "image_rotary_emb")]
    return [(name, getattr(transformer, name), rope) for name, rope in stacks if len(getattr(transformer, name))]


def cp_plan(transformer) -> dict[str, Any]:
    """The FramePack transformer's context-parallel plan (diffusers' `ContextParallelModelPlan`)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    stacks = _stacks(transformer)
    if not stacks:
        raise FramePackError("the transformer has no blocks to split")
    sequence = ContextParallelInput(split_dim=1, expected_dims=3)
    table = ContextParallelInput(split_dim=0, expected_dims=2)
    (first, _, _), (last, last_blocks, _) = stacks[0], stacks[-1]
    plan: dict[str, Any] = {f"{first}.0": {"hidden_states": sequence, "encoder_hidden_states": sequence}}
    for name, _, rope in stacks:
        plan[f"{name}.*"] = {rope: (table, table)}
    gathered = ContextParallelOutput(gather_dim=1, expected_dims=3)
    plan[f"{last}.{len(last_blocks) - 1}"] = [gathered, gathered]  # (image stream, conditioning stream)
    return plan


def gather_shares(share: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's share of a sequence, joined along `dim` in rank order; the shares may differ in length.

    One exchange of the lengths, then one all-gather of equal buffers (each share zero-padded to the longest:
    gloo all-gathers only equal tensors) cut back to each rank's length."""
    from diffusers.models._modeling_parallel import gather_size_by_comm

    share = share.contiguous()
    lengths = gather_size_by_comm(share.shape[dim], group)
    longest = max(lengths)
    if share.shape[dim] < longest:
        pad = list(share.shape)
        pad[dim] = longest - share.shape[dim]
        share = torch.cat([share, share.new_zeros(pad)], dim=dim)
    buffers = [torch.empty_like(share) for _ in lengths]
    torch.distributed.all_gather(buffers, share, group=group)
    return torch.cat([b.narrow(dim, 0, n) for b, n in zip(buffers, lengths)], dim=dim)


def _gather_hook(outputs, cp):
    """diffusers' gather hook with its all-gather replaced by `gather_shares` (any share lengths, any backend)."""
    from diffusers.hooks.context_parallel import ContextParallelGatherHook

    class GatherShares(ContextParallelGatherHook):
        def post_forward(self, module, output):
            single = isinstance(output, torch.Tensor)
            output = [output] if single else list(output)
            if len(output) != len(self.metadata):
                raise FramePackError(f"the gathered block returned {len(output)} tensors, not {len(self.metadata)}")
            group = self.parallel_config._flattened_mesh.get_group()
            for i, cpm in enumerate(self.metadata):
                if cpm is not None:
                    output[i] = gather_shares(output[i], cpm.gather_dim, group)
            return output[0] if single else tuple(output)

    return GatherShares(list(outputs), cp)


def apply_plan(transformer, cp, plan: dict[str, Any]) -> None:
    """diffusers' `apply_context_parallel` for the splits; our gather (under diffusers' hook name, so that
    `remove_context_parallel` takes it off) for the outputs."""
    from diffusers.hooks.context_parallel import (
        _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE,
        _get_submodule_by_name,
        apply_context_parallel,
    )
    from diffusers.hooks.hooks import HookRegistry

    apply_context_parallel(transformer, cp, {k: v for k, v in plan.items() if isinstance(v, dict)})
    for module_id, outputs in plan.items():
        if isinstance(outputs, dict):
            continue
        modules = _get_submodule_by_name(transformer, module_id)
        for module in modules if isinstance(modules, list) else [modules]:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_gather_hook(outputs, cp), _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE.format(module_id))


def attention_processors(transformer) -> list[Any]:
    """The processors that dispatch attention (and so can run it across ranks); the token refiner's do not."""
    return [
        m.processor
        for m in transformer.modules()
        if getattr(m, "processor", None) is not None and hasattr(m.processor, "_parallel_config")
    ]


def bytes_per_call(
    mode: str,
    degree: int,
    inner_dim: int,
    blocks: int,
    latent_tokens: int,
    condition_tokens: int,
    element_bytes: int,
) -> dict[str, int]:
    """What one transformer call sends between ranks, per rank, from the shapes (received bytes).

    Ulysses: per block, Q, K and V all-to-all into the head split and the output back: 4 x (S/N) x C, of which
    (N-1)/N leaves the rank, so it shrinks as N grows. Ring (all-gather rotation): per block, every other rank's
    K and V: 2 x S x C x (N-1)/N, about the same whatever N. Then the gather of the last block's output:
    S x C x (N-1)/N."""
    tokens = latent_tokens + condition_tokens
    share = (degree - 1) / degree
    copies = 4 / degree if mode == "ulysses" else 2
    per_block = copies * tokens * inner_dim * element_bytes * share
    gather = tokens * inner_dim * element_bytes * share
    return {"attention": int(per_block * blocks), "gather": int(gather), "total": int(per_block * blocks + gather)}


class ContextParallel(Extension):
    """The applied split: what the record keeps, and how it comes off (hooks, processors' config, backend)."""

    name = "parallel"
    kind = "parallel"

    def __init__(self, transformer, plan: dict[str, Any], config: ParallelConfig, ranks, backend: str | None) -> None:
        self.transformer = transformer
        self.plan = plan
        self.config = config
        self.ranks = ranks
        self.backend = backend

    def record(self) -> dict[str, Any]:
        t = self.transformer.config
        return {
            "mode": self.config.mode,
            "degree": self.config.degree,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "attention": self.backend or "native",
            "split_at": next(iter(self.plan)),
            "gathered_after": list(self.plan)[-1],
            "heads_per_rank": t.num_attention_heads // self.config.degree if self.config.mode == "ulysses" else None,
        }

    def remove(self) -> None:
        from diffusers.hooks.context_parallel import remove_context_parallel

        remove_context_parallel(self.transformer, self.plan)
        for processor in attention_processors(self.transformer):
            processor._parallel_config = None
        self.transformer._parallel_config = None
        if self.backend is not None:
            self.transformer.reset_attention_backend()


class ContextParallelPass:
    name = "parallel"

    def config(self, settings: Settings) -> ParallelConfig:
        return ParallelConfig(settings.parallel_mode, settings.parallel_degree)

    def apply(self, bundle: ModelBundle, config: ParallelConfig, context: PassContext) -> PassReport:
        from diffusers.models._modeling_parallel import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

        ranks = distributed.current()
        if ranks.world != config.degree:  # the API starts the group before the passes; this is a launcher bug
            raise FramePackError(
                f"context parallelism over {config.degree} ranks, but this process is one of {ranks.world}"
            )
        transformer = bundle.transformer
        if config.mode == "ulysses":
            cp = ContextParallelConfig(ulysses_degree=config.degree, ulysses_anything=True)
        else:
            cp = ContextParallelConfig(ring_degree=config.degree, ring_anything=True)
        device = torch.device(bundle.device)
        mesh = torch.distributed.device_mesh.init_device_mesh(
            device.type, cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names
        )
        parallel = DiffusersParallelConfig(context_parallel_config=cp)
        parallel.setup(ranks.rank, ranks.world, device, mesh=mesh)
        backend = None
        if config.mode == "ring":
            from framepack_turbo.logs import quiet_logger

            with quiet_logger("diffusers.models.modeling_utils"):
                transformer.set_attention_backend(RING_BACKEND)
            backend = RING_BACKEND
        processors = attention_processors(transformer)
        for processor in processors:
            processor._parallel_config = parallel
        transformer._parallel_config = parallel
        plan = cp_plan(transformer)
        apply_plan(transformer, cp, plan)
        detail = (
            f"{config.mode} over {config.degree} ranks ({torch.distributed.get_backend()}); "
            f"{len(processors)} attention layers across ranks; split at {next(iter(plan))}, "
            f"gathered after {list(plan)[-1]}"
        )
        log.info("Context parallelism: %s", detail)
        return PassReport(
            self.name,
            "applied",
            detail,
            {"mode": config.mode, "degree": config.degree, "rank": ranks.rank},
            ContextParallel(transformer, plan, config, ranks, backend),
        )
