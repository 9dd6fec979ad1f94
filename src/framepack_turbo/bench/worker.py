"""One configuration in its own process: load it once, then run generations on request.

Separate processes keep one configuration's memory (weights, caches, compiled graphs, allocator
state) from leaking into another's numbers, and make peak memory a per-configuration reading.
The coordinator sends `("run", index, keep)` and `("stop",)`; the worker answers with dicts.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framepack_turbo.constants import FPS


@dataclass(frozen=True)
class WorkerJob:
    config_name: str
    settings: dict[str, Any]  # common settings + the configuration's
    image_path: str
    prompt: str
    out_dir: str
    track: tuple[str, str] | None = None  # (colour, motion) the prompt asks of a trained world model's object


def _peak_host_gb() -> float:
    # ru_maxrss is KiB on Linux and bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def prepare(job: WorkerJob) -> tuple[Any, dict[str, Any]]:
    """Check, plan and load the configuration. Returns (FramePack or None, status dict)."""
    from framepack_turbo import compat
    from framepack_turbo.api import FramePack
    from framepack_turbo.hardware import Hardware
    from framepack_turbo.optim.plan import make_plan
    from framepack_turbo.settings import Settings

    settings = Settings.load(job.settings, source="cli", environ={})  # configurations say everything
    hardware = Hardware.detect()
    report = compat.check(settings, hardware)
    if report.has_critical:
        return None, {"status": "failed", "reason": "; ".join(f"{f.id}: {f.message}" for f in report.critical)}
    plan = make_plan(settings, report, hardware)
    missing = [p for p in plan.passes if p.status == "skipped"]
    if missing:
        # Running it would time the baseline under another name.
        reason = "; ".join(f"{p.title} {p.status}: {p.reason}" for p in missing)
        return None, {"status": "skipped", "reason": reason}
    started = time.perf_counter()
    fp = FramePack.load(settings=settings)
    return fp, {
        "status": "ready",
        "load_s": time.perf_counter() - started,
        "plan": plan.to_list(),
        "device": str(fp.bundle.device),
    }


def _graph_count(fp) -> int:
    if fp.extension("compile") is None:
        return 0
    from framepack_turbo.optim.compile import compiled_graph_count

    return compiled_graph_count()


def run_once(fp, job: WorkerJob, index: int, keep: bool) -> dict[str, Any]:
    """One generation; with `keep`, the outputs the fidelity metrics need are saved for the coordinator."""
    import torch
    from safetensors.torch import save_file

    cuda = fp.bundle.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first_output: list[torch.Tensor] = []

    def capture(module, args, output):
        if not first_output:
            tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            first_output.append(tensor.detach().float().cpu())

    hook = fp.bundle.transformer.register_forward_hook(capture)
    graphs_before = _graph_count(fp)
    try:
        out = Path(job.out_dir) / f"{job.config_name.replace(':', '_').replace('+', '_')}_{index}.mp4"
        result = fp.generate(job.image_path, job.prompt, out=out, keep_frames=keep)  # fidelity: frames as made
    finally:
        hook.remove()
    record: dict[str, Any] = {
        "status": "ok",
        "index": index,
        "timings": result.sidecar["timings"],
        "frames": int(result.sidecar["frames"]),
        "video_seconds": result.sidecar["frames"] / FPS,
        "peak_host_gb": _peak_host_gb(),
    }
    if job.track:
        from framepack_turbo.train.world import observed_motion

        record["motion"] = observed_motion(result.frames, job.track[0])
    caches = result.sidecar.get("caches", {})
    if caches:
        record["caches"] = {
            name: {k: c[k] for k in ("hit", "miss", "forced", "hit_rate") if k in c} for name, c in caches.items()
        }
    if fp.extension("compile") is not None:
        record["compiled_graphs"] = _graph_count(fp) - graphs_before  # 0 once warm: no recompilation
    if cuda:
        record["peak_gpu_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    if keep:
        tensors = {
            "first_output": first_output[0].contiguous(),
            "latents": result.latents.contiguous(),
            "frames": torch.from_numpy(result.frames).contiguous(),
        }
        path = out.with_suffix(".safetensors")
        save_file(tensors, str(path))
        record["outputs"] = str(path)
    out.unlink(missing_ok=True)  # the videos themselves are not needed
    out.with_suffix(".json").unlink(missing_ok=True)
    return record


def main(conn, job: WorkerJob) -> None:
    """Process entry point (spawned). Never raises: every failure becomes a message."""
    os.chdir(job.out_dir)  # relative artifact paths (JIT_ARTIFACT, OPTIMIZED_TRANSFORMER) stay in the bench's folder
    from framepack_turbo.errors import FramePackError
    from framepack_turbo.logs import quiet_libraries

    quiet_libraries()

    try:
        fp, status = prepare(job)
    except FramePackError as exc:  # cannot run here (no GPU for it, weights missing): a skipped row
        status, fp = {"status": "skipped", "reason": str(exc)}, None
    except Exception as exc:  # a broken configuration is a failed row, not a crashed bench
        status, fp = (
            {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()},
            None,
        )
    conn.send(status)
    if fp is None:
        return
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        _, index, keep = message
        try:
            conn.send(run_once(fp, job, index, keep))
        except Exception as exc:
            conn.send({"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
            break
