"""The GPU check: one process that proves the project's CUDA paths and measures the full-size model.

    python scripts/gpu_check.py OUT_DIR                 # on a CUDA machine: the `full` preset at 640
    python scripts/gpu_check.py OUT_DIR --dry-run       # anywhere: the `small` preset, tiny shapes, CPU
    python scripts/gpu_check.py OUT_DIR --only baseline,fp8-scaled-mm --steps 6

Each check runs in turn and prints one JSON line (name, status ok/failed/skipped, reason, seconds,
s/step, peak allocated/reserved GB, PSNR against the bf16 baseline where it applies, and what the
check measured); a table follows at the end. OUT_DIR gets checks.jsonl, results.json (the rows and
the machine), table.md and errors.log (the traceback of each failed check).

Checks run in order of value (the first GPU run matters more than its tail): the bf16 baseline with
its model FLOP utilisation, placement v1/v2 with the card capped at 8 GB and an out-of-memory
step-down provoked on purpose, fp8 (scaled_mm, storage), int8 dynamic + compile, bf16 + regional
compile, the attention backends, the step caches, the VAE decode of a section, then the optional
packages (bitsandbytes, torch-tensorrt, the ONNX Runtime GPU providers, SageAttention /
FlashAttention 3), which skip with the reason when their wheels were not carried. Each check has a
time budget: one that overruns is stopped (a generation stops after its current step) and reported
failed, and the rest go on; once the whole budget (--budget-s, 9 minutes) is spent the remaining
checks are skipped with that reason. How to run it on a GPU machine and how to read it:
docs/benchmarks/README.md, "The GPU check".
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("framepack_turbo") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

IMAGE = ROOT / "examples" / "start.png"
PROMPT = "A cat walks across the room, looking at the camera"
GB = 2**30
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
CAPPED_GB = 8.0  # the placement checks' card
PRESERVE_GB = 6.0


class Skip(Exception):
    """The check cannot run here; the message says why."""


class OverBudget(BaseException):
    """Raised in the main thread when a check's budget runs out (BaseException: no library swallows it)."""


@dataclass
class Context:
    out: Path
    dry_run: bool
    device: str
    model: str
    resolution: int
    steps: int
    seconds: float
    fp: Any = None  # the loaded FramePack a check may leave for the next
    fp_label: str = ""
    baseline: Any = None  # the bf16 baseline's Result (frames, latents)
    peak_tflops: float | None = None
    measured_tflops: float | None = None
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpu-check-")))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def release(self) -> None:
        """Drop the loaded models (the next check loads its own)."""
        self.fp, self.fp_label = None, ""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def settings(self, **values: Any):
        from framepack_turbo.settings import Settings

        base = {"model": self.model, "device": self.device, "steps": self.steps, "resolution": self.resolution}
        return Settings.load({**base, **values}, source="api", environ={})

    def load(self, label: str, **values: Any):
        """A FramePack for these settings: the loaded one when it can switch to them without loading."""
        from framepack_turbo.api import FramePack

        settings = self.settings(**values)
        if self.fp is not None and self.fp.reconfigure(settings):
            self.fp_label = label
            return self.fp, 0.0
        self.release()
        started = time.perf_counter()
        self.fp = FramePack.load(settings=settings)
        self.fp_label = label
        return self.fp, time.perf_counter() - started

    def generate(self, fp, name: str, on_event=None, **options: Any):
        calls: list[dict] = []
        transformer = fp.bundle.transformer
        hook = transformer.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(dict(kwargs)) if not calls else None, with_kwargs=True
        )
        try:
            result = fp.generate(
                IMAGE,
                PROMPT,
                out=self.work / f"{name}.mp4",
                on_event=on_event,
                seconds=self.seconds,
                steps=self.steps,
                resolution=self.resolution,
                keep_frames=True,  # fidelity against the baseline on the frames as made, not their encode
                **options,
            )
        finally:
            hook.remove()
        return result, (calls[0] if calls else None)


@dataclass(frozen=True)
class Check:
    name: str
    budget_s: float
    run: Callable[[Context], dict[str, Any]]
    what: str


# ---- measurements ----------------------------------------------------------------------------------


def step_seconds(result) -> float | None:
    return result.sidecar.get("timings", {}).get("step_median")


def psnr_vs_baseline(ctx: Context, result) -> float | None:
    from framepack_turbo.bench.metrics import mean_psnr, psnr_per_frame

    if ctx.baseline is None or result.frames.shape != ctx.baseline.frames.shape:
        return None
    return round(mean_psnr(psnr_per_frame(result.frames, ctx.baseline.frames)), 2)


def run_row(ctx: Context, result, first_call, extra: dict | None = None) -> dict[str, Any]:
    from framepack_turbo.bench.flops import call_shape, transformer_flops

    row: dict[str, Any] = {"s_per_step": step_seconds(result), "psnr": psnr_vs_baseline(ctx, result)}
    row["frames"] = int(result.frames.shape[0])
    row["bucket"] = result.sidecar.get("image", {}).get("bucket")
    caches = result.sidecar.get("caches", {})
    if caches:
        row["caches"] = {k: v.get("hit_rate") for k, v in caches.items() if isinstance(v, dict)}
    if first_call is not None and row["s_per_step"]:
        config = result_transformer_config(ctx)
        calls = 2 if result.sidecar.get("options", {}).get("cfg", 1) > 1 else 1
        flops = calls * transformer_flops(config, call_shape(config, first_call))
        row["tflop_per_step"] = round(flops / 1e12, 2)
        achieved = flops / row["s_per_step"] / 1e12
        row["achieved_tflops"] = round(achieved, 1)
        if ctx.peak_tflops:
            row["mfu"] = round(achieved / ctx.peak_tflops, 3)
    return {**row, **(extra or {})}


def result_transformer_config(ctx: Context) -> dict:
    return dict(ctx.fp.bundle.transformer.config)


def _matmul_tflops(device: str) -> float:
    """The matrix rate in the dtype the model runs in here (bf16 on CUDA, float32 on the CPU)."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


# ---- the checks ------------------------------------------------------------------------------------


def check_environment(ctx: Context) -> dict[str, Any]:
    from framepack_turbo.hardware import Hardware, library_versions

    hardware = Hardware.detect(import_backends=True)
    row: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "libraries": library_versions(),
        "backends": {k: v for k, v in hardware.to_dict().get("backends", {}).items()},
        "wheels": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL_MODULES},
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        row.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            free_gb=round(free / GB, 1),
            total_gb=round(total / GB, 1),
        )
        ctx.peak_tflops = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in props.name), None)
        row["datasheet_dense_bf16_tflops"] = ctx.peak_tflops
    ctx.measured_tflops = _matmul_tflops(ctx.device)
    row["measured_matmul_tflops"] = round(ctx.measured_tflops, 3)
    if ctx.peak_tflops is None:
        ctx.peak_tflops = ctx.measured_tflops  # no datasheet entry (or the CPU): the measured rate is the ceiling
    return row


def check_baseline(ctx: Context) -> dict[str, Any]:
    fp, load_s = ctx.load("baseline", memory_mode="high-vram" if ctx.cuda else "auto")
    result, first = ctx.generate(fp, "baseline")
    ctx.baseline = result
    return run_row(ctx, result, first, {"load_s": round(load_s, 1), "dtype": str(fp.bundle.transformer.dtype)})


def _placement(mode: str) -> Callable[[Context], dict[str, Any]]:
    def check(ctx: Context) -> dict[str, Any]:
        if not ctx.cuda:
            raise Skip("needs CUDA: placement is a no-op on the CPU")
        ctx.release()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAPPED_GB * GB / total))
        try:
            fp, load_s = ctx.load(f"placement-{mode}", memory_mode=mode, gpu_memory_preservation=PRESERVE_GB)
            result, first = ctx.generate(fp, f"placement-{mode}")
            return run_row(ctx, result, first, {"load_s": round(load_s, 1), "capped_gb": CAPPED_GB})
        finally:
            ctx.release()
            torch.cuda.set_per_process_memory_fraction(1.0)

    return check


def check_oom_step_down(ctx: Context) -> dict[str, Any]:
    """All resident; when sampling starts (the encoders have run), the card is capped a quarter GB above
    what is allocated: the first section runs out of memory, the generator steps down to v1 and runs it
    again under the same cap."""
    from framepack_turbo.pipeline.events import StageStarted

    if not ctx.cuda:
        raise Skip("needs CUDA: there is no GPU memory to run out of")
    ctx.release()
    fp, load_s = ctx.load("oom", memory_mode="high-vram")
    total = torch.cuda.get_device_properties(0).total_memory
    capped: list[float] = []

    def cap_at_sampling(event) -> None:
        if isinstance(event, StageStarted) and event.stage == "sampling" and not capped:
            cap = torch.cuda.memory_allocated() + GB // 4
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
            capped.append(cap / GB)

    try:
        result, first = ctx.generate(fp, "oom", on_event=cap_at_sampling)
        placement = result.sidecar.get("placement") or {}
        if len(placement.get("history", [])) < 2:  # the first entry is the mode it started in
            raise AssertionError(f"no step-down recorded under a {capped} GB cap: {placement}")
        return run_row(ctx, result, first, {"capped_gb": round(capped[0], 1), "placement": placement})
    finally:
        ctx.release()
        torch.cuda.set_per_process_memory_fraction(1.0)


def _loaded(label: str, needs_cuda: str | None = None, **values: Any) -> Callable[[Context], dict[str, Any]]:
    """A check that loads these settings (or switches the loaded models to them) and runs one clip."""

    def check(ctx: Context) -> dict[str, Any]:
        if needs_cuda and not ctx.cuda:
            raise Skip(needs_cuda)
        fp, load_s = ctx.load(label, **values)
        refused = [p for p in fp.plan.passes if p.status == "skipped"]
        if refused:
            raise Skip("; ".join(f"{p.title}: {p.reason}" for p in refused))
        result, first = ctx.generate(fp, label)
        extra = {"load_s": round(load_s, 1), "plan": fp.plan.summary_lines()[0]}
        if values.get("enable_compile"):  # the first clip compiled: the second is the speed
            extra["first_clip_s"] = round(fp_total(result), 1)
            result, first = ctx.generate(fp, label + "-again")
        return run_row(ctx, result, first, extra)

    return check


def fp_total(result) -> float:
    return result.sidecar.get("timings", {}).get("total", math.nan)


def check_attention(ctx: Context) -> dict[str, Any]:
    from framepack_turbo.optim.attention import attention_backends

    fp, load_s = ctx.load("attention", xformers_mode="aggressive")
    result, first = ctx.generate(fp, "attention")
    return run_row(ctx, result, first, {"backends": sorted(attention_backends(fp.bundle.transformer))})


def check_vae_decode(ctx: Context) -> dict[str, Any]:
    from framepack_turbo.pipeline.vae import ChunkedDecode, decode_chunked

    if ctx.baseline is None or ctx.baseline.latents is None:
        raise Skip("needs the baseline's latents (the baseline check did not run)")
    fp, _ = ctx.load("vae", memory_mode="high-vram" if ctx.cuda else "auto")
    config = ChunkedDecode.from_settings(fp.settings)
    latents = ctx.baseline.latents.to(fp.bundle.vae.device)
    chunk = config.chunk_for(latents, fp.bundle.vae)  # what decode_chunked will choose (None: one pass)
    if ctx.cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    pixels = decode_chunked(latents, fp.bundle.vae, config)
    if ctx.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "decode_s": round(seconds, 2),
        "latent_frames": int(latents.shape[2]),
        "chunk_frames": chunk,
        "pixels": list(pixels.shape),
    }


def _optional(module: str, what: str, **values: Any) -> Callable[[Context], dict[str, Any]]:
    def check(ctx: Context) -> dict[str, Any]:
        if importlib.util.find_spec(module) is None:
            raise Skip(f"{module} is not installed (carry its wheel: scripts/gpu_wheels.sh)")
        if not ctx.cuda:
            raise Skip(f"{what} needs CUDA")
        return _loaded(module, **values)(ctx)

    return check


def check_onnx_providers(ctx: Context) -> dict[str, Any]:
    if importlib.util.find_spec("onnxruntime") is None:
        raise Skip("onnxruntime is not installed")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    if not gpu:
        raise Skip(f"this onnxruntime has no GPU provider ({', '.join(providers)}): carry onnxruntime-gpu")
    # Export of the 13B transformer does not fit the budget: the providers run the small preset's engines.
    return {"providers": providers}


def check_attention_wheels(ctx: Context) -> dict[str, Any]:
    present = {m: importlib.util.find_spec(m) is not None for m in ("sageattention", "flash_attn_interface")}
    if not any(present.values()):
        raise Skip("neither SageAttention nor FlashAttention 3 is installed (carry their wheels)")
    return check_attention(ctx) | {"present": present}


OPTIONAL_MODULES = (
    "diffusers",
    "torchao",
    "av",
    "bitsandbytes",
    "torch_tensorrt",
    "onnxruntime",
    "sageattention",
    "flash_attn",
    "flash_attn_interface",
    "xformers",
)
CACHES = {
    "teacache": {"enable_teacache": True},
    "fbcache": {"enable_fbcache": True},
    "simcache": {"enable_sim_cache": True},
    "kvcache": {"enable_kv_cache": True},
}
NEEDS_SCALED_MM = "fp8 matmuls need CUDA (compute capability >= 8.9)"

CHECKS: tuple[Check, ...] = (
    Check("environment", 60, check_environment, "versions, GPU, packages, a measured bf16 matmul rate"),
    Check("baseline", 120, check_baseline, "bf16, all resident: s/step and MFU"),
    Check("placement-v1", 150, _placement("v1"), "FramePack's offload, card capped at 8 GB, 6 GB kept free"),
    Check("placement-v2", 150, _placement("v2"), "blocks streamed from pinned memory, card capped at 8 GB"),
    Check("oom-step-down", 120, check_oom_step_down, "an out-of-memory provoked: high-vram steps down to v1"),
    Check(
        "fp8-scaled-mm",
        90,
        _loaded("fp8-scaled-mm", NEEDS_SCALED_MM, enable_fp8=True, fp8_use_scaled_mm=True),
        "FP8 weights, FP8 matmuls",
    ),
    Check("fp8-storage", 90, _loaded("fp8-storage", None, enable_fp8=True), "FP8 weights, bf16 matmuls"),
    Check(
        "int8+compile",
        180,
        _loaded("int8+compile", None, enable_quant=True, quant_bits=8, enable_compile=True),
        "torchao int8 dynamic activations + weights, compiled",
    ),
    Check("compile", 150, _loaded("compile", None, enable_compile=True), "bf16, regional torch.compile"),
    Check("attention", 60, check_attention, "the aggressive attention backend: which one, s/step, PSNR"),
    *(Check(name, 60, _loaded(name, None, **values), f"{name} on this device") for name, values in CACHES.items()),
    Check("vae-decode", 60, check_vae_decode, "VAE decode of the baseline section, chunk sized from free memory"),
    Check("bitsandbytes-8bit", 90, _optional("bitsandbytes", "bitsandbytes", use_bnb=True), "bnb int8"),
    Check(
        "bitsandbytes-4bit", 90, _optional("bitsandbytes", "bitsandbytes", use_bnb=True, bnb_load_in_4bit=True), "NF4"
    ),
    Check(
        "torch-tensorrt",
        180,
        _optional("torch_tensorrt", "torch-tensorrt", enable_tensorrt=True),
        "the transformer through torch-tensorrt",
    ),
    Check("onnx-gpu-providers", 30, check_onnx_providers, "ONNX Runtime's CUDA / TensorRT providers present"),
    Check("sage-flash3", 60, check_attention_wheels, "SageAttention / FlashAttention 3 when carried"),
)


# ---- the runner ------------------------------------------------------------------------------------


def _alarm(signum, frame) -> None:
    raise OverBudget


def run_check(check: Check, ctx: Context, errors) -> dict[str, Any]:
    row: dict[str, Any] = {"name": check.name, "what": check.what, "budget_s": check.budget_s}
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, check.budget_s)
    try:
        row.update(check.run(ctx))
        row["status"] = "ok"
    except Skip as exc:
        row.update(status="skipped", reason=str(exc))
    except OverBudget:
        row.update(status="failed", reason=f"stopped: over its budget of {check.budget_s:g} s")
        ctx.release()  # whatever it left half-built goes
    except Exception as exc:  # a failed check is a result: record it and go on
        row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
        errors.write(f"==== {check.name}\n{traceback.format_exc()}\n")
        errors.flush()
        if ctx.cuda and isinstance(exc, torch.OutOfMemoryError):
            ctx.release()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.perf_counter() - started, 1)
    if ctx.cuda:
        row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| check | status | s | s/step | MFU | peak alloc GB | peak reserved GB | PSNR dB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("reason") or r.get("plan") or ""
        lines.append(
            f"| {r['name']} | {r['status']} | {fmt(r.get('seconds'), '.1f')} | {fmt(r.get('s_per_step'), '.3f')} "
            f"| {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_allocated_gb'), '.1f')} "
            f"| {fmt(r.get('peak_reserved_gb'), '.1f')} | {fmt(r.get('psnr'), '.1f')} | {str(note)[:90]} |"
        )
    return "\n".join(lines)


def _keep_frames_without_pyav() -> str | None:
    """The GPU machine has no PyAV, and its 36 MB wheel does not fit the carry limit beside the others. The
    check measures the transformer and the VAE, not the mp4 encoder: without PyAV the clips stay in memory
    (the generator's Result, keep_frames) and the segment writes become no-ops, so the writer finds no
    segment to join and never imports PyAV. Returns the note, or None with PyAV."""
    if importlib.util.find_spec("av") is not None:
        return None
    from framepack_turbo.pipeline import generate, video

    def keep(frames, path, *args, **kwargs):
        return None

    video.write_mp4 = keep
    generate.video.write_mp4 = keep
    return "PyAV is not installed: no mp4 is written (the frames are compared in memory)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for checks.jsonl, results.json, table.md, errors.log")
    parser.add_argument("--dry-run", action="store_true", help="CPU, the small preset, tiny shapes")
    parser.add_argument("--only", default="", help="comma list of check names (environment and baseline always run)")
    parser.add_argument("--steps", type=int, default=None, help="steps per clip (GPU 5, dry run 2)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall time for all checks (9 minutes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [c.name for c in CHECKS]
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:
        print(f"error: unknown check(s) {', '.join(unknown)}; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to run the check on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        out=args.out,
        dry_run=args.dry_run,
        device="cpu" if args.dry_run else "cuda",
        model="small" if args.dry_run else "full",
        resolution=128 if args.dry_run else 640,
        steps=args.steps or (2 if args.dry_run else 5),
        seconds=1.2,  # one section of window 9: 33 frames
    )
    note = _keep_frames_without_pyav()
    if note:
        print(json.dumps({"note": note}), flush=True)
    selected = [c for c in CHECKS if not only or c.name in ("environment", "baseline", *only)]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with open(args.out / "errors.log", "w") as errors, open(args.out / "checks.jsonl", "w") as lines:
        for check in selected:
            left = args.budget_s - (time.perf_counter() - started)
            if left < 5:
                row = {
                    "name": check.name,
                    "what": check.what,
                    "status": "skipped",
                    "reason": "the run's budget is spent",
                }
            else:
                row = run_check(Check(check.name, min(check.budget_s, left), check.run, check.what), ctx, errors)
            rows.append(row)
            line = json.dumps(row, default=str)
            print(line, flush=True)
            lines.write(line + "\n")
            lines.flush()
    ctx.release()
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": rows[0].get("gpu", platform.processor() or "cpu") if rows else None,
        "model": ctx.model,
        "resolution": ctx.resolution,
        "steps": ctx.steps,
        "seconds_of_video": ctx.seconds,
        "wall_s": round(time.perf_counter() - started, 1),
        "note": note,
        "checks": rows,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    rendered = table(rows)
    (args.out / "table.md").write_text(rendered + "\n")
    print(rendered)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    print(f"{len(rows)} checks: {len(rows) - len(failed)} ok or skipped, {len(failed)} failed {failed or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
