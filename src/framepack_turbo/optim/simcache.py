"""Similarity cache (ENABLE_SIM_CACHE, SIM_CACHE_THRESHOLD, _MAX_SKIP, _MAX_ENTRIES, _USE_FAISS, _VERBOSE).

Per block: when the block's input is close enough (cosine similarity >= threshold) to an input it
computed earlier in the same section, the block is skipped and the residual it produced then
(output - input, both streams) is added instead. The first and last step of a section are always
computed; a block reuses at most `max_skip` times in a row; each block keeps at most `max_entries`
entries; all entries together stay under a byte budget, the least recently used going first.

Nothing is learned (no projector, no training) and nothing outlives the section. The search is
exact: a matrix product over the block's cached keys, or with USE_FAISS a FAISS inner-product index
(`IndexFlatIP`) proposes candidates and the same exact product ranks them, so both searches pick
the same entry. FAISS pays a copy of every key to host float32, so it only helps with many entries.

Memory: an entry holds the block's input as a unit float32 key (cosines near the threshold need
the precision, and FAISS and the exact search then see the same numbers) and its two residuals in
the model's dtype. On the full model at 640 px (~14k image tokens x 3072) that is ~170 MB of key +
~90 MB of residuals per entry, so the budget, not MAX_ENTRIES, is what bounds it there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from diffusers.hooks.hooks import BaseState, StateManager

from framepack_turbo.hardware import cuda_free_bytes
from framepack_turbo.optim.base import PassContext, PassReport, Scope
from framepack_turbo.optim.stepcache import BlockArgsHook, HookedCache, blocks, is_boundary_step, register_hook

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

HOOK = "framepack_simcache"
FAISS_CANDIDATES = 4  # FAISS proposes this many; the exact product ranks them


@dataclass(frozen=True)
class SimilarityCacheConfig:
    """`threshold`: cosine similarity at or above which a block reuses (higher: fewer reuses, closer to
    the uncached result). `max_skip`: reuses in a row per block. `max_entries`: entries per block.
    `budget_bytes`: all entries together. `storage`: where entries live: "device", "cpu", or "auto" (the
    device unless the budget does not fit beside the models with `preserve_gb` left free)."""

    threshold: float = 0.9
    max_skip: int = 1
    max_entries: int = 12
    budget_bytes: int = 1024 << 20
    use_faiss: bool = False
    storage: Literal["auto", "device", "cpu"] = "auto"
    preserve_gb: float = 6.0
    verbose: bool = False


def faiss_module():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass(eq=False)
class _Entry:
    key: torch.Tensor  # flattened, unit-norm input of the block (float32)
    residual_hidden: torch.Tensor
    residual_encoder: torch.Tensor
    owner: _BlockState
    nbytes: int


class _BlockState(BaseState):
    """One block's entries for one prediction (cond/uncond), with the index over their keys."""

    def __init__(self, use_faiss: bool) -> None:
        self.entries: list[_Entry] = []
        self.consecutive = 0
        self.use_faiss = use_faiss
        self._keys: torch.Tensor | None = None  # stacked keys, rebuilt when entries change
        self._faiss_index = None

    def reset(self) -> None:
        self.entries.clear()
        self.consecutive = 0
        self._keys = None
        self._faiss_index = None

    def changed(self) -> None:
        self._keys = None
        self._faiss_index = None

    def best(self, query: torch.Tensor) -> tuple[float, _Entry | None]:
        """(cosine similarity, entry) of the closest cached key; the same entry with or without FAISS."""
        if not self.entries:
            return -1.0, None
        if self._keys is None:
            self._keys = torch.stack([e.key for e in self.entries])
        candidates = self._faiss_candidates(query) if self.use_faiss else list(range(len(self.entries)))
        keys = self._keys if len(candidates) == len(self.entries) else self._keys[candidates]
        scores = keys @ query.to(keys.device)
        i = int(torch.argmax(scores))
        return float(scores[i]), self.entries[candidates[i]]

    def _faiss_candidates(self, query: torch.Tensor) -> list[int]:
        faiss = faiss_module()
        if self._faiss_index is None:
            self._faiss_index = faiss.IndexFlatIP(self._keys.shape[1])
            self._faiss_index.add(self._keys.cpu().numpy())
        _, ids = self._faiss_index.search(query.cpu().numpy()[None], min(FAISS_CANDIDATES, len(self.entries)))
        return sorted(int(i) for i in ids[0] if i >= 0)


class EntryBudget:
    """All entries of all blocks under one byte budget; least recently used evicted first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.peak = 0
        self.evicted = 0
        self._lru: OrderedDict[int, _Entry] = OrderedDict()

    def touch(self, entry: _Entry) -> None:
        self._lru.move_to_end(id(entry))

    def least_recent(self, owner: _BlockState) -> _Entry:
        return next(e for e in self._lru.values() if e.owner is owner)

    def admit(self, entry: _Entry) -> bool:
        if entry.nbytes > self.budget:
            return False
        while self.used + entry.nbytes > self.budget:
            self.evict(next(iter(self._lru.values())))
        self._lru[id(entry)] = entry
        entry.owner.entries.append(entry)
        entry.owner.changed()
        self.used += entry.nbytes
        self.peak = max(self.peak, self.used)
        return True

    def evict(self, entry: _Entry) -> None:
        del self._lru[id(entry)]
        entry.owner.entries.remove(entry)
        entry.owner.changed()
        self.used -= entry.nbytes
        self.evicted += 1


class SimilarityBlockHook(BlockArgsHook):
    _is_stateful = True

    def __init__(self, config: SimilarityCacheConfig, controller: SimilarityCache, name: str) -> None:
        super().__init__()
        self.config = config
        self.controller = controller
        self.name = name
        self.state_manager = StateManager(_BlockState, (config.use_faiss,))

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, encoder = self.block_args(args, kwargs, "hidden_states", "encoder_hidden_states")
        state: _BlockState = self.state_manager.get_state()
        context = self.state_manager.context
        query = self._key(hidden)
        if state.entries and state.entries[0].key.numel() != query.numel():
            for entry in list(state.entries):  # a new shape in one section: nothing cached applies
                self.controller.budget.evict(entry)

        kind, detail = self._decide(state, query, context)
        if kind == "hit":
            entry = detail
            self.controller.budget.touch(entry)
            state.consecutive += 1
            self.controller.record("hit", context, self.name)
            return (
                hidden + entry.residual_hidden.to(hidden.device, hidden.dtype),
                encoder + entry.residual_encoder.to(encoder.device, encoder.dtype),
            )
        state.consecutive = 0
        self.controller.record(kind, context, f"{self.name}: {detail}")
        out_hidden, out_encoder = self.fn_ref.original_forward(*args, **kwargs)
        self._insert(state, query, out_hidden - hidden, out_encoder - encoder)
        return out_hidden, out_encoder

    @torch.compiler.disable
    def _decide(self, state: _BlockState, query: torch.Tensor, context):
        if is_boundary_step(context):
            return "forced", "first/last step of the section"
        if state.consecutive >= self.config.max_skip:
            return "forced", f"{state.consecutive} reuses in a row"
        similarity, entry = state.best(query)
        if entry is not None and similarity >= self.config.threshold:
            return "hit", entry
        return "miss", f"best similarity {similarity:.4f}" if entry is not None else "nothing cached"

    def _key(self, hidden: torch.Tensor) -> torch.Tensor:
        key = hidden.detach().flatten().float()
        key = key / key.norm().clamp_min(1e-12)
        return key.to(self.controller.storage)

    def _insert(self, state: _BlockState, key, residual_hidden, residual_encoder) -> None:
        store = self.controller.storage
        r_h, r_e = residual_hidden.detach().to(store), residual_encoder.detach().to(store)
        nbytes = sum(t.numel() * t.element_size() for t in (key, r_h, r_e))
        if self.config.use_faiss:
            nbytes += key.numel() * 4  # the host float32 copy FAISS searches
        budget = self.controller.budget
        while len(state.entries) >= self.config.max_entries:
            budget.evict(budget.least_recent(state))
        if not budget.admit(_Entry(key, r_h, r_e, state, nbytes)):
            self.controller.counters.add("too_big")

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class SimilarityCache(HookedCache):
    name = "simcache"
    hooks = (HOOK,)

    def __init__(self, transformer: torch.nn.Module, config: SimilarityCacheConfig, storage: torch.device) -> None:
        super().__init__(transformer, config.verbose)
        self.budget = EntryBudget(config.budget_bytes)
        self.storage = storage

    def reset(self, scope: Scope = "section") -> None:
        super().reset(scope)
        self.budget = EntryBudget(self.budget.budget)

    def stats(self):
        self.counters.extra.update(peak_mb=round(self.budget.peak / 2**20, 3), evicted=self.budget.evicted)
        return super().stats()


def apply_similarity_cache(transformer: torch.nn.Module, config: SimilarityCacheConfig) -> SimilarityCache:
    storage = torch.device("cpu") if config.storage == "cpu" else next(transformer.parameters()).device
    controller = SimilarityCache(transformer, config, storage)
    for name, block in blocks(transformer):
        register_hook(transformer, block, SimilarityBlockHook(config, controller, name), HOOK)
    return controller


def storage_for(budget_bytes: int, device: torch.device, preserve_gb: float) -> tuple[str, str]:
    """Entries stay on the compute device unless the budget would not fit beside the models there."""
    if device.type != "cuda":
        return "device", f"entries on {device.type}"
    free = cuda_free_bytes(device)
    spare = free - int(preserve_gb * 2**30)
    if budget_bytes <= spare:
        return "device", "entries on the GPU"
    return "cpu", f"budget {budget_bytes >> 20} MB > {max(spare, 0) >> 20} MB spare on the GPU: entries in host memory"


class SimilarityCachePass:
    name = "simcache"

    def config(self, settings: Settings) -> SimilarityCacheConfig:
        return SimilarityCacheConfig(
            threshold=settings.sim_cache_threshold,
            max_skip=settings.sim_cache_max_skip,
            max_entries=settings.sim_cache_max_entries,
            budget_bytes=settings.sim_cache_budget_mb << 20,
            use_faiss=settings.sim_cache_use_faiss,
            preserve_gb=settings.gpu_memory_preservation,
            verbose=settings.sim_cache_verbose,
        )

    def apply(self, bundle: ModelBundle, config: SimilarityCacheConfig, context: PassContext) -> PassReport:
        # without faiss the exact search gives the same entries (compat rule faiss-missing says so)
        config = replace(config, use_faiss=config.use_faiss and context.hardware.has("faiss"))
        where = f"entries on {config.storage}"
        if config.storage == "auto":
            storage, where = storage_for(config.budget_bytes, bundle.device, config.preserve_gb)
            config = replace(config, storage=storage)
        cache = apply_similarity_cache(bundle.transformer, config)
        search = "FAISS IndexFlatIP + exact ranking" if config.use_faiss else "exact"
        detail = (
            f"threshold {config.threshold}, {config.max_entries} entries/block, budget "
            f"{config.budget_bytes >> 20} MB, {search} search, {where}"
        )
        return PassReport(self.name, "applied", detail, extension=cache)
