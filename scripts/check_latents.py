"""Record the final latents of a set of configurations on `tiny-random`, or compare against a recording.

A refactor that must leave behaviour unchanged runs `record` on the old code and `compare` on the new:

    python scripts/check_latents.py record /tmp/before.safetensors
    python scripts/check_latents.py compare /tmp/before.safetensors      # exit 1 unless bit-identical

Each configuration runs in its own process (compiled graphs and caches of one never meet another's),
with the runtime cache in a fresh temporary folder (the ONNX export is made there on first use).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS: dict[str, dict] = {
    "baseline": {},
    "int8": {"enable_quant": True, "quant_bits": 8},
    "int8+compile": {"enable_quant": True, "quant_bits": 8, "enable_compile": True},
    "teacache": {"enable_teacache": True},
    "fbcache": {"enable_fbcache": True, "fbcache_threshold": 0.2},
    "simcache": {"enable_sim_cache": True, "sim_cache_threshold": 0.5},
    "kvcache": {"enable_kv_cache": True, "kv_cache_refresh": 2},
    "modulecache": {"enable_module_cache": True},
    "onnx": {"use_onnx_engines": True},
}
JOB = dict(seconds=2, steps=6, resolution=128)
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "start.png"


def run_one(name: str, out: Path) -> None:
    """One configuration, in this process: its latents and the step caches' counts."""
    from safetensors.torch import save_file

    from framepack_turbo import FramePack

    with tempfile.TemporaryDirectory() as tmp:
        fp = FramePack.load("tiny-random", device="cpu", runtime_cache_dir=Path(tmp) / "runtime", **CONFIGS[name])
        result = fp.generate(IMAGE, "a cat walks on the grass", out=Path(tmp) / "clip.mp4", **JOB)
    caches = {k: {s: v.get(s) for s in ("hit", "miss", "forced")} for k, v in result.sidecar.get("caches", {}).items()}
    save_file(
        {"latents": result.latents.contiguous()}, str(out), metadata={"caches": json.dumps(caches, sort_keys=True)}
    )


def _collect(workdir: Path) -> dict[str, Path]:
    paths = {}
    for name in CONFIGS:
        path = workdir / f"{name}.safetensors"
        subprocess.run([sys.executable, __file__, "one", name, str(path)], check=True)
        paths[name] = path
    return paths


def main(argv: list[str]) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    command, *rest = argv
    if command == "one":
        run_one(rest[0], Path(rest[1]))
        return 0
    target = Path(rest[0])
    with tempfile.TemporaryDirectory() as tmp:
        paths = _collect(Path(tmp))
        current = {name: load_file(str(p))["latents"] for name, p in paths.items()}
        caches = {}
        for name, p in paths.items():
            with safe_open(str(p), framework="pt") as f:
                caches[name] = f.metadata()["caches"]
    if command == "record":
        save_file(current, str(target), metadata=caches)
        print(f"recorded {', '.join(current)} in {target}")
        return 0
    reference = load_file(str(target))
    with safe_open(str(target), framework="pt") as f:
        reference_caches = f.metadata()
    failed = False
    for name, latents in current.items():
        ref = reference.get(name)
        same = ref is not None and ref.shape == latents.shape and bool((ref == latents).all())
        same_caches = reference_caches.get(name) == caches[name]
        diff = "" if ref is None or ref.shape != latents.shape else f", max |diff| {(ref - latents).abs().max():.3g}"
        print(
            f"{name:14} {'bit-identical' if same else 'DIFFERENT' + diff}; caches {caches[name]}"
            f"{'' if same_caches else ' (recorded: ' + str(reference_caches.get(name)) + ')'}"
        )
        failed |= not (same and same_caches)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
