"""ONNX export and engines (onnxruntime CPU provider), the TensorRT provider's engine cache, torch-tensorrt's wrapper.

Tolerances: the export check refuses a graph past 1e-3 relative error (float32); the stand-ins below must
match eager PyTorch within 1e-4 relative (measured ~1e-6 on tiny), and a whole generation within 40 dB PSNR
of the eager video (measured ~80 dB: a pixel off by one level here and there).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's op library

from framepack_turbo.cli import app  # noqa: E402
from framepack_turbo.models.loading import load_bundle  # noqa: E402
from framepack_turbo.optim import onnx_engines as oe  # noqa: E402
from framepack_turbo.optim import onnx_export as ox  # noqa: E402

from .conftest import FAST  # noqa: E402

REL_TOL = 1e-4


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """Every component of tiny exported by the command users run (the issue's bar, with all components)."""
    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(
        app, ["export", "onnx", "--model", "tiny-random", "--component", "all", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def engines(export_dir):
    """A tiny bundle whose every component runs through onnxruntime from `export_dir`."""
    bundle = load_bundle("tiny-random", device="cpu")
    config = oe.OnnxConfig(components=ox.COMPONENTS, export_dir=export_dir)
    providers = oe.provider_chain(config, ["CPUExecutionProvider"], cuda=False)
    for component in ox.COMPONENTS:
        oe.install(bundle, component, config, providers)
    return bundle


@pytest.mark.slow
def test_export_layout_manifest_and_check(export_dir, tiny_bundle):
    for component, modules in ox.COMPONENT_MODULES.items():
        manifest = json.loads((export_dir / component / "manifest.json").read_text())
        assert manifest["format"] == ox.FORMAT and manifest["component"] == component
        assert manifest["identity"] == ox.component_identity(tiny_bundle, component)
        assert [g["module"] for g in manifest["graphs"]] == list(modules)
        for graph in manifest["graphs"]:
            assert (export_dir / component / graph["file"]).is_file()
            assert graph["check"]["relative"] < ox.CHECK_TOLERANCE["float32"]
    transformer = json.loads((export_dir / "transformer" / "manifest.json").read_text())["graphs"][0]
    assert (export_dir / "transformer" / "transformer.onnx.data").stat().st_size > 0  # weights as external data
    assert set(transformer["dims"]) == {"frames", "h", "w", "text", "image"}
    image = json.loads((export_dir / "image-encoder" / "manifest.json").read_text())["graphs"][0]
    assert image["dims"] == {}  # SigLIP's processor fixes the input size


def _transformer_inputs(bundle, frames, h, w, text, seed):
    spec = ox.graph_specs(bundle, "transformer")[0]
    values = {"frames": frames, "h": h, "w": w, "text": text, "image": 16}
    shapes = {i.name: ox.concrete_shape(i.shape, values) for i in spec.inputs}
    inputs = ox.example_inputs(spec, torch.float32, torch.device("cpu"), shapes, seed=seed)
    inputs["indices_latents"] = torch.arange(1, 1 + frames)  # real layouts, not just 0..n-1
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize(("frames", "h", "w", "text"), [(9, 8, 7, 5), (9, 10, 6, 23), (5, 4, 4, 1)])
def test_transformer_engine_matches_eager_across_text_lengths_and_resolutions(engines, tiny_bundle, frames, h, w, text):
    inputs = _transformer_inputs(tiny_bundle, frames, h, w, text, seed=frames + h + text)
    with torch.no_grad():
        reference = tiny_bundle.transformer(**inputs, return_dict=False)[0]
        out = engines.transformer(**inputs, return_dict=False)[0]
    assert out.shape == reference.shape == (1, 16, frames, 2 * h, 2 * w)
    assert rel_error(out, reference) < REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["a cat", "a red circle moves slowly to the right across a striped floor"])
def test_text_encoder_engines_match_eager(engines, tiny_bundle, prompt):
    from framepack_turbo.pipeline.encode import encode_prompt

    b = tiny_bundle
    ref = encode_prompt(prompt, b.tokenizer, b.text_encoder, b.tokenizer_2, b.text_encoder_2)
    out = encode_prompt(prompt, engines.tokenizer, engines.text_encoder, engines.tokenizer_2, engines.text_encoder_2)
    assert out.llama.shape == ref.llama.shape and torch.equal(out.mask, ref.mask)
    assert rel_error(out.llama, ref.llama) < REL_TOL and rel_error(out.clip_pooled, ref.clip_pooled) < REL_TOL


@pytest.mark.slow
def test_image_encoder_engine_matches_eager(engines, tiny_bundle):
    from framepack_turbo.pipeline.encode import encode_image

    picture = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    ref = encode_image(picture, tiny_bundle.feature_extractor, tiny_bundle.image_encoder)
    out = encode_image(picture, engines.feature_extractor, engines.image_encoder)
    assert rel_error(out, ref) < REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize(("frames", "h", "w"), [(10, 16, 14), (3, 8, 12)])
def test_vae_decoder_engine_matches_eager_inside_diffusers_tiling(engines, tiny_bundle, frames, h, w):
    from framepack_turbo.pipeline import vae

    latents = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(frames))
    ref, out = vae.decode(latents, tiny_bundle.vae), vae.decode(latents, engines.vae)
    assert out.shape == ref.shape == (1, 3, 4 * (frames - 1) + 1, 8 * h, 8 * w)
    assert rel_error(out, ref) < REL_TOL


@pytest.mark.slow
def test_generation_with_onnx_engines_end_to_end(tmp_path, example_image, export_dir, tiny):
    from framepack_turbo.api import FramePack
    from framepack_turbo.settings import Settings

    settings = Settings.load(
        {
            "model": "tiny-random",
            "use_onnx_engines": True,
            "onnx_dir": str(export_dir),
            "onnx_components": ",".join(ox.COMPONENTS),
        },
        source="api",
    )
    fp = FramePack.load(settings=settings)
    assert any(r.name == "onnx" and r.outcome == "applied" for r in fp.reports)
    # the frames as made (keep_frames), not their encodes: tiny-random's noisy frames lose more to x264 than
    # ONNX's float rounding changes them
    result = fp.generate(example_image, "a cat", out=tmp_path / "onnx.mp4", seed=3, keep_frames=True, **FAST)
    reference = tiny.generate(example_image, "a cat", out=tmp_path / "eager.mp4", seed=3, keep_frames=True, **FAST)
    assert len(result.frames) == len(reference.frames) == 73
    mse = np.mean((result.frames.astype(np.float64) - reference.frames.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 40
    engines = result.sidecar["engines"]
    assert engines["transformer"]["provider"] == "CPUExecutionProvider"
    assert engines["transformer"]["calls"] == FAST["steps"] * 2  # 2 sections, one call per step (CFG off)
    assert engines["vae.decoder"]["calls"] > 0 and engines["text_encoder"]["calls"] == 1


@pytest.mark.slow
def test_export_of_other_weights_is_refused(tmp_path, export_dir, tiny_bundle):
    copy = tmp_path / "text-encoder"
    shutil.copytree(export_dir / "text-encoder", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["identity"]["text_encoder"]["weights"] = "0" * 16
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle("tiny-random", device="cpu")
    config = oe.OnnxConfig(components=("text-encoder",), export_dir=tmp_path)
    with pytest.raises(ox.OnnxExportError, match="other weights"):
        oe.install(bundle, "text-encoder", config, [(oe.CPU, {})])


def test_fixed_shape_files_extend_on_demand_in_the_runtime_cache_only(tmp_path):
    bundle = load_bundle("tiny-random", device="cpu")
    spec = next(s for s in ox.graph_specs(bundle, "text-encoder") if s.module == "text_encoder_2")
    identity = ox.component_identity(bundle, "text-encoder")
    ids = lambda n: torch.randint(0, 16, (1, n), generator=torch.Generator().manual_seed(n))  # noqa: E731
    config = oe.OnnxConfig(components=("text-encoder",), cache_root=tmp_path)
    folder = config.directory("text-encoder", identity)
    ox.export_graph(bundle, "text-encoder", spec, folder, identity, shapes={"input_ids": (1, 9)})
    eager_clip = bundle.text_encoder_2
    runner = oe.GraphRunner("text_encoder_2", "text-encoder", folder, eager_clip, bundle, config, [(oe.CPU, {})])
    clip = oe.OnnxClip(eager_clip, runner)
    for n in (9, 12):
        with torch.no_grad():
            assert rel_error(clip(ids(n)).pooler_output, eager_clip(ids(n)).pooler_output) < REL_TOL
    graphs = ox.read_manifest(folder)["graphs"]
    assert [g["inputs"][0]["shape"] for g in graphs] == [[1, 9], [1, 12]] and runner.exports == 1
    # A user's export folder is not ours to extend: a shape it lacks is an error that says what to do.
    pinned = oe.OnnxConfig(components=("text-encoder",), export_dir=tmp_path / "user")
    shutil.copytree(folder, tmp_path / "user" / "text-encoder")
    user_runner = oe.GraphRunner(
        "text_encoder_2", "text-encoder", tmp_path / "user" / "text-encoder", eager_clip, bundle, pinned, [(oe.CPU, {})]
    )
    with pytest.raises(oe.OnnxShapeError, match="framepack export onnx"):
        user_runner.run({"input_ids": ids(15)})


def test_bind_dims_checks_multiples_ranges_and_agreement():
    inputs = [{"name": "x", "shape": [1, "2*h", "w"]}, {"name": "y", "shape": ["h", 3]}]
    dims = {"h": [1, 8], "w": [2, 4]}
    assert ox.bind_dims(inputs, dims, {"x": (1, 6, 4), "y": (3, 3)}) == {"h": 3, "w": 4}
    assert ox.bind_dims(inputs, dims, {"x": (1, 7, 4), "y": (3, 3)}) is None  # odd: not 2*h
    assert ox.bind_dims(inputs, dims, {"x": (1, 6, 5), "y": (3, 3)}) is None  # w past its range
    assert ox.bind_dims(inputs, dims, {"x": (1, 6, 4), "y": (4, 3)}) is None  # h disagrees between inputs
    assert ox.bind_dims(inputs, dims, {"x": (1, 6, 4), "y": (3, 2)}) is None  # fixed axis differs


def test_provider_chain_maps_the_settings():
    config = oe.OnnxConfig(trt=True, trt_fp16=False, device_id=1, trt_workspace_mb=2048)
    everything = [oe.TRT, oe.CUDA, oe.CPU]
    chain = oe.provider_chain(config, everything, cuda=True)
    assert [name for name, _ in chain] == everything
    trt = chain[0][1]
    assert trt["device_id"] == 1 and trt["trt_fp16_enable"] is False and trt["trt_max_workspace_size"] == 2048 << 20
    assert trt["trt_engine_cache_enable"] is True and chain[1][1] == {"device_id": 1}
    assert [n for n, _ in oe.provider_chain(config, [oe.CUDA, oe.CPU], cuda=True)] == [oe.CUDA, oe.CPU]
    assert [n for n, _ in oe.provider_chain(config, everything, cuda=False)] == [oe.CPU]
    assert [n for n, _ in oe.provider_chain(oe.OnnxConfig(), everything, cuda=True)] == [oe.CUDA, oe.CPU]


def test_engine_cache_keys_and_bound(tmp_path):
    key = oe.EngineCache.key
    base = key("g", {"x": (1, 2)}, {"fp16": True})
    assert base == key("g", {"x": (1, 2)}, {"fp16": True})
    assert (
        len(
            {
                base,
                key("g", {"x": (1, 3)}, {"fp16": True}),
                key("g", {"x": (1, 2)}, {"fp16": False}),
                key("h", {"x": (1, 2)}, {"fp16": True}),
            }
        )
        == 4
    )
    cache = oe.EngineCache(tmp_path, max_entries=2)
    a, b = cache.folder("a", {}), cache.folder("b", {})
    cache.folder("a", {})  # used again: now the most recent
    cache.folder("c", {})
    assert [p.name for p in cache.entries()] == ["a", "c"] and a.exists() and not b.exists()


class _FakeSession:
    made: list = []

    def __init__(self, path, options=None, providers=None):
        self.providers = providers
        _FakeSession.made.append(self)

    def get_providers(self):
        return [self.providers[0][0]]

    def run(self, names, feed):
        return [next(iter(feed.values())).astype(np.float32) * 2]


def test_tensorrt_provider_gets_one_engine_folder_per_shape_within_the_bound(tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    _FakeSession.made = []
    folder = tmp_path / "export" / "vae-decoder"
    folder.mkdir(parents=True)
    (folder / "g.onnx").write_bytes(b"graph")
    graph = {
        "module": "vae.decoder",
        "file": "g.onnx",
        "dtype": "float32",
        "inputs": [{"name": "hidden_states", "kind": "float", "shape": [1, "c"]}],
        "dims": {"c": [1, 64]},
    }
    (folder / "manifest.json").write_text(json.dumps({"format": ox.FORMAT, "version": ox.VERSION, "graphs": [graph]}))
    config = oe.OnnxConfig(
        trt=True, trt_cache_dir=tmp_path / "engines", max_cached_shapes=2, export_dir=tmp_path / "export"
    )
    chain = oe.provider_chain(config, [oe.TRT, oe.CUDA, oe.CPU], cuda=True)
    runner = oe.GraphRunner("vae.decoder", "vae-decoder", folder, torch.nn.Identity(), None, config, chain)
    for c in (3, 5, 3, 7):
        out = runner.run({"hidden_states": torch.ones(1, c)})
        assert torch.equal(out, torch.full((1, c), 2.0))
    profiles = [s.providers[0][1]["trt_profile_min_shapes"] for s in _FakeSession.made]
    assert profiles == ["hidden_states:1x3", "hidden_states:1x5", "hidden_states:1x3", "hidden_states:1x7"]
    assert all(
        s.providers[0][1]["trt_profile_max_shapes"] == s.providers[0][1]["trt_profile_min_shapes"]
        for s in _FakeSession.made
    )
    assert len(runner.sessions) == 1  # one TensorRT session in memory
    assert len(runner.engine_cache.entries()) == 2  # shapes 3 and 7 kept on disk; 5 evicted
    kept = {
        json.loads((p / "key.json").read_text())["shapes"]["hidden_states"][1] for p in runner.engine_cache.entries()
    }
    assert kept == {3, 7}


def test_torch_tensorrt_wrapper_compiles_once_per_shape_within_the_bound(tmp_path):
    from framepack_turbo.optim.torch_trt import TensorRTConfig, TensorRTModule, compile_options

    calls = []

    def fake_compile(module, arg_inputs, kwarg_inputs, **options):
        calls.append((tuple(arg_inputs[0].shape), options))
        return module

    config = TensorRTConfig(
        ("transformer",), workspace_mb=512, max_aux_streams=3, cache_dir=tmp_path, max_cached_shapes=2
    )
    wrapped = TensorRTModule(torch.nn.Linear(4, 4), config, compile_fn=fake_compile)
    for n in (1, 2, 1, 3, 1):
        assert wrapped(torch.ones(n, 4)).shape == (n, 4)
    assert [shape for shape, _ in calls] == [(1, 4), (2, 4), (3, 4)]  # 1 kept (recently used), 2 evicted
    assert len(wrapped.compiled) == 2 and wrapped.in_features == 4  # attributes still read through
    options = compile_options(config, torch.bfloat16)
    assert options["workspace_size"] == 512 << 20 and options["max_aux_streams"] == 3
    assert options["engine_cache_dir"] == str(tmp_path) and options["enabled_precisions"] == {torch.bfloat16}
    assert calls[0][1] == compile_options(config, torch.float32)


def test_export_cli_refuses_bad_input(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(
        app, ["export", "onnx", "--model", "tiny-random", "--component", "unet", "--out", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "--component unet" in bad.output
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "notes.txt").write_text("mine")
    taken = runner.invoke(app, ["export", "onnx", "--model", "tiny-random", "--out", str(tmp_path)])
    assert taken.exit_code == 2 and "not an ONNX export" in taken.output
    assert (tmp_path / "transformer" / "notes.txt").exists()


def test_modules_tensorrt_took_get_no_onnx_engine(tmp_path):
    from framepack_turbo.optim.torch_trt import TensorRTConfig, TensorRTModule

    bundle = load_bundle("tiny-random", device="cpu")
    bundle.transformer = TensorRTModule(
        bundle.transformer, TensorRTConfig(("transformer",)), compile_fn=lambda m, **k: m
    )
    config = oe.OnnxConfig(cache_root=tmp_path)
    assert oe.install(bundle, "transformer", config, [(oe.CPU, {})]) == []
    assert isinstance(bundle.transformer, TensorRTModule) and not any(tmp_path.iterdir())  # nothing exported


@pytest.mark.slow
def test_identity_is_the_same_in_every_process():
    """The export's identity must not depend on the process (diffusers keeps a set in its config)."""
    import os
    import subprocess
    import sys

    code = (
        "from framepack_turbo.models.loading import load_bundle; from framepack_turbo.optim import onnx_export as ox; "
        "b = load_bundle('tiny-random', device='cpu'); print([ox.identity_key(ox.component_identity(b, c)) for c in ox.COMPONENTS])"
    )
    keys = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        .stdout.strip()
        .splitlines()[-1]
        for seed in ("1", "2")
    ]
    assert keys[0] == keys[1]


def test_identity_survives_save_pretrained(tmp_path):
    """Saving a model (which writes `architectures` into transformers' configs) does not change what it computes."""
    bundle = load_bundle("tiny-random", device="cpu")
    before = {c: ox.component_identity(bundle, c) for c in ox.COMPONENTS}
    bundle.save_pretrained(tmp_path / "saved")
    assert {c: ox.component_identity(bundle, c) for c in ox.COMPONENTS} == before


def test_a_fixed_export_refuses_another_frame_size_before_the_job_runs(tmp_path):
    """A video (or image) whose bucket no exported graph takes is refused in one line before any step, not
    at the first VAE decode: the export folder is the user's, not ours to extend."""
    from framepack_turbo.errors import InputError

    folder = tmp_path / "user" / "vae"
    folder.mkdir(parents=True)
    graph = {
        "module": "vae.decoder",
        "inputs": [{"name": "hidden_states", "kind": "float", "shape": [1, 16, "frames", "h", "w"]}],
        "dims": {"frames": [1, 64], "h": [8, 8], "w": [8, 10]},
    }
    ox.manifest_path(folder).write_text(json.dumps({"format": ox.FORMAT, "version": ox.VERSION, "graphs": [graph]}))
    pinned = oe.OnnxConfig(components=("vae",), export_dir=tmp_path / "user")
    runner = oe.GraphRunner("vae.decoder", "vae", folder, torch.nn.Identity(), None, pinned, [(oe.CPU, {})])
    engines = oe.OnnxEngines([runner])
    engines.check_frame(64, 80)  # latent 8 x 10: covered
    with pytest.raises(InputError, match=r"takes frames of 64x64-80 \(height x width\); this job's are 64x96"):
        engines.check_frame(64, 96)
    extendable = oe.GraphRunner("vae.decoder", "vae", folder, torch.nn.Identity(), None, oe.OnnxConfig(), [])
    oe.OnnxEngines([extendable]).check_frame(64, 96)  # our own cache: the shape is exported when first called
