"""Bench results as a markdown table, JSON (every raw number, the machine) and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from framepack_turbo.files import atomic_path


def _fmt_range(r: dict[str, float] | None, digits: int = 4) -> str:
    if not r:
        return "-"
    return f"{r['median']:.{digits}f} ({r['min']:.{digits}f}-{r['max']:.{digits}f})"


def _fmt_db(value: float | None) -> str:
    if value is None:
        return "-"
    return "identical" if math.isinf(value) else f"{value:.2f}"


def _fmt_gb(row: dict[str, Any]) -> str:
    if "peak_gpu_alloc_gb" in row:
        return f"{row['peak_gpu_alloc_gb']:.2f} / {row['peak_gpu_reserved_gb']:.2f} GPU, {row['peak_host_gb']:.2f} host"
    return f"{row['peak_host_gb']:.2f} host" if "peak_host_gb" in row else "-"


def _fmt_caches(row: dict[str, Any]) -> str:
    caches = row.get("caches") or {}
    return (
        ", ".join(
            f"{name} {c['hit_rate'] * 100:.0f}% ({c['hit']}/{c['hit'] + c['miss'] + c.get('forced', 0)})"
            for name, c in caches.items()
        )
        or "-"
    )


def markdown(results: dict[str, Any], command: str = "") -> str:
    spec, machine = results["spec"], results["machine"]
    lines = [
        f"Model `{spec['model']}`, {spec['seconds']} s at resolution {spec['resolution']}, {spec['steps']} steps, "
        f"variant {spec['variant'] or 'default'}, {spec['repeats']} timed repeats after a warm-up, "
        + ("each after a baseline run (paired)." if spec.get("paired") else "interleaved."),
        f"Machine: {machine['gpu'] or machine['cpu']} ({machine['cpu_count']} CPUs), torch {machine['versions'].get('torch')}, "
        f"diffusers {machine['versions'].get('diffusers')}, {machine['date']}.",
    ]
    if command:
        lines.append(f"Command: `{command}`")
    if results.get("random_weights"):
        lines.append(
            "Random weights: speed and memory are real; fidelity numbers say how far a configuration moves "
            "the output, not how good the video looks."
        )
    lines += [
        "",
        "| config | s/step median (min-max) | speed-up | cache hit rate | s per video s | load s / first run s | peak memory GB | PSNR dB | SSIM | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        fid = row.get("fidelity") or {}
        name = row["config"] + (" (lossy)" if row.get("lossy") else "")
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        per_video = f"{row['s_per_video_second']['median']:.2f}" if row.get("s_per_video_second") else "-"
        load = f"{row['load_s']:.2f}" if row.get("load_s") is not None else "-"
        first = f"{load} / {row['first_run_s']:.2f}" if row.get("first_run_s") is not None else "-"
        ssim = f"{fid['ssim']:.4f}" if "ssim" in fid else "-"
        lines.append(
            f"| {name} | {_fmt_range(row.get('s_per_step'))} | {speedup} | {_fmt_caches(row)} | {per_video} | {first} | {_fmt_gb(row)} | "
            f"{_fmt_db(fid.get('psnr_db'))} | {ssim} | {status} |"
        )
    noise = results.get("noise_floor")
    if noise:
        lines.append(
            f"| noise floor (baseline vs baseline) | - | - | - | - | - | - | {_fmt_db(noise['psnr_db'])} | "
            f"{noise['ssim']:.4f} | first-step rel. L2 {noise['first_step_rel_l2']:.2e} |"
        )
    lines += [
        "",
        "s/step: transformer seconds / steps of each generation (a step a cache skipped counts at its "
        "cost), median and range over the timed runs. Cache hit rate: reused / all decisions (hits, misses, "
        "forced first/last steps); the module cache counts encoder calls.",
    ]
    for group in results.get("identical_outputs") or []:
        lines.append(f"Bit-identical outputs (latents and video): {' = '.join(group)}.")
    expected = (results.get("input") or {}).get("expected_motion")
    if expected:
        lines += [
            "",
            f'Motion (trained weights; the prompt "{results["input"]["prompt"]}" asks `{expected}`): what '
            "the colour tracker sees the object do in each timed run.",
            "",
            "| config | observed motion per run | as prompted |",
            "|---|---|---|",
        ]
        for row in results["rows"]:
            if row.get("motion"):
                ok = sum(m == expected for m in row["motion"])
                lines.append(f"| {row['config']} | {', '.join(row['motion'])} | {ok}/{len(row['motion'])} |")
    lines += [
        "",
        "Stages (median seconds per generation):",
        "",
        "| config | text encode | image encode | transformer | VAE decode | write | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        stages = row.get("stages_s")
        if not stages:
            continue
        cells = [
            f"{stages[s]['median']:.3f}" if stages.get(s) else "-"
            for s in ("text_encode", "image_encode", "transformer", "vae_decode", "write", "total")
        ]
        lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fidelity against the baseline's output of this run:",
        "",
        "| config | first-step rel. L2 | first-step cosine | final latents rel. L2 | worst-frame PSNR dB |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        fid = row.get("fidelity")
        if fid:
            lines.append(
                f"| {row['config']} | {fid['first_step_rel_l2']:.2e} | {fid['first_step_cosine']:.6f} | "
                f"{fid['latents_rel_l2']:.2e} | {_fmt_db(min(fid['psnr_per_frame']))} |"
            )
    from framepack_turbo.bench.sweep import frontier_markdown

    frontier = frontier_markdown(results)  # sweep configurations (SERIES@KNOB) only
    return "\n".join(lines) + "\n" + ("\n" + frontier if frontier else "")


def _json_safe(value: Any) -> Any:
    """inf/nan are not JSON: identical outputs are written as null with the key `<name>_identical`."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(v, float) and math.isinf(v):
                out[k], out[f"{k}_identical"] = None, True
            else:
                out[k] = _json_safe(v)
        return out
    if isinstance(value, list):
        return [None if isinstance(v, float) and (math.isinf(v) or math.isnan(v)) else _json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(results: dict[str, Any], path: str | Path, command: str = "") -> Path:
    path = Path(path)
    data = _json_safe({**results, "command": command})
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str, allow_nan=False)
        f.write("\n")
    return path


def write_markdown(results: dict[str, Any], path: str | Path, command: str = "") -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(markdown(results, command))
    return path


def write_plot(results: dict[str, Any], path: str | Path) -> Path:
    """Left: speed-up against PSNR, one point per configuration. Right: PSNR along the video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("fidelity") and r.get("speedup")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cap = 100.0  # identical outputs (infinite PSNR) are drawn at the cap
    for row in rows:
        psnr = row["fidelity"]["psnr_db"]
        left.scatter(row["speedup"], min(psnr, cap), s=40)
        left.annotate(row["config"], (row["speedup"], min(psnr, cap)), textcoords="offset points", xytext=(5, 5))
        if row["config"] != "baseline":  # identical to itself: a flat line at the cap says nothing
            per_frame = [min(p, cap) for p in row["fidelity"]["psnr_per_frame"]]
            right.plot(range(len(per_frame)), per_frame, label=row["config"])
    noise = results.get("noise_floor")
    if noise:
        left.axhline(min(noise["psnr_db"], cap), linestyle="--", color="grey", label="noise floor")
    left.set_xlabel("speed-up vs baseline (s/step)")
    left.set_ylabel(f"PSNR vs baseline, dB (identical drawn at {cap:g})")
    left.set_title("speed against fidelity")
    left.grid(alpha=0.3)
    right.set_xlabel("frame")
    right.set_ylabel("PSNR vs baseline, dB")
    right.set_title("fidelity along the video")
    right.grid(alpha=0.3)
    if any(r["config"] != "baseline" for r in rows):
        right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
