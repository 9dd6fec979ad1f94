"""Encoder output cache (ENABLE_MODULE_CACHE; kept under RUNTIME_CACHE_DIR when RUNTIME_CACHE=1).

Text (LLaMA + CLIP) and image (SigLIP) encoder outputs, keyed by an exact hash of the input (the
prompt's text; the bucket-cropped image's pixels) and of the encoder's identity (class, weights
source and revision, a fingerprint of its weights, dtype, device type, attention implementation,
quantization). Re-running a prompt or an image skips the 8B LLaMA / SigLIP forward. Another prompt
never gets these embeddings, unless the user opts into loose matching (case, spacing and
punctuation ignored), which warns at load and on every loose hit.

Persistence (the runtime cache): one safetensors file per entry, written atomically (temp file +
rename); its header metadata carries a format tag, version, kind, key, the tensors' shapes and
dtypes and a SHA-256 of their bytes, and an entry is used only if all match, every value is finite
and the shapes are what this model's encoders produce. A corrupt, tampered or foreign file is
ignored with a warning, recomputed and overwritten; nothing is ever unpickled. A cache folder that
cannot be written (read-only, another user's) is read as far as it can be, with a warning. The folder is an LRU bounded in bytes: a hit refreshes the
file's time, a save evicts the oldest files past the budget. With RUNTIME_CACHE=0 the same cache
lives in memory for the process (several jobs of one `FramePack`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framepack_turbo.optim.base import Extension, PassContext, PassReport, Scope
from framepack_turbo.pipeline.encode import PromptEmbeddings
from framepack_turbo.pipeline.record import hit_rate

if TYPE_CHECKING:
    from framepack_turbo.models.loading import ModelBundle
    from framepack_turbo.settings import Settings

log = logging.getLogger(__name__)

FORMAT = "framepack-turbo-module-cache"
VERSION = "2"  # 2: entries carry their tensors' shapes and a checksum of their bytes
SUBDIR = f"module_cache_v{VERSION}"


@dataclass(frozen=True)
class ModuleCacheConfig:
    """`directory`: where entries persist (None: in memory for this process). `max_bytes`: LRU budget.
    `loose_match`: prompts equal up to case, spacing and punctuation share an entry (approximate)."""

    directory: Path | None
    max_bytes: int = 2048 << 20
    loose_match: bool = False


def module_identity(module: torch.nn.Module) -> dict[str, str]:
    """What makes two encoders give the same outputs for the same input."""
    from framepack_turbo.models.loading import weights_fingerprint

    config = getattr(module, "config", None)
    params = list(module.parameters())
    return {
        "class": type(module).__name__,
        "source": str(getattr(config, "_name_or_path", "")),
        "revision": str(getattr(config, "_commit_hash", "") or ""),
        "dtype": str(params[0].dtype) if params else "",
        "device": params[0].device.type if params else "",
        "attention": str(getattr(config, "_attn_implementation", "")),
        "quantization": str(getattr(config, "quantization_config", "") or ""),
        "weights": weights_fingerprint(module),
    }


def loose_text(prompt: str) -> str:
    """The loose-match form of a prompt: NFKC, case-folded, punctuation dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKC", prompt).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return re.sub(r"\s+", " ", text).strip()


def _key(kind: str, identity: dict[str, Any], payload: bytes) -> str:
    head = json.dumps({"format": FORMAT, "version": VERSION, "kind": kind, "identity": identity}, sort_keys=True)
    return hashlib.sha256(head.encode() + b"\0" + payload).hexdigest()


class EncoderCache(Extension):
    """The pass's extension: answers the generator's "prompt" and "image" lookups; counts per job."""

    name = "modulecache"
    kind = "job_cache"

    def __init__(
        self,
        config: ModuleCacheConfig,
        text_identity: dict[str, Any],
        image_identity: dict[str, Any],
        widths: dict[str, int] | None = None,
    ):
        self.config = config
        self.widths = widths or {}  # llama / clip / image: the feature width each encoder produces
        self.text_identity = text_identity
        self.image_identity = image_identity
        self.memory: OrderedDict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = OrderedDict()
        self.memory_bytes = 0
        self.counts: dict[str, int] = {}

    # ---- the extension ------------------------------------------------------------------------

    def lookup(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        if kind == "prompt":
            return self.prompt(key, compute)
        if kind == "image":
            return self.image(key, compute)
        return compute()

    def reset(self, scope: Scope) -> None:
        if scope == "job":
            self.counts = {}

    def stats(self) -> dict[str, Any]:
        """Hits and misses since the job started, by kind."""
        hits = sum(v for k, v in self.counts.items() if k.endswith("_hit"))
        misses = sum(v for k, v in self.counts.items() if k.endswith("_miss"))
        return {**self.counts, "hit": hits, "miss": misses, "hit_rate": hit_rate({"hit": hits, "miss": misses})}

    # ---- the two lookups ----------------------------------------------------------------------

    def prompt(self, prompt: str, compute: Callable[[], PromptEmbeddings]) -> PromptEmbeddings:
        text = loose_text(prompt) if self.config.loose_match else prompt
        key = _key("prompt", self.text_identity, text.encode())
        found = self._get(key, "prompt")
        if found is not None:
            tensors, meta = found
            if meta.get("prompt") != prompt:
                log.warning("Module cache: loose match: using the embeddings of %r for %r", meta.get("prompt"), prompt)
            truncations = tuple(json.loads(meta.get("truncations", "[]")))
            return PromptEmbeddings(tensors["llama"], tensors["mask"], tensors["clip_pooled"], truncations)
        value = compute()
        tensors = {"llama": value.llama, "mask": value.mask, "clip_pooled": value.clip_pooled}
        self._put(key, "prompt", tensors, {"prompt": prompt, "truncations": json.dumps(list(value.truncations))})
        return value

    def image(self, picture: np.ndarray, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        payload = (
            json.dumps([list(picture.shape), str(picture.dtype)]).encode() + np.ascontiguousarray(picture).tobytes()
        )
        key = _key("image", self.image_identity, payload)
        found = self._get(key, "image")
        if found is not None:
            return found[0]["image_embeds"]
        value = compute()
        self._put(key, "image", {"image_embeds": value}, {})
        return value

    # ---- storage ------------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _path(self, key: str) -> Path:
        return self.config.directory / SUBDIR / key[:2] / f"{key}.safetensors"

    def _get(self, key: str, kind: str):
        found = self._read(key) if self.config.directory is not None else self._from_memory(key)
        self._count(f"{kind}_{'hit' if found is not None else 'miss'}")
        log.debug("Module cache %s %s: %s", kind, key[:12], "hit" if found is not None else "miss")
        return found

    def _from_memory(self, key: str):
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        return None

    def _read(self, key: str):
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("key") != key:
                    raise ValueError("not an entry of this cache (format, version or key differ)")
                # copied: memory-mapped tensors sit at unaligned offsets and CPU kernels round differently on them
                tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
            self._check_entry(meta, tensors)
        except Exception as exc:  # corrupt, truncated, tampered, foreign: never trusted, replaced on the next save
            log.warning("Module cache: ignoring %s: %s", path, exc)
            self._count("ignored")
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError as exc:  # a read-only or foreign cache still answers; it just keeps its order
            log.debug("Module cache: cannot touch %s: %s", path, exc)
        return tensors, meta

    def _check_entry(self, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError unless the tensors are the ones written (shapes, dtypes, checksum), finite, and of
        the widths this model's encoders produce."""
        if json.loads(meta.get("shapes", "{}")) != _shapes(tensors):
            raise ValueError("tensor shapes or dtypes differ from the entry's record")
        if meta.get("sha256") != _digest(tensors):
            raise ValueError("tensor data does not match the entry's checksum (modified or corrupt)")
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            raise ValueError("the entry holds NaN or infinite values")
        expected = {
            "prompt": {"llama": ("llama", 3), "clip_pooled": ("clip", 2)},
            "image": {"image_embeds": ("image", 3)},
        }.get(meta.get("kind", ""), {})
        for name, (encoder, ndim) in expected.items():
            tensor = tensors.get(name)
            width = self.widths.get(encoder)
            if tensor is None or tensor.ndim != ndim or (width is not None and tensor.shape[-1] != width):
                raise ValueError(
                    f"{name} has shape {None if tensor is None else tuple(tensor.shape)}, not this model's"
                )
        if "mask" in tensors and tensors["mask"].shape != tensors["llama"].shape[:2]:
            raise ValueError("the prompt mask does not fit its embeddings")

    def _put(self, key: str, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"format": FORMAT, "version": VERSION, "key": key, "kind": kind, **meta}
        meta.update(shapes=json.dumps(_shapes(tensors)), sha256=_digest(tensors))
        if self.config.directory is None:
            self.memory[key] = (tensors, meta)
            self.memory_bytes += _nbytes(tensors)
            while self.memory_bytes > self.config.max_bytes and len(self.memory) > 1:
                _, (old, _) = self.memory.popitem(last=False)
                self.memory_bytes -= _nbytes(old)
            return
        from framepack_turbo.files import atomic_path

        path = self._path(key)
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, tmp, metadata=meta)
        except OSError as exc:  # a full or read-only disk costs the cache, not the job
            log.warning("Module cache: could not write %s: %s", path, exc)
            return
        self._evict()

    def _evict(self) -> None:
        files = []
        for path in (self.config.directory / SUBDIR).glob("*/*.safetensors"):
            try:
                st = path.stat()
            except OSError:  # evicted by another process meanwhile
                continue
            files.append((st.st_mtime, st.st_size, path))
        files.sort(key=lambda item: item[0])
        total = sum(size for _, size, _ in files)
        for _, size, path in files[:-1]:  # never the newest: it was just written
            if total <= self.config.max_bytes:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("Module cache: could not evict %s: %s", path, exc)
                return
            total -= size
            self._count("evicted")


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in sorted(tensors.items())}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode() + b"\0")
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ModuleCachePass:
    name = "modulecache"

    def config(self, settings: Settings) -> ModuleCacheConfig:
        directory = Path(settings.runtime_cache_dir) if settings.runtime_cache else None
        return ModuleCacheConfig(directory, settings.module_cache_max_mb << 20, settings.module_cache_loose_match)

    def apply(self, bundle: ModelBundle, config: ModuleCacheConfig, context: PassContext) -> PassReport:
        text = {"llama": module_identity(bundle.text_encoder), "clip": module_identity(bundle.text_encoder_2)}
        image = {
            "siglip": module_identity(bundle.image_encoder),
            "size": str(getattr(bundle.feature_extractor, "size", "")),
        }
        widths = {
            "llama": bundle.text_encoder.config.hidden_size,
            "clip": bundle.text_encoder_2.config.hidden_size,
            "image": bundle.image_encoder.config.hidden_size,
        }
        cache = EncoderCache(config, text, image, widths)
        if config.loose_match:
            log.warning(
                "Module cache loose matching is on: a prompt that differs only in case, spacing or punctuation "
                "reuses another prompt's embeddings (approximate; each such hit is logged)."
            )
        where = f"{config.directory / SUBDIR}" if config.directory is not None else "memory (RUNTIME_CACHE=0)"
        match = "loose" if config.loose_match else "exact"
        return PassReport(
            self.name, "applied", f"{match} match, up to {config.max_bytes >> 20} MB in {where}", extension=cache
        )
