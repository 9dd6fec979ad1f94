"""Context KV cache (ENABLE_KV_CACHE, KV_CACHE_LEN, KV_CACHE_REFRESH, KV_CACHE_VERBOSE).

In a FramePack section, most of the sequence is context that every step sees unchanged at the
input: the clean latents (start frame, 1x/2x/4x history), the SigLIP image tokens and the text
tokens. Only the window's noisy tokens change. At a refresh step the whole sequence is computed and
every attention layer keeps the context tokens' keys and values; on the steps in between only the
noisy tokens run through the blocks (projections, MLPs: the cost scales with the tokens computed)
and attend to their own fresh K/V plus the cached context K/V.

This is an approximation, not an exact cache: deeper in the stack the context tokens' states depend
on the timestep (adaLN modulation) and on the noisy tokens through attention, so their K/V drift
between refreshes. `refresh` sets the trade (1 = recompute every step = exact); the first and last
step of a section always refresh. `max_tokens` (KV_CACHE_LEN) bounds the cached context per layer:
a longer context computes every step in full (counted, logged once per section). Memory of the
cache: layers x 2 x context tokens x hidden size x dtype bytes, per prediction (cond/uncond).

diffusers has no such cache for this model (its `TextKVCacheConfig` caches only text projections,
exactly, for other families), so the attention processor here is ours: it is diffusers'
`HunyuanVideoAttnProcessor2_0` computation plus recording and reuse of the context K/V. Hooks on
the transformer and its blocks (diffusers' hook registry) choose the mode per call and drop the
context tokens from the block inputs on reuse steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from framepack_turbo.optim.base import PassContext, PassReport
from framepack_turbo.optim.stepcache import HookedCache, blocks, is_boundary_step, register_hook, step_position

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

TRANSFORMER_HOOK = "framepack_kvcache_transformer"
BLOCK_HOOK = "framepack_kvcache_block"
ROPE_ARG = 4  # blocks are called (hidden_states, encoder_hidden_states, temb, attention_mask, rope)
ROPE_NAMES = ("freqs_cis", "image_rotary_emb")

# "pending": the transformer was called and the stack has not started; the first block decides, so a step
# a whole-step cache (TeaCache, MagCache) skips before any block runs costs the KV cache nothing
Mode = Literal["pending", "full", "record", "reuse"]


@dataclass(frozen=True)
class ContextKVCacheConfig:
    """`refresh`: steps between recomputations of the context K/V (higher: faster, further from the
    uncached result; 1: exact). `max_tokens`: longest context cached per layer."""

    refresh: int = 4
    max_tokens: int = 4096
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.refresh < 1 or self.max_tokens < 1:
            raise ValueError("refresh and max_tokens must be >= 1")


@dataclass
class _CallState(BaseState):
    """One prediction's (cond/uncond) cache within a section."""

    mode: Mode = "full"
    noisy_tokens: int = 0
    batch: int = 1
    refreshed_at: int | None = None
    too_long: bool = False
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def reset(self) -> None:
        self.mode, self.noisy_tokens, self.refreshed_at, self.too_long = "full", 0, None, False
        self.kv = {}


class ContextKVAttnProcessor:
    """HunyuanVideo joint attention with the context K/V recorded (mode "record") or reused ("reuse").

    In "full" and "record" mode it computes exactly what `HunyuanVideoAttnProcessor2_0` computes.
    In "reuse" mode the image stream holds only the noisy tokens and the text stream is empty (dual
    blocks) or carries the last noisy token (single blocks, whose forward splits its input that way).
    """

    def __init__(self, layer: int, state_manager: StateManager, controller: ContextKVCache, previous) -> None:
        self.layer = layer
        self.state_manager = state_manager
        self.controller = controller
        self.previous = previous  # put back when the cache comes off
        # keep the backend the attention pass chose
        self._attention_backend = getattr(previous, "_attention_backend", None)
        self._parallel_config = getattr(previous, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        state: _CallState = self.state_manager.get_state()
        if state.mode == "reuse":
            return self._reuse(attn, state, hidden_states, encoder_hidden_states, image_rotary_emb)
        image_tokens = hidden_states.shape[1]
        query, key, value = self._full_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if state.mode == "record":
            context = image_tokens - state.noisy_tokens
            keep = lambda t: torch.cat([t[:, :context], t[:, image_tokens:]], dim=1)  # noqa: E731
            state.kv[self.layer] = (keep(key), keep(value))
        out = self._attend(query, key, value, attention_mask)
        return self._project(attn, out, encoder_hidden_states)

    # diffusers' HunyuanVideoAttnProcessor2_0, steps 1-4
    def _full_qkv(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        single = attn.add_q_proj is None
        if single and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = self._qkv(attn, hidden_states)
        if image_rotary_emb is not None:
            if single and encoder_hidden_states is not None:
                n = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n], image_rotary_emb, sequence_dim=1), query[:, -n:]], 1)
                key = torch.cat([apply_rotary_emb(key[:, :-n], image_rotary_emb, sequence_dim=1), key[:, -n:]], 1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if not single and encoder_hidden_states is not None:
            eq, ek, ev = self._qkv(attn, encoder_hidden_states, added=True)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        return query, key, value

    @staticmethod
    def _qkv(attn, x, added: bool = False):
        to_q, to_k, to_v = (
            (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added else (attn.to_q, attn.to_k, attn.to_v)
        )
        norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
        q, k, v = (f(x).unflatten(2, (attn.heads, -1)) for f in (to_q, to_k, to_v))
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v

    def _attend(self, query, key, value, attention_mask):
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return out.flatten(2, 3).to(query.dtype)

    @staticmethod
    def _project(attn, out, encoder_hidden_states):
        if encoder_hidden_states is None:
            return out, encoder_hidden_states
        n = encoder_hidden_states.shape[1]
        out, context_out = out[:, : out.shape[1] - n], out[:, out.shape[1] - n :]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            context_out = attn.to_add_out(context_out)
        return out, context_out

    def _reuse(self, attn, state: _CallState, hidden_states, encoder_hidden_states, image_rotary_emb):
        single = attn.add_q_proj is None
        if single:  # the carrier token is a noisy token: it gets rotary embedding like the others
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = self._qkv(attn, hidden_states)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        cached_key, cached_value = state.kv[self.layer]
        out = self._attend(query, torch.cat([key, cached_key], 1), torch.cat([value, cached_value], 1), None)
        if single:
            return self._project(attn, out, encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, attn.to_add_out(encoder_hidden_states)  # an empty text stream stays empty


class TransformerModeHook(ModelHook):
    """Per call: notes how many tokens are noisy; the first block's hook then picks full / record / reuse
    from the step (`decide`), when the stack runs at all."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: ContextKVCacheConfig, controller: ContextKVCache):
        super().__init__()
        self.state_manager = state_manager
        self.config = config
        self.controller = controller

    def pre_forward(self, module, *args, **kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = latents.shape
        c = module.config
        state: _CallState = self.state_manager.get_state()
        state.noisy_tokens = (frames // c.patch_size_t) * (height // c.patch_size) * (width // c.patch_size)
        state.mode, state.batch = "pending", latents.shape[0]
        return args, kwargs

    @torch.compiler.disable
    def decide(self, state: _CallState) -> Mode:
        context, batch = self.state_manager.context, state.batch
        step, _ = step_position(context)
        record = self.controller.record
        if batch != 1:
            record("forced", context, "batch > 1: computed in full")
            return "full"
        if state.too_long:
            record("forced", context, "context longer than KV_CACHE_LEN: computed in full")
            return "full"
        if is_boundary_step(context) or state.refreshed_at is None:
            kind, mode = "forced", "record"
        elif step - state.refreshed_at >= self.config.refresh:
            kind, mode = "miss", "record"
        else:
            record("hit", context, f"context K/V from step {state.refreshed_at + 1}")
            return "reuse"
        state.kv, state.refreshed_at = {}, step
        record(kind, context, "context K/V recomputed")
        return mode

    def post_forward(self, module, output):
        state: _CallState = self.state_manager.get_state()
        if state.mode == "record":  # (still "pending": a whole-step cache skipped the stack)
            context_tokens = next(iter(state.kv.values()))[0].shape[1] if state.kv else 0
            if context_tokens > self.config.max_tokens:
                state.too_long, state.kv, state.refreshed_at = True, {}, None
                self.controller.too_long(context_tokens)
            else:
                self.controller.note_size(state.kv)
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class ReuseBlockHook(ModelHook):
    """On reuse calls: the block sees only the noisy tokens (and their slice of the rotary embedding).
    The first block's (`mode`: the transformer's hook) makes the call's decision as the stack starts."""

    def __init__(self, state_manager: StateManager, single: bool, mode: TransformerModeHook | None = None) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.single = single
        self.mode = mode

    def new_forward(self, module, *args, **kwargs):
        state: _CallState = self.state_manager.get_state()
        if self.mode is not None and state.mode == "pending":
            state.mode = self.mode.decide(state)
        if state.mode != "reuse":
            return self.fn_ref.original_forward(*args, **kwargs)
        n = state.noisy_tokens
        args, kwargs = list(args), dict(kwargs)
        hidden = args[0][:, -n:]
        rope = _rope_arg(args, kwargs)
        rope = (rope[0][-n:], rope[1][-n:])
        _set_rope(args, kwargs, rope)
        if self.single:  # its forward splits the last `text` tokens off: hand it the last noisy token as text
            args[0], args[1] = hidden[:, :-1], hidden[:, -1:]
            out_hidden, carrier = self.fn_ref.original_forward(*args, **kwargs)
            return torch.cat([out_hidden, carrier], dim=1), carrier[:, :0]
        args[0], args[1] = hidden, args[1][:, :0]
        return self.fn_ref.original_forward(*args, **kwargs)


def _rope_arg(args: list, kwargs: dict):
    if len(args) > ROPE_ARG:
        return args[ROPE_ARG]
    return next(kwargs[name] for name in ROPE_NAMES if name in kwargs)


def _set_rope(args: list, kwargs: dict, rope) -> None:
    if len(args) > ROPE_ARG:
        args[ROPE_ARG] = rope
    else:
        kwargs[next(name for name in ROPE_NAMES if name in kwargs)] = rope


class ContextKVCache(HookedCache):
    name = "kvcache"
    hooks = (TRANSFORMER_HOOK, BLOCK_HOOK)

    def __init__(self, transformer: torch.nn.Module, config: ContextKVCacheConfig) -> None:
        super().__init__(transformer, config.verbose)
        self.config = config

    def remove(self) -> None:
        super().remove()
        for _, block in blocks(self.transformer):  # the attention processors it wrapped go back
            processor = block.attn.processor
            if isinstance(processor, ContextKVAttnProcessor):
                block.attn.set_processor(processor.previous)

    def too_long(self, tokens: int) -> None:
        self.counters.add("over_len")
        self.counters.extra["context_tokens"] = tokens

    def note_size(self, kv: dict[int, Any]) -> None:
        nbytes = sum(t.numel() * t.element_size() for pair in kv.values() for t in pair)
        self.counters.extra["cached_mb"] = max(self.counters.extra.get("cached_mb", 0.0), round(nbytes / 2**20, 3))
        if kv:
            self.counters.extra["context_tokens"] = next(iter(kv.values()))[0].shape[1]


def apply_context_kv_cache(transformer: torch.nn.Module, config: ContextKVCacheConfig) -> ContextKVCache:
    controller = ContextKVCache(transformer, config)
    state_manager = StateManager(_CallState)
    mode = TransformerModeHook(state_manager, config, controller)
    for layer, (_, block) in enumerate(blocks(transformer)):
        block.attn.set_processor(ContextKVAttnProcessor(layer, state_manager, controller, block.attn.processor))
        single = not hasattr(block, "norm1_context")
        register_hook(
            transformer, block, ReuseBlockHook(state_manager, single, mode if layer == 0 else None), BLOCK_HOOK
        )
    register_hook(transformer, transformer, mode, TRANSFORMER_HOOK)
    return controller


class ContextKVCachePass:
    name = "kvcache"

    def config(self, settings: Settings) -> ContextKVCacheConfig:
        return ContextKVCacheConfig(settings.kv_cache_refresh, settings.kv_cache_len, settings.kv_cache_verbose)

    def apply(self, bundle: ModelBundle, config: ContextKVCacheConfig, context: PassContext) -> PassReport:
        cache = apply_context_kv_cache(bundle.transformer, config)
        detail = (
            f"context K/V recomputed every {config.refresh} steps (and on each section's first and last), "
            f"up to {config.max_tokens} context tokens"
        )
        return PassReport(self.name, "applied", detail, extension=cache)
