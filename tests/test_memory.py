"""Memory: placement choice, OOM step-down, chunked VAE decode, parallel loading."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from framepack_turbo import placement
from framepack_turbo.api import FramePack
from framepack_turbo.doctor import diagnose
from framepack_turbo.hardware import Hardware
from framepack_turbo.models import loading
from framepack_turbo.models.loading import ParallelLoading, load_bundle
from framepack_turbo.optim.base import PassReport
from framepack_turbo.optim.offload import Placer
from framepack_turbo.pipeline import generate as generate_module
from framepack_turbo.pipeline import vae as vae_module
from framepack_turbo.placement import Placement, PlacementConfig, choose
from framepack_turbo.settings import Settings

OPTS = dict(seconds=2, steps=2, resolution=64, seed=5)
H100 = Hardware("cuda", "NVIDIA H100", 16, 80.0, 79.0, (9, 0), True)
LAPTOP = Hardware("cuda", "RTX 4060 Laptop", 16, 8.0, 7.2, (8, 9), True)


# ---- placement choice ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, cuda, free, mode",
    [
        (PlacementConfig(), False, None, "cpu"),
        (PlacementConfig(mode="v2"), False, None, "cpu"),  # no CUDA: always a no-op
        (PlacementConfig(), True, 79.0, "high-vram"),
        (PlacementConfig(), True, 60.0, "v1"),  # FramePack: high-VRAM only above the threshold
        (PlacementConfig(), True, 7.2, "v1"),
        (PlacementConfig(high_vram_gb=5), True, 7.2, "high-vram"),
        (PlacementConfig(mode="v2"), True, 79.0, "v2"),
        (PlacementConfig(mode="high-vram"), True, 7.2, "high-vram"),
    ],
)
def test_placement_choice(config, cuda, free, mode):
    placement = choose(config, cuda, free)
    assert placement.mode == mode and placement.reason


def test_settings_flow_into_the_choice():
    assert placement.decide(Settings.load({"use_memory_v2": True}), LAPTOP).mode == "v2"
    assert placement.decide(Settings.load({}), LAPTOP).mode == "v1"
    assert placement.decide(Settings.load({}), H100).mode == "high-vram"
    assert placement.decide(Settings.load({"memory_mode": "v1"}), H100).mode == "v1"
    assert placement.decide(Settings.load({"use_memory_v2": True}), Hardware()).mode == "cpu"
    assert placement.decide(Settings.load({"device": "cpu"}), H100).mode == "cpu"


def test_doctor_shows_the_placement_and_why():
    data = diagnose(Settings.load({}), LAPTOP)
    assert data["placement"]["mode"] == "v1" and "7.2 GB free" in data["placement"]["reason"]


def test_placement_is_a_logged_no_op_on_cpu(caplog, example_image, tmp_path):
    with caplog.at_level(logging.INFO):
        fp = FramePack.load("tiny-random", device="cpu", use_memory_v2=True)
    assert "no-op" in caplog.text
    assert all(p.device.type == "cpu" for m in fp.bundle.modules().values() for p in m.parameters())
    result = fp.generate(example_image, "a cat", out=tmp_path / "o.mp4", **OPTS)
    assert result.sidecar["placement"]["mode"] == "cpu"


# ---- out of memory during a section -------------------------------------------------------------


class _FakeGpuPlacer(Placer):
    """The real step-down logic over a CPU bundle: applying a mode only records it."""

    applied: list[str]

    def apply(self) -> str:
        self.applied = getattr(self, "applied", []) + [self.placement.mode]
        return f"applied {self.placement.mode}"


def _with_placer(bundle, mode="high-vram") -> tuple[FramePack, _FakeGpuPlacer]:
    placer = _FakeGpuPlacer(bundle, PlacementConfig(), Placement(mode, "test"))
    return FramePack(bundle, reports=[PassReport("placement", "applied", extension=placer)]), placer


def _fail_calls(monkeypatch, transformer, fail_on: set[int]):
    """Make the transformer raise CUDA's out-of-memory error on the given call numbers (0-based)."""
    calls = {"n": 0}
    forward = transformer.forward

    def flaky(*args, **kwargs):
        n = calls["n"]
        calls["n"] += 1
        if n in fail_on:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", flaky)
    return calls


def test_oom_steps_down_and_retries_the_section(monkeypatch, tiny, example_image, tmp_path):
    reference = tiny.generate(example_image, "a cat", out=tmp_path / "ref.mp4", **OPTS)
    bundle = load_bundle("tiny-random", device="cpu")
    fp, placer = _with_placer(bundle)
    _fail_calls(monkeypatch, bundle.transformer, {3})  # second section, second step
    events = []
    result = fp.generate(example_image, "a cat", out=tmp_path / "o.mp4", on_event=events.append, **OPTS)
    assert placer.applied == ["v1"]
    assert [h["mode"] for h in result.sidecar["placement"]["history"]] == ["high-vram", "v1"]
    assert any("stepped down to placement v1" in getattr(e, "message", "") for e in events)
    assert torch.equal(result.latents, reference.latents)  # the retry redraws the same noise
    assert len(result.frames) == len(reference.frames) == 73


def test_oom_after_the_last_step_down_is_a_clear_error_and_keeps_the_video(monkeypatch, example_image, tmp_path):
    bundle = load_bundle("tiny-random", device="cpu")
    fp, placer = _with_placer(bundle, mode="v1")
    _fail_calls(monkeypatch, bundle.transformer, set(range(2, 100)))  # every call of the second section
    out = tmp_path / "o.mp4"
    with pytest.raises(generate_module.OutOfMemory, match="section 2.*MEMORY_PRESERVATION.*--use-memory-v2") as err:
        fp.generate(example_image, "a cat", out=out, **OPTS)
    assert "after one step-down" in str(err.value)
    assert placer.applied == ["v2"]
    from framepack_turbo.pipeline.video import probe

    assert probe(out).frames == 33  # the first section's video stays
    sidecar = __import__("json").loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "failed" and sidecar["sections_done"] == 1


def test_other_errors_are_not_retried(monkeypatch, example_image, tmp_path):
    bundle = load_bundle("tiny-random", device="cpu")
    fp, placer = _with_placer(bundle)
    monkeypatch.setattr(bundle.transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):
        fp.generate(example_image, "a cat", out=tmp_path / "o.mp4", **OPTS)
    assert getattr(placer, "applied", []) == []


# ---- chunked VAE decode ---------------------------------------------------------------------------


def _smooth_latents(frames=19):
    """Temporally coherent latents, like a video's (independent noise per frame is not a video)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, 1, 14, 18, generator=g)
    return base + 0.1 * torch.randn(1, 16, frames, 14, 18, generator=g)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean()
    return float(10 * torch.log10(4 / mse))  # pixels in [-1, 1]: peak-to-peak 2


@pytest.mark.slow
def test_chunked_decode_matches_single_pass(tiny_bundle):
    """Same frame count as one pass, PSNR >= 30 dB against it (random tiny VAE, smooth latents)."""
    z = _smooth_latents()
    single = vae_module.decode(z, tiny_bundle.vae, 0)
    assert single.shape[2] == 4 * (19 - 1) + 1
    for chunk in (2, 3, 5, 8):
        chunked = vae_module.decode(z, tiny_bundle.vae, chunk)
        assert chunked.shape == single.shape, chunk
        assert _psnr(chunked, single) >= 30, chunk
    # None keeps diffusers' own temporal tiles (4 latent frames, what FramePack decodes with)
    assert torch.equal(vae_module.decode(z, tiny_bundle.vae), vae_module.decode(z, tiny_bundle.vae, 4))
    assert tiny_bundle.vae.tile_sample_min_num_frames == 16  # restored after a chunked decode


def test_chunk_of_one_is_refused():
    with pytest.raises(Exception, match="at least 2"):
        Settings.load({"vae_chunk_size": 1})


def test_chunk_size_from_free_memory():
    # per latent frame: 4 frames x (60*8) x (80*8) x 128 channels x 2 bytes x 1.2 = 0.3516 GB; (10 - 2) GB / that = 22
    assert vae_module.chunk_frames(10, 60, 80, 128, 2, 2.0, 1.2, 8) == 22
    assert vae_module.chunk_frames(1, 60, 80, 128, 2, 2.0, 1.2, 8) == vae_module.MIN_CHUNK  # below the reserve
    assert vae_module.chunk_frames(80, 60, 80, 128, 2, 2.0, 1.2, 8) == 221


def test_chunk_setting_and_host_default(tiny_bundle):
    z = _smooth_latents()
    assert vae_module.ChunkedDecode().chunk_for(z, tiny_bundle.vae) is None
    assert vae_module.ChunkedDecode(chunk=3).chunk_for(z, tiny_bundle.vae) == 3
    assert vae_module.ChunkedDecode.from_settings(Settings.load({"vae_chunk_size": 5})).chunk == 5


def test_decode_oom_halves_the_chunk(monkeypatch, tiny_bundle):
    tried = []
    decode = vae_module.decode

    def flaky(latents, vae, chunk=None):
        tried.append(chunk)
        if chunk is None or chunk > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return decode(latents, vae, chunk)

    monkeypatch.setattr(vae_module, "decode", flaky)
    out = vae_module.decode_chunked(_smooth_latents(), tiny_bundle.vae)
    assert tried == [None, 9, 4] and out.shape[2] == 73


def test_generation_with_chunked_decode_keeps_the_frame_count(example_image, tmp_path, tiny):
    reference = tiny.generate(example_image, "a cat", out=tmp_path / "ref.mp4", **OPTS)
    result = FramePack.load("tiny-random", device="cpu", vae_chunk_size=2).generate(
        example_image, "a cat", out=tmp_path / "o.mp4", **OPTS
    )
    assert result.frames.shape == reference.frames.shape
    assert torch.equal(result.latents, reference.latents)  # only the decode differs


# ---- parallel loading -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_bundle):
    return tiny_bundle.save_pretrained(tmp_path_factory.mktemp("tiny_model"))


def _state(bundle) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in bundle.modules().items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("parallel", [ParallelLoading(4), ParallelLoading(4, force=True)], ids=["reads", "forced"])
def test_parallel_loading_equals_serial(tiny_dir, parallel, caplog, monkeypatch):
    serial = load_bundle("tiny-random", model_dir=str(tiny_dir), device="cpu", parallel=ParallelLoading(1))
    if parallel.force:  # FORCE reads in parallel even when the room check says no
        monkeypatch.setattr(loading, "available_host_bytes", lambda: 1024)
    with caplog.at_level(logging.INFO):
        threaded = load_bundle("tiny-random", model_dir=str(tiny_dir), device="cpu", parallel=parallel)
    assert "in 4 threads" in caplog.text
    a, b = _state(serial), _state(threaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert serial.tokenizer("a cat").input_ids == threaded.tokenizer("a cat").input_ids


def test_parallel_generation_is_identical(tiny_dir, example_image, tmp_path):
    runs = [
        FramePack.load("tiny-random", model_dir=str(tiny_dir), device="cpu", parallel_loaders=n).generate(
            example_image, "a cat", out=tmp_path / f"{n}.mp4", **OPTS
        )
        for n in (1, 4)
    ]
    assert np.array_equal(runs[0].frames, runs[1].frames)


def test_no_room_means_serial(tiny_dir, monkeypatch, caplog):
    monkeypatch.setattr(loading, "available_host_bytes", lambda: 1024)
    with caplog.at_level(logging.INFO):
        load_bundle("tiny-random", model_dir=str(tiny_dir), device="cpu", parallel=ParallelLoading(4))
    assert "Serial loading" in caplog.text


def test_weight_files_of_a_local_folder(tiny_dir):
    files = loading.weight_files(loading.local_dir_sources(str(tiny_dir))["transformer"])
    assert files and all(f.suffix == ".safetensors" for f in files)


# ---- CUDA paths (run where a GPU is lent) -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_offload_modes_match_resident_on_cuda(mode, example_image, tmp_path):
    resident = FramePack.load("tiny-random", device="cuda", memory_mode="high-vram")
    reference = resident.generate(example_image, "a cat", out=tmp_path / "r.mp4", **OPTS)
    fp = FramePack.load("tiny-random", device="cuda", memory_mode=mode, gpu_memory_preservation=0)
    assert fp.bundle.text_encoder.device.type == "cpu"  # moved in only while it runs
    result = fp.generate(example_image, "a cat", out=tmp_path / "o.mp4", **OPTS)
    assert result.frames.shape == reference.frames.shape
    torch.testing.assert_close(result.latents, reference.latents, rtol=0, atol=1e-2)


def test_free_gpu_memory_counts_a_per_process_cap(monkeypatch):
    """A process capped with set_per_process_memory_fraction sizes itself to its cap, not to the card:
    the driver's free memory knows nothing of the cap."""
    import torch

    from framepack_turbo.hardware import cuda_free_bytes

    gb = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (130 * gb, 140 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=0: 2 * gb)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=0: 8 / 140)
    assert cuda_free_bytes(0) == 6 * gb  # 8 GB cap - 2 GB already reserved
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=0: 1.0)
    assert cuda_free_bytes(0) == 130 * gb  # no cap: the driver's figure
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=0: 9 * gb)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=0: 8 / 140)
    assert cuda_free_bytes(0) == 0  # over the cap already: nothing, never negative
