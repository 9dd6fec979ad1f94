"""Threshold series of the step caches, and the frontier they draw (`framepack bench --sweep`).

A series is one cache at settings from "barely skips" to "skips most": its points, each a bench
configuration named `SERIES@KNOB`, draw that cache's line of speed-up against fidelity. The
frontier table ranks every point by speed-up and says which one each quality floor picks.

Speed-ups here are measured (transformer seconds per step, and whole-clip seconds, against the
baseline in the same run) next to the share of steps computed, which is what a cache saves on any
device where the transformer dominates.
"""

from __future__ import annotations

from typing import Any

from framepack_turbo.bench.configs import BenchConfig
from framepack_turbo.errors import InputError

SERIES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "teacache": [(f"{t:g}", {"enable_teacache": True, "teacache_threshold": t}) for t in (0.05, 0.1, 0.15, 0.25, 0.4)],
    "magcache": [
        (f"{t:g}/K{k}", {"enable_magcache": True, "magcache_threshold": t, "magcache_k": k})
        for t, k in ((0.03, 2), (0.06, 2), (0.1, 2), (0.15, 3), (0.25, 4), (0.4, 6))
    ],
    "fbcache": [(f"{t:g}", {"enable_fbcache": True, "fbcache_threshold": t}) for t in (0.035, 0.1, 0.2, 0.35, 0.5)],
    "kvcache": [(f"r{r}", {"enable_kv_cache": True, "kv_cache_refresh": r}) for r in (2, 3, 4, 6, 12)],
    # the stacked pair: MagCache's published default with the KV cache inside its computed steps
    "kvcache+magcache": [
        (f"0.1/K2/r{r}", {"enable_magcache": True, "enable_kv_cache": True, "kv_cache_refresh": r}) for r in (2, 4, 8)
    ],
    "kvcache+teacache": [
        (
            f"0.1/r{r}",
            {"enable_teacache": True, "teacache_threshold": 0.1, "enable_kv_cache": True, "kv_cache_refresh": r},
        )
        for r in (2, 4, 8)
    ],
}
DEFAULT = ("teacache", "magcache", "fbcache", "kvcache", "kvcache+magcache")
QUALITY_FLOORS_DB = (45.0, 40.0, 35.0, 30.0)


def configs(names: list[str]) -> list[BenchConfig]:
    """The points of the named series (`all`: every series), in order."""
    chosen = list(SERIES) if names == ["all"] else names
    unknown = [n for n in chosen if n not in SERIES]
    if unknown:
        raise InputError(f"--sweep {', '.join(unknown)}: the series are {', '.join(SERIES)} (or all)")
    return [BenchConfig(f"{name}@{knob}", settings) for name in chosen for knob, settings in SERIES[name]]


def series_of(config: str) -> str | None:
    return config.split("@", 1)[0] if "@" in config else None


def _clip_speedup(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    try:
        return base["stages_s"]["total"]["median"] / row["stages_s"]["total"]["median"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def computed_share(row: dict[str, Any]) -> float | None:
    """Steps the transformer's blocks ran, as a share of all steps (the whole-step cache's; the KV cache
    alone computes every step, shorter)."""
    caches = row.get("caches") or {}
    for name in ("teacache", "magcache", "fbcache", "simcache"):
        if name in caches:
            return 1.0 - caches[name]["hit_rate"]
    return 1.0 if caches else None


def points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per sweep configuration that ran: its series, knob, speed-ups and fidelity."""
    rows = {r["config"]: r for r in results["rows"]}
    base = rows.get("baseline")
    out = []
    for name, row in rows.items():
        series = series_of(name)
        if series is None or row.get("status") != "ok" or not row.get("fidelity") or not row.get("speedup"):
            continue
        out.append(
            {
                "series": series,
                "knob": name.split("@", 1)[1],
                "config": name,
                "settings": row["settings"],
                "step_speedup": row["speedup"],
                "clip_speedup": _clip_speedup(row, base) if base else None,
                "computed_share": computed_share(row),
                "psnr_db": _db(row["fidelity"]["psnr_db"]),
                "ssim": row["fidelity"]["ssim"],
                "motion": row.get("motion"),
            }
        )
    return out


def _db(value: float | None) -> float:
    return float("inf") if value is None else value  # identical outputs: JSON holds no infinity


def best_at(pts: list[dict[str, Any]], floor_db: float) -> dict[str, Any] | None:
    """The fastest point (per step) whose PSNR against the baseline is at least `floor_db`."""
    fine = [p for p in pts if p["psnr_db"] >= floor_db]
    return max(fine, key=lambda p: p["step_speedup"], default=None)


def frontier_markdown(results: dict[str, Any]) -> str:
    pts = points(results)
    if not pts:
        return ""
    lines = [
        "## Frontier",
        "",
        "One line per cache, its knob from cautious to aggressive. Step speed-up: transformer s/step against the "
        "baseline's (median). Clip: whole-generation seconds. Computed: the share of steps the blocks ran.",
        "",
        "| series | knob | computed | step speed-up | clip speed-up | PSNR dB | SSIM | motion as prompted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pts:
        motion = p["motion"] or []
        asked = (results.get("input") or {}).get("expected_motion")
        kept = f"{sum(m == asked for m in motion)}/{len(motion)}" if motion and asked else "-"
        share = f"{p['computed_share']:.0%}" if p["computed_share"] is not None else "-"
        clip = f"{p['clip_speedup']:.2f}x" if p["clip_speedup"] else "-"
        psnr = "identical" if p["psnr_db"] == float("inf") else f"{p['psnr_db']:.2f}"
        lines.append(
            f"| {p['series']} | {p['knob']} | {share} | {p['step_speedup']:.2f}x | {clip} | {psnr} | "
            f"{p['ssim']:.4f} | {kept} |"
        )
    noise = results.get("noise_floor")
    if noise:
        floor = "identical" if _db(noise["psnr_db"]) == float("inf") else f"{noise['psnr_db']:.2f} dB"
        lines += ["", f"Noise floor (baseline against baseline): {floor}."]
    lines += [
        "",
        "Fastest point per step at each quality floor:",
        "",
        "| PSNR floor | pick | step speed-up | PSNR dB |",
    ]
    lines.append("|---|---|---|---|")
    for floor_db in QUALITY_FLOORS_DB:
        pick = best_at(pts, floor_db)
        if pick:
            lines.append(
                f"| {floor_db:g} dB | {pick['config']} | {pick['step_speedup']:.2f}x | {pick['psnr_db']:.2f} |"
            )
        else:
            lines.append(f"| {floor_db:g} dB | none | - | - |")
    return "\n".join(lines) + "\n"


def write_frontier_plot(results: dict[str, Any], path) -> None:
    """Four panels, one line per cache in its knob's order: measured speed-up per step and per clip against
    PSNR, per step against SSIM, and the work speed-up (all steps / computed steps) against PSNR, which is
    what the cache saves wherever the transformer's time is its compute."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from framepack_turbo.files import atomic_path

    pts = points(results)
    for p in pts:
        p["work_speedup"] = 1 / p["computed_share"] if p["computed_share"] else None
    cap = 60.0
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = (
        ("step_speedup", "psnr_db", "measured: transformer time per step"),
        ("clip_speedup", "psnr_db", "measured: whole generation (encoders, VAE, writing included)"),
        ("step_speedup", "ssim", "measured per step, against structure"),
        ("work_speedup", "psnr_db", "work: all steps / steps the blocks computed"),
    )
    for ax, (x_key, y_key, title) in zip(axes.flat, panels):
        for series in dict.fromkeys(p["series"] for p in pts):
            line = [p for p in pts if p["series"] == series and p[x_key]]
            xs = [p[x_key] for p in line]
            ys = [min(p[y_key], cap) if y_key == "psnr_db" else p[y_key] for p in line]
            ax.plot(xs, ys, marker="o", label=series)
            for p, x, y in zip(line, xs, ys):
                ax.annotate(p["knob"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        noise = results.get("noise_floor")
        if noise and y_key == "psnr_db" and _db(noise["psnr_db"]) < cap:
            ax.axhline(noise["psnr_db"], linestyle="--", color="grey", label="noise floor")
        ax.set_xlabel("speed-up vs baseline" if x_key != "work_speedup" else "steps / computed steps")
        ax.set_ylabel("PSNR vs baseline, dB" if y_key == "psnr_db" else "SSIM vs baseline")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    model = results.get("spec", {}).get("model", "")
    fig.suptitle(
        f"step caches on {model}: speed against fidelity, lines in knob order (PSNR above {cap:g} dB at {cap:g})"
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
