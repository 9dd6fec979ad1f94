"""Jobs per minute through the queue on Ray workers: the same jobs with 1 and with 2 actors, in one run.

Each configuration gets its own local Ray cluster (started and stopped in a fresh process, so neither
inherits the other's warm caches) with the machine's CPUs shared out between its actors; the clock runs
from the first job queued to the last one finished, models loaded before (a warm server), and the
first job of each actor is not counted apart. Writes NAME.md and NAME.json.

    python scripts/ray_throughput.py --jobs 8 --out docs/benchmarks/ray-throughput-cpu
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(actors: int, jobs: int, options: dict, model: str, cpus: int) -> dict:
    import numpy as np
    import ray
    from PIL import Image

    from framepack_turbo.app.cluster import start_workers
    from framepack_turbo.app.jobs import JobStore
    from framepack_turbo.app.queue import JobQueue

    data = Path(tempfile.mkdtemp(prefix="framepack-ray-bench-"))
    base = {"model": model, "resolution": options["resolution"]}
    workers = start_workers("local", base, data, workers=actors, num_cpus=cpus)
    queue = JobQueue(JobStore(data / "jobs.sqlite"), workers, data, base=base).start()
    picture = (np.indices((96, 128)).sum(0) % 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")

    def run(count: int) -> list:
        made = queue.submit_batch(buf.getvalue(), {"prompt": "a ball moves right", "options": options}, count)
        while any(queue.store.get(j.id).state in ("queued", "running") for j in made):
            time.sleep(0.1)
        return [queue.store.get(j.id) for j in made]

    run(actors)  # each actor loads its models (a warm server is what is measured)
    start = time.time()
    done = run(jobs)
    wall = max(j.finished for j in done) - start
    queue.stop()
    ray.shutdown()
    states = [j.state for j in done]
    assert states == ["done"] * jobs, [j.error for j in done]
    per_job = sorted(j.finished - j.started for j in done)
    return {
        "actors": actors,
        "cpus_per_actor": cpus // actors,
        "jobs": jobs,
        "wall_s": round(wall, 2),
        "jobs_per_min": round(jobs / wall * 60, 2),
        "job_s_median": round(per_job[len(per_job) // 2], 2),
        "loads": [w.describe()["loads"] for w in workers],
        "bytes_back_per_job": int(sum(w.received_bytes for w in workers) / (jobs + actors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = {"seconds": args.seconds, "steps": args.steps, "resolution": args.resolution, "seed": 5}
    cpus = os.cpu_count() or 1
    if args.child is not None:
        print(json.dumps(one(args.child, args.jobs, options, args.model, cpus)))
        return
    rows = []
    for actors in args.actors:
        cmd = [sys.executable, __file__, "--child", str(actors), "--jobs", str(args.jobs), "--model", args.model]
        cmd += ["--seconds", str(args.seconds), "--steps", str(args.steps), "--resolution", str(args.resolution)]
        with tempfile.TemporaryFile("w+") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            if out.returncode:
                err.seek(0)
                sys.exit(f"{actors} actor(s) failed:\n{err.read()[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    first = rows[0]["jobs_per_min"]
    command = "python " + " ".join(["scripts/ray_throughput.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {cpus} CPU cores, no GPU"
    lines = [
        "# Jobs per minute on Ray workers",
        "",
        f"`{command}`",
        "",
        f"Machine: {machine}. Model `{args.model}`, {args.seconds:g} s clips at {args.resolution} px, "
        f"{args.steps} steps; {args.jobs} jobs per row after each actor's first (warm models); a local Ray "
        "cluster per row, the CPUs shared out between the actors (each torch uses its share of threads).",
        "",
        "| actors | CPUs each | jobs | wall s | jobs/min | x 1 actor | job s (median) | loads per actor | MB back per job |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['actors']} | {r['cpus_per_actor']} | {r['jobs']} | {r['wall_s']} | {r['jobs_per_min']} | "
            f"{r['jobs_per_min'] / first:.2f}x | {r['job_s_median']} | {r['loads']} | "
            f"{r['bytes_back_per_job'] / 1e6:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        record = {"command": command, "machine": machine, "options": options, "model": args.model, "rows": rows}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
