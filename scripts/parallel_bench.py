"""One video on 1 vs 2 processes (context parallelism, Ulysses over gloo): time per step, and what each step
sends between the ranks, measured (torch profiler, one transformer call) beside what the shapes predict.

    python scripts/parallel_bench.py --out docs/benchmarks/parallel-cpu [--model small] [--repeats 3]

Each row's runs alternate (1 process, 2 processes, 1, 2, ...) in the same session; medians and the ratio.
On a CPU the two processes share the cores (1 thread each against 2 threads for one process): this measures
that the split is right and what it costs to talk, not a speed-up; GPUs give each rank its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "red-circle.png"
JOB = ["--prompt", "the red circle moves right", "--seconds", "1", "--steps", "8", "--seed", "7"]


def generate(model: str, resolution: int, out: Path, ranks: int) -> dict:
    command = [sys.executable, "-m", "framepack_turbo", "generate", "--model", model, "--device", "cpu"]
    command += ["--image", str(IMAGE), "--resolution", str(resolution), "--out", str(out), *JOB]
    if ranks > 1:
        command += ["--gpus", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    subprocess.run(command, check=True, capture_output=True, env=env)
    return json.loads(out.with_suffix(".json").read_text())


def probe(model: str, resolution: int, out: Path) -> None:
    """Inside a rank: one transformer call of the job's shape under the profiler; its collectives' bytes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from framepack_turbo import distributed
    from framepack_turbo.api import FramePack
    from framepack_turbo.optim.parallel import bytes_per_call

    fp = FramePack.load(model, device="cpu", parallel_degree=2)
    transformer = fp.bundle.transformer
    seen: dict[str, int] = {}

    def lengths(module, args, kwargs):  # a plain pre-hook runs before diffusers' split: the whole sequence
        hidden, condition = kwargs.get("hidden_states", args[0]), kwargs.get("encoder_hidden_states", args[1])
        seen.setdefault("latent_tokens", hidden.shape[1])
        seen.setdefault("condition_tokens", condition.shape[1])

    transformer.transformer_blocks[0].register_forward_pre_hook(lengths, with_kwargs=True)
    calls: list[dict] = []
    original = transformer.forward

    def profiled(*args, **kwargs):
        if calls:
            return original(*args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            result = original(*args, **kwargs)
        a2a = gathers = exchanges = 0
        for e in prof.events():
            if e.name == "_c10d_functional::all_to_all_single":
                a2a += torch.Size(e.input_shapes[0]).numel()
            elif e.name == "AllGatherAnythingFunction":
                gathers += torch.Size(e.input_shapes[0]).numel()
            elif e.name == "gloo:all_gather" and e.input_shapes and e.input_shapes[0] == [1]:
                exchanges += 1
        calls.append({"a2a_elements": a2a, "gather_elements": gathers, "size_exchanges": exchanges})
        return result

    transformer.forward = profiled
    fp.generate(IMAGE, JOB[1], out.with_suffix(".mp4"), resolution=resolution, seconds=1, steps=1, seed=7)
    ranks = distributed.current()
    c = transformer.config
    element = 4  # float32 on a CPU
    blocks = c.num_layers + c.num_single_layers
    measured = {
        "attention": int(calls[0]["a2a_elements"] * element * (ranks.world - 1) / ranks.world),
        "gather": int(calls[0]["gather_elements"] * element * (ranks.world - 1)),
    }
    measured["total"] = measured["attention"] + measured["gather"]
    expected = bytes_per_call(
        "ulysses",
        ranks.world,
        c.num_attention_heads * c.attention_head_dim,
        blocks,
        seen["latent_tokens"],
        seen["condition_tokens"],
        element,
    )
    if ranks.primary:
        out.write_text(json.dumps({**seen, "measured": measured, "expected": expected, **calls[0]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="small")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.model, args.resolution, Path(args.probe))
        return
    from framepack_turbo import launch

    work = Path(tempfile.mkdtemp(prefix="parallel-bench-"))
    steps: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    for i in range(args.repeats):
        for ranks in (1, 2):
            sidecar = generate(args.model, args.resolution, work / f"r{ranks}-{i}.mp4", ranks)
            steps[ranks].append(sidecar["timings"]["step_median"])
            walls[ranks].append(sidecar["timings"]["total"])
            print(f"repeat {i + 1}, {ranks} process(es): step {steps[ranks][-1]:.3f} s", flush=True)
    port = launch.free_port()
    comm = work / "comm.json"
    command = [sys.executable, __file__, "--out", args.out, "--model", args.model]
    command += ["--resolution", str(args.resolution), "--probe", str(comm)]
    procs = [subprocess.Popen(command, env=launch.rank_environment(r, 2, port, 1)) for r in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    talk = json.loads(comm.read_text())
    step1, step2 = statistics.median(steps[1]), statistics.median(steps[2])
    result = {
        "model": args.model,
        "resolution": args.resolution,
        "repeats": args.repeats,
        "step_s": {"1": steps[1], "2": steps[2]},
        "job_s": {"1": walls[1], "2": walls[2]},
        "step_median_s": {"1": step1, "2": step2},
        "ratio_2_over_1": round(step2 / step1, 3),
        "communication_per_step": talk,
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    lines = [
        f"# Context parallelism on the CPU: 1 vs 2 processes ({args.model}, {args.resolution} px)",
        "",
        f"`python scripts/parallel_bench.py --out {args.out} --model {args.model} --repeats {args.repeats}`",
        f"on this machine ({os.cpu_count()} cores, no GPU, gloo), one section of 8 steps, runs alternating.",
        "",
        "| processes | threads each | step median (s) | step time vs 1 process | job median (s) |",
        "|---:|---:|---:|---:|---:|",
        f"| 1 | {os.cpu_count()} | {step1:.3f} | 1.00x | {statistics.median(walls[1]):.2f} |",
        f"| 2 | {max(1, (os.cpu_count() or 1) // 2)} | {step2:.3f} | {step2 / step1:.2f}x | "
        f"{statistics.median(walls[2]):.2f} |",
        "",
        f"What one step sends per rank ({talk['latent_tokens']} latent + {talk['condition_tokens']} conditioning "
        "tokens, float32): measured with the profiler on one transformer call, beside the shapes' prediction "
        "(`optim/parallel.py: bytes_per_call`).",
        "",
        "| | attention all-to-all (MiB) | final gather (MiB) | total (MiB) |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {talk[name]['attention'] / mib:.2f} | {talk[name]['gather'] / mib:.2f} | "
            f"{talk[name]['total'] / mib:.2f} |"
            for name in ("measured", "expected")
        ),
        "",
        f"Besides: {talk['size_exchanges']} exchanges of a share's size (one integer each, through gloo) per call.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
