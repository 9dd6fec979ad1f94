"""Long clips at flat cost, measured: write time per section, peak host memory and the transformer's share
of wall time over clip lengths, each length in a fresh process (peak RSS is per process).

    python scripts/long_clips.py --seconds 5 30 60 120 --resolution 256 --out docs/benchmarks/long-clips-cpu

writes OUT.json, OUT.md (the table, with the command and the machine) and OUT.png (the plot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(seconds: float, args: argparse.Namespace, folder: Path, label: str, code: Path | None) -> dict:
    out = folder / f"{label}-{seconds:g}s.mp4"
    command = [
        sys.executable,
        "-m",
        "framepack_turbo.cli",
        "generate",
        *("--image", str(ROOT / "examples" / "start.png"), "--prompt", "a cat walks"),
        *("--model", args.model, "--seconds", f"{seconds:g}", "--steps", str(args.steps)),
        *("--resolution", str(args.resolution), "--variant", args.variant, "--out", str(out)),
    ]
    env = dict(os.environ)
    if code is not None:  # another checkout (the code before this change, for the same-run baseline)
        env["PYTHONPATH"] = str(code / "src")
    started = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as stderr:  # a file, not a pipe: a long clip's progress lines would fill a pipe
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(job.pid, 0)  # this child's own peak RSS, measured from outside
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
    record = json.loads(out.with_suffix(".json").read_text())
    timings, sections = record["timings"], record["sections_done"]
    writes = (record.get("writer") or {}).get("sections")
    if writes:  # the writer's own numbers: encode + join per section, on its thread
        per_section = sorted(s["encode_s"] + s["join_s"] for s in writes)
        joins = sorted(s["join_s"] for s in writes)
        median, join_median, busy = per_section[len(per_section) // 2], joins[len(joins) // 2], sum(per_section)
    else:  # the synchronous writer before: only its total is recorded; the mean per section
        median, join_median, busy = timings["write"] / sections, None, timings["write"]
    return {
        "code": label,
        "seconds": seconds,
        "sections": sections,
        "frames": record["frames"],
        "write_median_s": round(median, 4),
        "join_median_s": None if join_median is None else round(join_median, 4),
        "writer_busy_s": round(busy, 3),
        "sampler_waited_s": round(timings.get("write", 0.0), 3) if writes else round(timings["write"], 3),
        "transformer_s": timings["transformer"],
        "total_s": timings["total"],
        "transformer_share": round(timings["transformer"] / timings["total"], 4),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "process_wall_s": round(wall, 2),
    }


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Long clips at flat cost",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}; model "
        f"`{args.model}` at {args.resolution}, {args.steps} steps, variant {args.variant}; each clip in a fresh "
        "process, its peak RSS read by the parent (wait4). `this`: each frame encoded once on the writer's "
        "thread; `before`: the code before it (every section re-encodes the whole clip on the sampler's thread).",
        "",
        "| code | clip s | sections | frames | write/section s (x its 5 s) | join median s | writer busy s | "
        "sampler waited s (of wall) | transformer s/step | transformer share | peak RSS MB (x its 30 s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for code in ("this", "before"):
        mine = [r for r in rows if r["code"] == code]
        if not mine:
            continue
        base = mine[0]
        thirty = next((r for r in mine if r["seconds"] == 30), base)
        for r in mine:
            join = "-" if r["join_median_s"] is None else f"{r['join_median_s']:.4f}"
            lines.append(
                f"| {code} | {r['seconds']:g} | {r['sections']} | {r['frames']} | {r['write_median_s']:.4f} "
                f"({r['write_median_s'] / base['write_median_s']:.2f}x) | {join} | "
                f"{r['writer_busy_s']:.2f} | {r['sampler_waited_s']:.2f} "
                f"({r['sampler_waited_s'] / r['total_s'] * 100:.1f}%) | "
                f"{r['transformer_s'] / (r['sections'] * args.steps):.4f} | {r['transformer_share']:.3f} | "
                f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] / thirty['peak_rss_mb']:.2f}x) |"
            )
    lines += [
        "",
        "`write/section`: this code's median of encode + join per section (on the writer's thread); before, "
        "the mean (it recorded only the total, all of it on the sampler's thread). `sampler waited`: time the "
        "sampler spent on writing (this: waiting for a full queue and the final join). On this 2-core machine "
        "the writer's thread and torch share the cores, so a transformer step is slower beside the writer "
        "(the transformer s/step column); on a GPU the transformer runs on the device while the writer uses "
        "the host's cores.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for code, style in (("this", "o-"), ("before", "s--")):
        mine = [r for r in rows if r["code"] == code]
        if not mine:
            continue
        xs = [r["seconds"] for r in mine]
        axes[0].plot(xs, [r["write_median_s"] for r in mine], style, label=code)
        axes[1].plot(xs, [r["peak_rss_mb"] for r in mine], style, label=code)
        axes[2].plot(xs, [100 * r["sampler_waited_s"] / r["total_s"] for r in mine], style, label=code)
    axes[0].set(title="write time per section", xlabel="clip seconds", ylabel="s", yscale="log")
    axes[1].set(title="peak host RSS", xlabel="clip seconds", ylabel="MB", ylim=(0, None))
    axes[2].set(title="wall time the sampler lost to writing", xlabel="clip seconds", ylabel="%", ylim=(0, None))
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[5, 30, 60, 120])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variant", default="f1")
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (git worktree)")
    parser.add_argument("--baseline-seconds", type=float, nargs="+", default=[5, 30, 60])
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: OUT.json, OUT.md, OUT.png")
    parser.add_argument("--rerender", action="store_true", help="OUT.md and OUT.png again from OUT.json")
    args = parser.parse_args()
    if args.rerender:
        return rerender(args.out, args)
    command = "python scripts/long_clips.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for seconds in args.seconds:
            rows.append(run_one(seconds, args, Path(folder), "this", None))
            print(json.dumps(rows[-1]), flush=True)
        for seconds in args.baseline_seconds if args.baseline else ():
            rows.append(run_one(seconds, args, Path(folder), "before", args.baseline))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, args, command))
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows, args, command))


def rerender(path: Path, args: argparse.Namespace) -> None:
    """OUT.md and OUT.png again from OUT.json (a change to the table, not to the numbers)."""
    data = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".md").write_text(markdown(data["rows"], args, data["command"]))
    plot(data["rows"], path.with_suffix(".png"))


if __name__ == "__main__":
    main()
