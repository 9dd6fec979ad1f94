"""Context parallelism on the CPU: two gloo ranks (as `framepack generate --gpus 2` starts them) against one
process, on `tiny-random` and `small`, both variants, Ulysses and ring (ring on a stand-in for the CUDA kernel).

Tolerance: the ranks change only the order of float32 sums (attention over keys in another order, the other
rank's share gathered), so the clip's latents must equal the single process's within 1e-4 absolute (measured
here: at most ~2e-6, against latents of magnitude ~4). The step caches' decisions must be the same on both
ranks, step by step. One launch runs every job (a rank's start-up is most of the cost).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framepack_turbo import distributed, launch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "red-circle.png"
PROMPT = "the red circle moves right"
OPTIONS = dict(seconds=1.2, window=3, steps=4, resolution=64, seed=7)  # 3 sections of 3 latent frames
TOLERANCE = 1e-4
CACHES = {
    "teacache": dict(enable_teacache=True, teacache_threshold=0.2),
    "fbcache": dict(enable_fbcache=True, fbcache_threshold=0.545),  # near the changes measured (0.53-0.56)
    "magcache": dict(enable_magcache=True, magcache_threshold=0.5, magcache_k=3, magcache_retention=0.0),
}
JOBS = [
    *(
        dict(name=f"{model}-{variant}", model=model, prompt=PROMPT, options={**OPTIONS, "variant": variant})
        for model in ("tiny-random", "small")
        for variant in ("inverted", "f1")
    ),
    *(
        dict(name=f"small-{cache}", model="small", prompt=PROMPT, options=OPTIONS, settings=values)
        for cache, values in CACHES.items()
    ),
    dict(name="tiny-random-cancel", model="tiny-random", prompt=PROMPT, options=OPTIONS, cancel_in_section=2),
    dict(
        name="tiny-random-ring",
        model="tiny-random",
        prompt=PROMPT,
        options=OPTIONS,
        settings={"parallel_mode": "ring"},
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Both ranks' outputs of every job (OUT/rank0, OUT/rank1)."""
    out = tmp_path_factory.mktemp("parallel")
    jobs = out / "jobs.json"
    jobs.write_text(json.dumps(JOBS))
    port = launch.free_port()
    command = [sys.executable, str(ROOT / "tests" / "parallel_worker.py"), str(jobs), str(out)]
    # in the test's folder: a rank's default outputs and runtime cache (MagCache's ratios) stay out of the checkout
    procs = [subprocess.Popen(command, env=launch.rank_environment(r, 2, port, 1), cwd=out) for r in range(2)]
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0]
    return out


def single_process(job: dict) -> torch.Tensor:
    from framepack_turbo.api import FramePack

    fp = FramePack.load(job["model"], device="cpu", **job.get("settings", {}))
    return fp.generate(EXAMPLE, job["prompt"], keep_frames=False, out=None, **job["options"]).latents


def rank_output(root: Path, rank: int, name: str) -> tuple[torch.Tensor, dict]:
    folder = root / f"rank{rank}"
    return load_file(folder / f"{name}.safetensors")["latents"], json.loads((folder / f"{name}.json").read_text())


@pytest.mark.cluster
@pytest.mark.parametrize("model", ["tiny-random", "small"])
@pytest.mark.parametrize("variant", ["inverted", "f1"])
def test_two_ranks_match_one_process(ranks, model, variant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the reference's default output folder
    job = next(j for j in JOBS if j["name"] == f"{model}-{variant}")
    reference = single_process(job)
    latents0, facts0 = rank_output(ranks, 0, job["name"])
    latents1, facts1 = rank_output(ranks, 1, job["name"])
    assert latents0.shape == reference.shape == latents1.shape
    assert torch.equal(latents0, latents1)  # the gathered output is the same on every rank
    assert (latents0 - reference).abs().max().item() <= TOLERANCE
    assert reference.abs().max().item() > 1.0  # a real clip, not zeros
    # rank 0 alone writes; the record says how the job was split
    assert facts0["video"] and not facts1["video"]
    assert facts0["parallel"]["mode"] == "ulysses" and facts0["parallel"]["degree"] == 2


@pytest.mark.cluster
def test_ring_on_the_cpu_stand_in_matches_one_process(ranks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = next(j for j in JOBS if j["name"] == "tiny-random-ring")
    reference = single_process({**job, "settings": {}})
    latents0, facts0 = rank_output(ranks, 0, job["name"])
    assert facts0["parallel"]["mode"] == "ring" and facts0["parallel"]["attention"] == "_native_flash"
    assert (latents0 - reference).abs().max().item() <= TOLERANCE


@pytest.mark.cluster
@pytest.mark.parametrize("cache", list(CACHES))
def test_step_cache_decisions_agree_on_every_rank(ranks, cache):
    _, facts0 = rank_output(ranks, 0, f"small-{cache}")
    _, facts1 = rank_output(ranks, 1, f"small-{cache}")
    decisions = facts0["decisions"]
    assert decisions == facts1["decisions"]
    kinds = {d[3] for d in decisions}
    assert {"hit", "forced"} <= kinds, kinds  # the cache reused steps (and the boundaries were computed)
    if cache != "magcache":  # its decisions come from calibrated ratios; the others measure the rank's share
        assert "miss" in kinds, kinds
    assert len(decisions) == 3 * OPTIONS["steps"]


@pytest.mark.cluster
def test_a_cancel_on_rank_0_stops_every_rank_after_the_same_step(ranks):
    """The page's cancel reaches rank 0 alone; rank 1 learns it in the same step's broadcast, nobody hangs
    (the fixture's two processes exited 0), and both keep the section that finished."""
    _, facts0 = rank_output(ranks, 0, "tiny-random-cancel")
    _, facts1 = rank_output(ranks, 1, "tiny-random-cancel")
    assert facts0["sections_done"] == 1 and facts0["video"]
    assert facts0["latent_frames"] == facts1["latent_frames"] == OPTIONS["window"]


def test_cache_decision_numbers_are_summed_over_ranks(monkeypatch):
    """The sums a rank contributes are added up: on two halves the measure is the whole's."""
    from framepack_turbo.optim import stepcache

    a, b = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
    whole = stepcache.relative_l1(a, b)
    halves = [(a[:, :5], b[:, :5]), (a[:, 5:], b[:, 5:])]
    calls = iter(halves)

    def fake_sum(values):  # the other rank's sums and counts, as all_reduce would add them
        other_a, other_b = next(calls)
        change, scale = (other_a - other_b).abs(), other_b.abs()
        return values + torch.tensor([change.sum(), scale.sum(), change.numel(), scale.numel()], dtype=torch.float64)

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "sum_over_ranks", fake_sum)
    local = stepcache.relative_l1(a[:, 5:], b[:, 5:])  # this rank: the second half; the fake adds the first
    assert local == pytest.approx(whole, rel=1e-6)


def test_launched_reads_the_torchrun_variables():
    assert distributed.launched({}) is None
    ranks = distributed.launched({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert ranks == distributed.Ranks(1, 2, 1) and not ranks.primary
    env = launch.rank_environment(1, 2, 1234, 1, base={"PATH": "/bin", "RANK": "7"})
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == "1234"
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"
    env = launch.rank_environment(0, 2, 1234, 1, base={distributed.ERROR_FILE: "/tmp/outer.log"})
    assert distributed.ERROR_FILE not in env  # a rank's error file is the launcher's to set, not inherited


def test_degree_without_a_launch_says_how_to_start_it():
    with pytest.raises(Exception, match="--gpus 2"):
        distributed.start("cpu", 2, environ={})
    with pytest.raises(Exception, match="must be equal"):
        distributed.start("cpu", 2, environ={"RANK": "0", "WORLD_SIZE": "3"})


def test_cp_plan_splits_first_block_and_every_rotary_table_and_gathers_the_last(tiny_bundle):
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from framepack_turbo.optim.parallel import bytes_per_call, cp_plan

    plan = cp_plan(tiny_bundle.transformer)
    assert list(plan) == [
        "transformer_blocks.0",
        "transformer_blocks.*",
        "single_transformer_blocks.*",
        "single_transformer_blocks.0",
    ]
    assert set(plan["transformer_blocks.0"]) == {"hidden_states", "encoder_hidden_states"}
    assert all(isinstance(x, ContextParallelInput) for x in plan["transformer_blocks.*"]["freqs_cis"])
    assert all(isinstance(x, ContextParallelOutput) for x in plan["single_transformer_blocks.0"])

    # FramePack at 640 (a 544x704 bucket): 9 noisy + 2 clean latent frames of 34x44 tokens, plus the 2x and
    # 4x history, 729 SigLIP tokens and ~30 of text; bf16, 60 blocks, 3072 wide. Ulysses sends 4 copies of the
    # rank's share per block, ring receives 2 of everyone else's: equal on 2 ranks, Ulysses 4x less on 8
    def attention(mode, n):
        return bytes_per_call(mode, n, 3072, 60, 17_000, 760, 2)["attention"]

    assert attention("ulysses", 2) == pytest.approx(attention("ring", 2))
    assert attention("ulysses", 8) == pytest.approx(attention("ring", 8) / 4)
    assert 6 * 2**30 < attention("ulysses", 2) < 7 * 2**30


def test_cli_refuses_bad_parallel_input_in_one_line(tmp_path):
    cases = [
        (["--model", "small", "--gpus", "3"], "do not divide"),
        (["--model", "tiny-random", "--gpus", "2", "--parallel", "ring"], "CUDA only"),
        (["--model", "tiny-random", "--gpus", "2", "--xformers-mode", "off"], "xformers-mode"),
    ]
    for flags, words in cases:
        run = subprocess.run(
            [sys.executable, "-m", "framepack_turbo", "generate", *flags, "--device", "cpu", "--prompt", "x"]
            + ["--image", str(EXAMPLE), "--out", str(tmp_path / "x.mp4")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and words in lines[0], run.stderr
        assert "Traceback" not in run.stderr


def two_ranks(args: list[str], folder: Path, timeout: float = 600) -> list[int]:
    """Run tests/parallel_worker.py ARGS as two gloo ranks in `folder`; their exit codes."""
    port = launch.free_port()
    command = [sys.executable, str(ROOT / "tests" / "parallel_worker.py"), *args]
    procs = [subprocess.Popen(command, env=launch.rank_environment(r, 2, port, 1), cwd=folder) for r in range(2)]
    return [p.wait(timeout=timeout) for p in procs]


@pytest.mark.cluster
def test_every_text_length_splits_and_matches_one_process(tmp_path):
    """Text lengths 1..40 (the conditioning is SigLIP's tokens and the prompt's), on latents of an even and an odd
    length: the shares are uneven for half of them, and gloo's all-gather takes only equal tensors (issue 40:
    `--gpus 2` crashed on "x"). Ulysses and ring, each against the same call unsplit in the same process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from parallel_worker import LATENT_SIZES, MODES, TEXT_LENGTHS

    assert two_ranks(["lengths", str(tmp_path)], tmp_path) == [0, 0]
    outputs = [load_file(tmp_path / f"rank{r}" / "lengths.safetensors") for r in range(2)]
    worst = 0.0
    for mode in MODES:
        for h, w in LATENT_SIZES:
            for text in TEXT_LENGTHS:
                one, split = outputs[0][f"one-{text}-{h}x{w}"], outputs[0][f"{mode}-{text}-{h}x{w}"]
                assert torch.equal(split, outputs[1][f"{mode}-{text}-{h}x{w}"])  # every rank holds the whole
                assert split.shape == one.shape
                worst = max(worst, (split - one).abs().max().item())
    assert worst <= TOLERANCE, worst
    assert max(v.abs().max().item() for v in outputs[0].values()) > 1.0  # outputs, not zeros


CLI = ["--model", "tiny", "--device", "cpu", "--gpus", "2", "--image", str(EXAMPLE), "--resolution", "64"]


@pytest.fixture(scope="module")
def whole_clip(tmp_path_factory) -> Path:
    """`framepack generate --gpus 2 --prompt x` on the CPU, run to the end (the issue's command)."""
    folder = tmp_path_factory.mktemp("whole")
    run = subprocess.run(
        [sys.executable, "-m", "framepack_turbo", "generate", *CLI, "--prompt", "x", "--out", "cp.mp4"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    return folder / "cp.mp4"


@pytest.mark.cluster
def test_two_cpu_ranks_make_a_clip_of_a_one_token_prompt(whole_clip):
    from framepack_turbo.pipeline.resume import state_path

    assert whole_clip.exists() and not state_path(whole_clip).exists()  # finished: no resume state left
    assert json.loads(whole_clip.with_suffix(".json").read_text())["parallel"]["degree"] == 2


def frames(path: Path):
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.cluster
def test_a_killed_rank_is_one_line_and_resume_finishes_the_clip_bit_for_bit(whole_clip, tmp_path):
    """Rank 1 killed (SIGKILL) after the first section: rank 0 fails in its next collective; the launcher says
    which rank died and how in one line, the ranks' tracebacks go to their logs, and `--resume` finishes the clip
    with the frames of the run that was not interrupted."""
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    from framepack_turbo.pipeline.resume import state_path

    clip = tmp_path / "cp.mp4"
    command = [sys.executable, "-m", "framepack_turbo", "generate", *CLI, "--prompt", "x", "--out", str(clip)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 400
    while not state_path(clip).exists():  # one section done (of 4, ~3 s each)
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    (follower,) = [c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1"]
    follower.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert "Traceback" not in stderr and "[rank0]" not in stderr, stderr  # nor c10d's warnings as rank 0 ends
    named = [line for line in stderr.splitlines() if "rank 1" in line]
    assert len(named) == 1 and named[0].startswith("error: rank 1 of 2 was killed by SIGKILL (signal 9)"), stderr
    assert f"framepack generate --resume {clip}` goes on" in stderr
    logs = Path(named[0].split("the ranks' logs: ")[1].rstrip(")"))
    assert "Traceback" in (logs / "rank0.log").read_text()  # rank 0's gloo error, kept for whoever looks
    shutil.rmtree(logs)

    resumed = subprocess.run(
        [sys.executable, "-m", "framepack_turbo", "generate", "--resume", str(clip)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(clip.with_suffix(".json").read_text())["parallel"]["degree"] == 2  # on two ranks again
    import numpy as np

    assert np.array_equal(frames(clip), frames(whole_clip))


def test_the_launcher_names_the_first_failing_rank_and_its_error(tmp_path, monkeypatch, capsys):
    """A rank that raised: its exception's line from its log; a signal's death before the errors it causes;
    rank 0's own one-line refusal is not said twice."""

    class Done:
        def __init__(self, code):
            self.returncode = code

        def poll(self):
            return self.returncode

    assert launch._first_failure([Done(1), Done(-9)]) == (1, -9)
    assert launch._first_failure([Done(0), Done(1), Done(2)]) == (1, 1)
    assert launch._first_failure([Done(0), Done(0)]) is None
    (tmp_path / "rank1.log").write_text(
        'W1207 noise\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "    boom()\nValueError: boom\n"
    )
    assert launch._report(1, 1, 2, tmp_path, ["generate", "--out", str(tmp_path / "none.mp4")])
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: rank 1 of 2 exited with code 1: ValueError: boom; the other ranks stopped (the ranks' "
        f"logs: {tmp_path})"
    ]  # no resume state beside none.mp4: no note
    (tmp_path / "rank1.log").unlink()
    assert not launch._report(0, 2, 2, tmp_path, ["generate"])
    assert capsys.readouterr().err == ""
    assert launch._option(["--out", "a.mp4", "--out=b.mp4"], "--out") == "b.mp4"


def test_serve_without_ray_refuses_a_parallel_degree(tmp_path):
    """The page's jobs run in the server's one process; several ranks per job need --ray (a worker group)."""
    run = subprocess.run(
        [sys.executable, "-m", "framepack_turbo", "serve", "--parallel-degree", "2", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "needs --ray" in run.stderr and "Traceback" not in run.stderr
