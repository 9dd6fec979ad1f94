"""The coordinator: one worker process per configuration, warm-up, then runs interleaved A B A B ...

Interleaving spreads machine drift (thermal, other load) over every configuration alike, so the
ratios to the baseline stay honest. Every configuration sees the same image, prompt and seed.
The warm-up run is reported apart (it holds compilation and engine builds); medians come from the
timed repeats. Fidelity compares each configuration's first timed run with the baseline's; the
noise floor compares two baseline runs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from framepack_turbo.bench import metrics
from framepack_turbo.bench.configs import BenchConfig
from framepack_turbo.bench.worker import WorkerJob
from framepack_turbo.bench.worker import main as worker_main

log = logging.getLogger(__name__)

PROMPT = "A red ball bounces across a wooden table, the camera stays still, soft daylight."
STAGES = ("text_encode", "image_encode", "transformer", "vae_decode", "write", "total")
WORKER_TIMEOUT_S = 6 * 3600  # one generation; a hung worker is ended after this


@dataclass(frozen=True)
class BenchSpec:
    configs: list[BenchConfig]
    model: str = "tiny"
    variant: str | None = None
    seconds: float = 2.0
    steps: int = 4
    resolution: int = 128
    repeats: int = 2
    seed: int = 31337
    device: str | None = None
    sequential: bool = False  # one configuration at a time (when several do not fit in memory together)
    model_dir: str | None = None  # every configuration loads these weights (the layout of --model-dir)
    loras: tuple[str, ...] = ()  # every configuration runs with these LoRAs (PATH[:WEIGHT]; `no-lora` drops them)
    # two processes at a time: the baseline's, kept through the run, and one configuration's, each of whose
    # timed runs follows a baseline run (sweeps of many configurations in bounded memory, drift spread alike)
    paired: bool = False

    def common_settings(self) -> dict[str, Any]:
        values = dict(
            model=self.model,
            loras=self.loras or None,
            variant=self.variant,
            seconds=self.seconds,
            steps=self.steps,
            resolution=self.resolution,
            seed=self.seed,
            device=self.device,
            model_dir=self.model_dir,
        )
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class ConfigRun:
    config: BenchConfig
    status: str = "pending"  # ready / ok / skipped / failed
    reason: str = ""
    load_s: float | None = None
    warmup: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    outputs: str | None = None  # first timed run's saved tensors
    plan: list[dict[str, str]] = field(default_factory=list)


def _lossy(run: ConfigRun) -> bool:
    """From the plan the row ran with (active lossy passes), else from its settings."""
    if run.plan:
        return any(p.get("lossy") and p["status"] == "active" for p in run.plan)
    return run.config.lossy


def make_test_image(path: Path, width: int = 768, height: int = 576) -> Path:
    """The bench's start image: smooth gradients, hard edges and fine texture, so every codec and
    metric has something to measure. Deterministic."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200 + 30, y / height * 180 + 40, 120 + 60 * np.sin(x / 23) * np.cos(y / 31)], -1)
    ball = (x - width * 0.35) ** 2 + (y - height * 0.55) ** 2 < (height * 0.18) ** 2
    img[ball] = (225, 40, 35)
    table = y > height * 0.75
    img[table] = np.stack([150 + 20 * np.sin(x[table] / 3), 100 + 10 * np.sin(x[table] / 5), 60 + 0 * x[table]], -1)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


def bench_input(spec: BenchSpec, out_dir: Path) -> tuple[Path, str, tuple[str, str] | None]:
    """(start image, prompt, what the prompt asks of the object). The trained `tiny` preset gets a scene
    of the world it learned and that scene's prompt, so a configuration's row can also say whether the
    object still moves as prompted; other models get the synthetic test image."""
    if spec.model != "tiny" or spec.model_dir is not None:
        return make_test_image(out_dir / "start.png"), PROMPT, None
    from PIL import Image

    from framepack_turbo.train import world

    scene = world.DEMO_SCENE
    path = out_dir / "start.png"
    Image.fromarray(world.render(scene, 1, spec.resolution)[0]).save(path)
    return path, scene.prompt, (scene.color, scene.motion)


class _Worker:
    def __init__(self, ctx, job: WorkerJob) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, job), daemon=True, name=f"bench-{job.config_name}")
        self.process.start()
        child.close()

    def receive(self, timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(1.0):
                try:
                    return self.conn.recv()
                except EOFError:
                    break
            if not self.process.is_alive() and not self.conn.poll(0):
                break
        code = self.process.exitcode
        self.process.kill()
        return {"status": "failed", "reason": f"worker process died (exit code {code}; out of memory?)"}

    def request(self, index: int, keep: bool) -> dict[str, Any]:
        try:
            self.conn.send(("run", index, keep))
        except (BrokenPipeError, OSError):
            return {"status": "failed", "reason": "worker process is gone"}
        return self.receive()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run(spec: BenchSpec, work_dir: Path | None = None, on_progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run the benchmark; returns the raw results (what report.py formats)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter per configuration: no shared CUDA or allocator state
    own_dir = work_dir is None
    tmp = tempfile.TemporaryDirectory(prefix="framepack-bench-") if own_dir else None
    out_dir = Path(tmp.name if tmp else work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, prompt, track = bench_input(spec, out_dir)
    common = spec.common_settings()
    started = time.time()
    runs = {c.name: ConfigRun(c) for c in spec.configs}
    try:
        if spec.paired:
            _run_paired(ctx, spec.configs, runs, spec, common, (image, prompt, track), out_dir, on_progress)
        elif spec.sequential:
            for config in spec.configs:
                _run_configs(ctx, [config], runs, spec, common, (image, prompt, track), out_dir, on_progress)
        else:
            _run_configs(ctx, spec.configs, runs, spec, common, (image, prompt, track), out_dir, on_progress)
        results = _summarise(spec, runs)
        results["input"] = {"prompt": prompt, "expected_motion": track[1] if track else None}
    finally:
        if tmp:
            tmp.cleanup()
    results["wall_s"] = time.time() - started
    return results


def _run_configs(ctx, configs, runs, spec, common, inputs, out_dir, on_progress) -> None:
    workers: dict[str, _Worker] = {}
    try:
        for config in configs:
            # runtime caches (encoder outputs, ONNX exports) live and die with the bench's folder
            settings = {**common, "runtime_cache_dir": str(out_dir / "runtime_caches"), **config.settings}
            image, prompt, track = inputs
            job = WorkerJob(config.name, settings, str(image), prompt, str(out_dir), track)
            workers[config.name] = _Worker(ctx, job)
        for name, worker in workers.items():
            status = worker.receive()
            r = runs[name]
            r.status, r.reason = status["status"], status.get("reason", "")
            r.load_s, r.plan = status.get("load_s"), status.get("plan", [])
            on_progress(f"{name}: {r.status}{': ' + r.reason if r.reason else ''}")
        live = [n for n in workers if runs[n].status == "ready"]
        for name in live:  # warm-up: compilation, engine builds, allocator growth
            r = runs[name]
            r.warmup = workers[name].request(-1, keep=False)
            if r.warmup["status"] != "ok":
                r.status, r.reason = "failed", r.warmup["reason"]
        # timed repeats, interleaved; the baseline runs one extra time for the noise floor if needed
        extra_baseline = 1 if spec.repeats < 2 else 0
        for index in range(spec.repeats + extra_baseline):
            for name in live:
                r = runs[name]
                if r.status in ("failed", "skipped") or (index >= spec.repeats and name != "baseline"):
                    continue
                record = workers[name].request(index, keep=index < 2 and (name == "baseline" or index == 0))
                if record["status"] != "ok":
                    r.status, r.reason = "failed", record["reason"]
                    continue
                r.runs.append(record)
                on_progress(f"{name}: run {index + 1}: {record['timings']['step_median']:.4f} s/step")
        for name in live:
            if runs[name].status == "ready":
                runs[name].status = "ok"
    finally:
        for worker in workers.values():
            worker.stop()


def _start(ctx, config, common, inputs, out_dir, runs, on_progress) -> _Worker | None:
    """A configuration's worker, loaded and warmed up; None (its row says why) when it cannot run."""
    settings = {**common, "runtime_cache_dir": str(out_dir / "runtime_caches"), **config.settings}
    image, prompt, track = inputs
    worker = _Worker(ctx, WorkerJob(config.name, settings, str(image), prompt, str(out_dir), track))
    status = worker.receive()
    r = runs[config.name]
    r.status, r.reason = status["status"], status.get("reason", "")
    r.load_s, r.plan = status.get("load_s"), status.get("plan", [])
    on_progress(f"{config.name}: {r.status}{': ' + r.reason if r.reason else ''}")
    if r.status == "ready":
        r.warmup = worker.request(-1, keep=False)
        if r.warmup["status"] != "ok":
            r.status, r.reason = "failed", r.warmup["reason"]
    if r.status != "ready":
        worker.stop()
        return None
    return worker


def _run_paired(ctx, configs, runs, spec, common, inputs, out_dir, on_progress) -> None:
    baseline, *others = configs
    base = _start(ctx, baseline, common, inputs, out_dir, runs, on_progress)
    if base is None:
        return
    try:
        count = 0
        for config in others:
            worker = _start(ctx, config, common, inputs, out_dir, runs, on_progress)
            if worker is None:
                continue
            r = runs[config.name]
            try:
                for index in range(spec.repeats):
                    for name, w in (("baseline", base), (config.name, worker)):
                        run_index = count if name == "baseline" else index
                        keep = run_index < 2 if name == "baseline" else index == 0
                        record = w.request(run_index, keep=keep)
                        target = runs[name]
                        if record["status"] != "ok":
                            target.status, target.reason = "failed", record["reason"]
                            break
                        target.runs.append(record)
                        count += name == "baseline"
                    if r.status == "failed" or runs["baseline"].status == "failed":
                        break
                if r.runs:
                    median = statistics.median(_step_seconds(x) for x in r.runs)
                    on_progress(f"{config.name}: {median:.4f} s/step over {len(r.runs)} runs")
            finally:
                worker.stop()
            if r.status == "ready":
                r.status = "ok"
            if runs["baseline"].status == "failed":
                return
        if len(runs["baseline"].runs) < 2:  # the noise floor needs two baseline runs
            record = base.request(count, keep=True)
            if record["status"] == "ok":
                runs["baseline"].runs.append(record)
        if runs["baseline"].status == "ready":
            runs["baseline"].status = "ok"
    finally:
        base.stop()


def _median_range(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _load(path: str):
    from safetensors.torch import load_file

    return load_file(path)


def _fidelity(candidate: dict, reference: dict) -> dict[str, Any]:
    psnr = metrics.psnr_per_frame(candidate["frames"].numpy(), reference["frames"].numpy())
    ssim = metrics.ssim_per_frame(candidate["frames"].numpy(), reference["frames"].numpy())
    return {
        "first_step_rel_l2": metrics.relative_l2(candidate["first_output"], reference["first_output"]),
        "first_step_cosine": metrics.cosine(candidate["first_output"], reference["first_output"]),
        "latents_rel_l2": metrics.relative_l2(candidate["latents"], reference["latents"]),
        "psnr_db": metrics.mean_psnr(psnr),
        "ssim": statistics.fmean(ssim),
        "psnr_per_frame": psnr,
        "ssim_per_frame": ssim,
    }


def _step_seconds(run: dict[str, Any]) -> float:
    """Transformer seconds per step of one generation: a step a cache skipped counts at what it cost.
    (The median single step would hide a cache's saving: skipped and computed steps alternate.)"""
    return run["timings"]["transformer"] / run["timings"]["steps"]


def _identical_groups(kept: dict[str, str]) -> list[list[str]]:
    """Configurations whose final latents and decoded frames are bit-identical, in groups of two or more."""
    import torch

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in ("latents", "frames"))

    groups: list[tuple[Any, list[str]]] = []
    for name, path in kept.items():
        outputs = _load(path)
        for reference, names in groups:
            if same(reference, outputs):
                names.append(name)
                break
        else:
            groups.append((outputs, [name]))
    return [names for _, names in groups if len(names) > 1]


def _summarise(spec: BenchSpec, runs: dict[str, ConfigRun]) -> dict[str, Any]:
    from framepack_turbo.hardware import Hardware, library_versions

    baseline = runs["baseline"]
    # paired: every baseline run counts (one before each of every configuration's)
    timed = {name: r.runs if spec.paired and name == "baseline" else r.runs[: spec.repeats] for name, r in runs.items()}
    base_step = _median_range([_step_seconds(x) for x in timed["baseline"]])
    base_outputs = [_load(x["outputs"]) for x in baseline.runs if "outputs" in x]
    rows, kept = [], {}
    for name, r in runs.items():
        row: dict[str, Any] = {
            "config": name,
            "settings": _plain(r.config.settings),
            "lossy": _lossy(r),
            "status": r.status,
            "reason": r.reason,
            "load_s": r.load_s,
            "plan": r.plan,
        }
        samples = timed[name]
        if samples:
            row["s_per_step"] = _median_range([_step_seconds(x) for x in samples])
            row["stages_s"] = {s: _median_range([x["timings"].get(s) for x in samples]) for s in STAGES}
            row["s_per_video_second"] = _median_range([x["timings"]["total"] / x["video_seconds"] for x in samples])
            row["frames"] = samples[0]["frames"]
            row["peak_host_gb"] = max(x["peak_host_gb"] for x in samples)
            if "peak_gpu_alloc_gb" in samples[0]:
                row["peak_gpu_alloc_gb"] = max(x["peak_gpu_alloc_gb"] for x in samples)
                row["peak_gpu_reserved_gb"] = max(x["peak_gpu_reserved_gb"] for x in samples)
            if r.warmup and r.warmup.get("status") == "ok":
                row["first_run_s"] = r.warmup["timings"]["total"]
                if "compiled_graphs" in r.warmup:
                    row["compiled_graphs"] = {
                        "warmup": r.warmup["compiled_graphs"],
                        "timed_runs": sum(x.get("compiled_graphs", 0) for x in samples),
                    }
            if base_step and row["s_per_step"]:
                row["speedup"] = base_step["median"] / row["s_per_step"]["median"]
            if "motion" in samples[0]:
                row["motion"] = [x["motion"] for x in samples]
            if samples[0].get("caches"):
                row["caches"] = samples[0]["caches"]
            keep = next((x["outputs"] for x in samples if "outputs" in x), None)
            if keep:
                kept[name] = keep
            if keep and base_outputs:
                row["fidelity"] = _fidelity(_load(keep), base_outputs[0])
        rows.append(row)
    noise = None
    if len(base_outputs) >= 2:
        noise = _fidelity(base_outputs[1], base_outputs[0])
    hw = Hardware.detect()
    return {
        "spec": {k: v for k, v in spec.__dict__.items() if k != "configs"},
        "rows": rows,
        "identical_outputs": _identical_groups(kept),
        "noise_floor": noise,
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": hw.cpu_count,
            "device": hw.device,
            "gpu": hw.device_name if hw.cuda else None,
            "gpu_memory_gb": hw.total_vram_gb,
            "versions": library_versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "random_weights": spec.model_dir is None and spec.model in ("tiny-random", "small", "full"),
    }


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
