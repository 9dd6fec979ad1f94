"""Step caches (first-block, TeaCache, similarity, context KV) and the encoder output cache."""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack_turbo.api import FramePack
from framepack_turbo.optim import modulecache, simcache

OPTS = dict(seconds=2, steps=6, resolution=64, seed=3)  # 2 sections of 6 steps
ONE_SECTION = dict(OPTS, seconds=1)
CACHES = {
    "fbcache": dict(enable_fbcache=True, fbcache_threshold=1.0, fbcache_max_skip=2),
    "teacache": dict(enable_teacache=True, teacache_threshold=1.0),
    "simcache": dict(enable_sim_cache=True, sim_cache_threshold=0.0, sim_cache_max_skip=2),
    "kvcache": dict(enable_kv_cache=True, kv_cache_refresh=3),
}
# settings that make each cache reuse nothing: the output must be the uncached one, bit for bit
NEVER_REUSE = {
    "fbcache": dict(enable_fbcache=True, fbcache_threshold=1e-9),
    "teacache": dict(enable_teacache=True, teacache_threshold=1e-9),
    "simcache": dict(enable_sim_cache=True, sim_cache_threshold=1.0),
    "kvcache": dict(enable_kv_cache=True, kv_cache_refresh=1),
}


def generate(fp, image, tmp_path, name="out", prompt="a cat", **options):
    return fp.generate(image, prompt, out=tmp_path / f"{name}.mp4", **{**OPTS, **options})


def load(**settings) -> FramePack:
    return FramePack.load("tiny-random", device="cpu", **settings)


def runs_of(kinds: list[str], kind: str) -> int:
    """Longest run of `kind` in a sequence."""
    return max((len(list(g)) for k, g in itertools.groupby(kinds) if k == kind), default=0)


def _teacache_fast(names):
    """Each cache's case, TeaCache's in the fast tier and the others' in `slow` (each costs whole clips; the
    per-cache unit tests above and below stay fast)."""
    return [n if n == "teacache" else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _teacache_fast(NEVER_REUSE))
def test_cache_that_reuses_nothing_changes_nothing(name, tiny, example_image, tmp_path):
    reference = generate(tiny, example_image, tmp_path, "ref")
    result = generate(load(**NEVER_REUSE[name]), example_image, tmp_path)
    assert torch.equal(result.latents, reference.latents)
    assert result.sidecar["caches"][name]["hit"] == 0


@pytest.mark.parametrize("name", _teacache_fast(CACHES))
def test_reuse_happens_and_is_recorded_per_section(name, tiny, example_image, tmp_path, decisions):
    reference = generate(tiny, example_image, tmp_path, "ref")
    result = generate(load(**CACHES[name]), example_image, tmp_path)
    record = result.sidecar["caches"][name]
    assert len(record["sections"]) == 2
    assert record["hit"] > 0 and 0 < record["hit_rate"] < 1
    assert record["hit"] == sum(s["hit"] for s in record["sections"])
    assert not torch.equal(result.latents, reference.latents)  # reuse is an approximation
    assert torch.isfinite(result.latents).all()
    # first and last step of every section computed
    for step in (0, OPTS["steps"] - 1):
        kinds = {kind for cache, _, s, kind, _ in decisions if s == step}
        assert kinds == {"forced"}, (step, kinds)


def test_first_block_cache_caps_consecutive_reuses(example_image, tmp_path, decisions):
    generate(load(**CACHES["fbcache"]), example_image, tmp_path, steps=10)
    per_section = [d[3] for d in decisions]
    assert len(per_section) == 20
    for section in (per_section[:10], per_section[10:]):
        assert section[0] == section[-1] == "forced"
        assert runs_of(section, "hit") == 2  # fbcache_max_skip


def test_teacache_follows_framepacks_rule(example_image, tmp_path, decisions):
    """Accumulated rescaled change: a computed step resets it, so the hit runs end where the sum crossed."""
    generate(load(enable_teacache=True, teacache_threshold=0.15), example_image, tmp_path, steps=10, seconds=1)
    accumulated = [float(d[4].split()[-1]) for d in decisions if d[3] in ("hit", "miss")]
    kinds = [d[3] for d in decisions if d[3] in ("hit", "miss")]
    for kind, total in zip(kinds, accumulated):
        assert (total >= 0.15) == (kind == "miss")


def test_similarity_cache_caps_reuses_per_block(example_image, tmp_path, decisions):
    generate(load(**CACHES["simcache"]), example_image, tmp_path, steps=10, seconds=1)
    by_block: dict[str, list[str]] = {}
    for _, _, _, kind, detail in decisions:
        by_block.setdefault(detail.split(":")[0], []).append(kind)
    assert len(by_block) == 2  # tiny: one dual-stream and one single-stream block
    for kinds in by_block.values():
        assert len(kinds) == 10 and runs_of(kinds, "hit") == 2


@pytest.mark.slow
def test_state_never_leaks_between_jobs_or_resolutions(example_image, tmp_path):
    """A cache used at one resolution, then another, gives what a fresh one gives at the second."""
    for name, settings in CACHES.items():
        used = load(**settings)
        generate(used, example_image, tmp_path, "first", resolution=96)
        again = generate(used, example_image, tmp_path, "second")
        fresh = generate(load(**settings), example_image, tmp_path, "fresh")
        assert torch.equal(again.latents, fresh.latents), name
        assert again.sidecar["caches"] == fresh.sidecar["caches"], name
        (cache,) = [e for e in used.extensions if e.kind == "cache"]
        assert cache.counters.counts == {}  # reset after the job


def test_separate_state_for_positive_and_negative_predictions(example_image, tmp_path, decisions):
    generate(load(**CACHES["kvcache"]), example_image, tmp_path, cfg=2.0, negative_prompt="blurry", seconds=1)
    assert {d[1] for d in decisions} == {"cond", "uncond"}
    cond = [d[3] for d in decisions if d[1] == "cond"]
    assert cond == [d[3] for d in decisions if d[1] == "uncond"]
    assert cond == ["forced", "hit", "hit", "miss", "hit", "forced"]  # refresh every 3 steps


def test_kv_reuse_at_the_same_inputs_matches_full_compute():
    """Reusing K/V recorded from the very same inputs must give the full computation's output."""
    fp = load(enable_kv_cache=True, kv_cache_refresh=100)
    transformer = fp.bundle.transformer
    g = torch.Generator().manual_seed(0)
    latents = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    config = transformer.config
    kwargs = dict(
        hidden_states=latents(1, 16, 3, 8, 8),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=latents(1, 7, config.text_embed_dim),
        encoder_attention_mask=torch.ones(1, 7, dtype=torch.long),
        pooled_projections=latents(1, config.pooled_projection_dim),
        image_embeds=latents(1, 5, config.image_proj_dim),
        indices_latents=torch.arange(1, 4),
        guidance=torch.tensor([10000.0]),
        latents_clean=latents(1, 16, 2, 8, 8),
        indices_latents_clean=torch.tensor([0, 4]),
        latents_history_2x=latents(1, 16, 2, 8, 8),
        indices_latents_history_2x=torch.tensor([5, 6]),
        latents_history_4x=latents(1, 16, 16, 8, 8),
        indices_latents_history_4x=torch.arange(7, 23),
        return_dict=False,
    )
    with torch.no_grad():
        with transformer.cache_context("cond", step_index=0, num_inference_steps=4):
            full = transformer(**kwargs)[0]
        with transformer.cache_context("cond", step_index=1, num_inference_steps=4):
            reused = transformer(**kwargs)[0]
    assert fp.extension("kvcache").counters.counts == {"forced": 1, "hit": 1}
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_len_bounds_the_cached_context(tiny, example_image, tmp_path):
    reference = generate(tiny, example_image, tmp_path, "ref", seconds=1)
    result = generate(load(enable_kv_cache=True, kv_cache_len=16), example_image, tmp_path, seconds=1)
    section = result.sidecar["caches"]["kvcache"]["sections"][0]
    assert section["hit"] == 0 and section["over_len"] == 1 and section["context_tokens"] > 16
    assert torch.equal(result.latents, reference.latents)  # too long: computed in full


# ---- similarity cache: search and memory --------------------------------------------------------


def test_faiss_and_exact_search_pick_the_same_entry():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(40, 256, generator=g), dim=1)
    exact, faiss_state = simcache._BlockState(False), simcache._BlockState(True)
    for state in (exact, faiss_state):
        budget = simcache.EntryBudget(1 << 30)
        for key in keys:
            budget.admit(simcache._Entry(key, torch.zeros(1), torch.zeros(1), state, 1))
    for _ in range(50):
        query = torch.randn(256, generator=g)
        query /= query.norm()
        (s1, e1), (s2, e2) = exact.best(query), faiss_state.best(query)
        assert s1 == s2 and exact.entries.index(e1) == faiss_state.entries.index(e2)


@pytest.mark.slow
def test_faiss_and_exact_give_identical_videos(example_image, tmp_path):
    pytest.importorskip("faiss")
    settings = dict(enable_sim_cache=True, sim_cache_threshold=0.5, sim_cache_max_skip=3)
    exact = generate(load(**settings), example_image, tmp_path, "exact")
    faiss = load(**settings, sim_cache_use_faiss=True)
    assert "FAISS" in next(r for r in faiss.reports if r.name == "simcache").detail
    fast = generate(faiss, example_image, tmp_path, "faiss")
    assert torch.equal(exact.latents, fast.latents)

    def counts(r):
        return [{k: s[k] for k in ("hit", "miss", "forced")} for s in r.sidecar["caches"]["simcache"]["sections"]]

    assert counts(exact) == counts(fast)  # (peak memory differs: FAISS keeps a host copy of the keys)


def test_entry_budget_evicts_least_recently_used():
    state = simcache._BlockState(False)
    budget = simcache.EntryBudget(300)
    entries = [simcache._Entry(torch.ones(1), torch.zeros(1), torch.zeros(1), state, 100) for _ in range(3)]
    for e in entries:
        assert budget.admit(e)
    budget.touch(entries[0])
    fourth = simcache._Entry(torch.ones(1), torch.zeros(1), torch.zeros(1), state, 100)
    budget.admit(fourth)
    assert state.entries == [entries[0], entries[2], fourth] and budget.used == 300 and budget.evicted == 1
    assert not budget.admit(simcache._Entry(torch.ones(1), torch.zeros(1), torch.zeros(1), state, 301))


@pytest.mark.slow
def test_similarity_cache_memory_and_entries_stay_bounded(example_image, tmp_path, monkeypatch):
    sizes = []
    admit = simcache.EntryBudget.admit

    def spy(self, entry):
        ok = admit(self, entry)
        sizes.append((self.used, self.budget, len(entry.owner.entries)))
        return ok

    monkeypatch.setattr(simcache.EntryBudget, "admit", spy)
    settings = dict(enable_sim_cache=True, sim_cache_threshold=1.0, sim_cache_max_entries=3, sim_cache_budget_mb=1)
    result = generate(load(**settings), example_image, tmp_path, steps=8, resolution=128)
    assert sizes and all(used <= budget and n <= 3 for used, budget, n in sizes)
    section = result.sidecar["caches"]["simcache"]["sections"][0]
    assert section["peak_mb"] <= 1 and section["evicted"] > 0


# ---- encoder output cache -----------------------------------------------------------------------


def _module_cache(tmp_path, **extra) -> FramePack:
    return load(enable_module_cache=True, runtime_cache_dir=str(tmp_path / "rc"), **extra)


def _entries(tmp_path):
    return sorted((tmp_path / "rc" / modulecache.SUBDIR).glob("*/*.safetensors"))


def test_module_cache_hits_a_repeated_prompt_and_misses_a_changed_one(example_image, tmp_path, tiny):
    fp = _module_cache(tmp_path)
    first = generate(fp, example_image, tmp_path, "a", seconds=1)
    assert first.sidecar["caches"]["modulecache"] == {
        "prompt_miss": 1,
        "image_miss": 1,
        "hit": 0,
        "miss": 2,
        "hit_rate": 0.0,
    }
    again = generate(fp, example_image, tmp_path, "b", seconds=1)
    assert again.sidecar["caches"]["modulecache"]["hit"] == 2
    assert torch.equal(again.latents, first.latents)
    assert torch.equal(first.latents, generate(tiny, example_image, tmp_path, "ref", seconds=1).latents)
    other = generate(fp, example_image, tmp_path, "c", prompt="a dog", seconds=1)
    assert other.sidecar["caches"]["modulecache"] == {
        "image_hit": 1,
        "prompt_miss": 1,
        "hit": 1,
        "miss": 1,
        "hit_rate": 0.5,
    }
    # persisted: a new process (a new cache object) hits too
    later = generate(_module_cache(tmp_path), example_image, tmp_path, "d", seconds=1)
    assert later.sidecar["caches"]["modulecache"]["hit"] == 2 and torch.equal(later.latents, first.latents)
    assert len(_entries(tmp_path)) == 3


def test_module_cache_key_holds_the_encoder_identity(tmp_path):
    fp = _module_cache(tmp_path)
    calls = []
    cache = fp.extension("modulecache")
    compute = lambda: calls.append(1) or _embeddings()  # noqa: E731
    cache.prompt("a cat", compute)
    other = modulecache.EncoderCache(cache.config, {**cache.text_identity, "llama": {"dtype": "torch.bfloat16"}}, {})
    other.prompt("a cat", compute)
    assert len(calls) == 2


def _embeddings(widths=None):
    """Stand-in prompt embeddings; `widths` (a cache's) makes them the shapes its encoders produce."""
    from framepack_turbo.pipeline.encode import PromptEmbeddings

    llama, clip = (widths or {}).get("llama", 8), (widths or {}).get("clip", 8)
    return PromptEmbeddings(
        torch.randn(1, 4, llama), torch.ones(1, 4, dtype=torch.long), torch.randn(1, clip), ("cut",)
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_or_foreign_cache_files_are_ignored(tmp_path, caplog, damage):
    cache = _module_cache(tmp_path).extension("modulecache")
    value = cache.prompt("a cat", _embeddings)
    (path,) = _entries(tmp_path)
    if damage == "garbage":
        path.write_bytes(b"\x80\x04not safetensors, and never unpickled")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:
        save_file({"llama": torch.zeros(1)}, str(path), metadata={"format": "someone-else"})
    calls = []
    with caplog.at_level(logging.WARNING):
        again = cache.prompt("a cat", lambda: calls.append(1) or value)
    assert calls == [1] and "ignoring" in caplog.text
    assert cache.stats()["ignored"] == 1
    fresh = modulecache.EncoderCache(cache.config, cache.text_identity, cache.image_identity)
    hit = fresh.prompt("a cat", lambda: pytest.fail("the rewritten entry must be used"))
    assert torch.equal(hit.llama, again.llama) and hit.truncations == ("cut",)


def test_module_cache_is_a_size_bounded_lru(tmp_path):
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    value = lambda: torch.zeros(1, 64, 4)  # noqa: E731
    probe = modulecache.EncoderCache(modulecache.ModuleCacheConfig(tmp_path / "probe"), {}, {})
    probe.image(images[0], value)
    entry_bytes = next((tmp_path / "probe").rglob("*.safetensors")).stat().st_size
    cache = modulecache.EncoderCache(modulecache.ModuleCacheConfig(tmp_path / "rc", 2 * entry_bytes + 10), {}, {})

    def insert(image) -> Path:
        before = set(_entries(tmp_path))
        cache.image(image, value)
        (new,) = set(_entries(tmp_path)) - before
        return new

    first, second = insert(images[0]), insert(images[1])
    now = time.time()
    os.utime(first, (now - 50, now - 50))
    os.utime(second, (now - 100, now - 100))
    cache.image(images[1], lambda: pytest.fail("must hit"))  # a hit makes it the most recent
    insert(images[2])
    assert not first.exists() and second.exists() and len(_entries(tmp_path)) == 2
    assert cache.stats()["evicted"] == 1


def test_loose_matching_is_opt_in_and_warns(tmp_path, caplog):
    cache = _module_cache(tmp_path).extension("modulecache")
    cache.prompt("A cat, walking.", _embeddings)
    calls = []
    cache.prompt("a cat walking", lambda: calls.append(1) or _embeddings())
    assert calls == [1]  # exact by default
    with caplog.at_level(logging.WARNING):
        loose = _module_cache(tmp_path / "loose", module_cache_loose_match=True).extension("modulecache")
        assert "loose matching is on" in caplog.text
        loose.prompt("A cat, walking.", lambda: _embeddings(loose.widths))
        loose.prompt("a cat walking", lambda: pytest.fail("loose match must hit"))
    assert "loose match: using the embeddings of 'A cat, walking.'" in caplog.text


def test_without_runtime_cache_the_module_cache_stays_in_memory(tmp_path):
    cache = load(enable_module_cache=True, runtime_cache=False, runtime_cache_dir=str(tmp_path / "rc")).extension(
        "modulecache"
    )
    cache.prompt("a cat", _embeddings)
    cache.prompt("a cat", lambda: pytest.fail("must hit in memory"))
    assert not (tmp_path / "rc").exists()


# ---- the plan ---------------------------------------------------------------------------------------


def test_stacked_step_caches_run_the_first_only(caplog):
    with caplog.at_level(logging.WARNING):
        fp = load(enable_fbcache=True, enable_sim_cache=True, enable_kv_cache=True)
    status = {p.name: p.status for p in fp.plan.passes}
    assert (status["fbcache"], status["simcache"], status["kvcache"]) == ("active", "skipped", "skipped")
    assert [e.name for e in fp.extensions if e.kind == "cache"] == ["fbcache"]
    assert "step-caches-exclusive" in caplog.text or "Only FRAMEPACK_ENABLE_FBCACHE runs" in caplog.text


def _framepack_teacache_decisions(inputs, threshold):
    """FramePack's TeaCache rule as its transformer applies it within one section: a call counter; the first
    and the last call computed with the accumulator restarted; otherwise the polynomial-rescaled relative L1
    change of block 0's modulated input (in the input's dtype) accumulates until it reaches the threshold,
    which computes the step and restarts it. Restated from FramePack's published source."""
    from framepack_turbo.optim.teacache import HUNYUAN_RESCALE

    rescale = np.poly1d(HUNYUAN_RESCALE)
    total, previous, out = 0.0, None, []
    for count, current in enumerate(inputs):
        if count in (0, len(inputs) - 1):
            compute, total = True, 0.0
        else:
            total += rescale(((current - previous).abs().mean() / previous.abs().mean()).item())
            compute = total >= threshold
            total = 0.0 if compute else total
        previous = current
        out.append(compute)
    return out


def test_teacache_makes_framepacks_decisions_on_recorded_inputs():
    """A recorded sequence of block-0 modulated inputs (bf16, as on a GPU; changes growing over the section):
    our hook's decisions equal FramePack's, and are pinned."""
    from diffusers.hooks.hooks import CacheContext, StateManager

    from framepack_turbo.optim.teacache import TeaCache, TeaCacheConfig, TeaCacheHeadHook, _State

    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 64, 32, generator=g)
    steps = 25
    inputs, current = [], base
    for i in range(steps):
        current = current + (0.02 + 0.004 * i) * current.abs().mean() * torch.randn(current.shape, generator=g)
        inputs.append(current.to(torch.bfloat16))
    hook = TeaCacheHeadHook(StateManager(_State), TeaCacheConfig(0.15), TeaCache(torch.nn.Linear(1, 1)))
    ours = []
    for i, modulated in enumerate(inputs):
        hook.state_manager.set_context(CacheContext("cond", step_index=i, num_inference_steps=steps))
        state = hook.state_manager.get_state()
        state.residual = torch.zeros(1)  # a computed step has left its residual
        ours.append(hook._should_compute(state, modulated))
        state.previous_modulated = modulated
    assert ours == _framepack_teacache_decisions(inputs, 0.15)
    pinned = "".join("C" if c else "-" for c in ours)
    assert pinned == "C--C--C--C--C--C-C-C-C-CC", pinned
    assert hook.controller.counters.counts["hit"] == pinned.count("-")
