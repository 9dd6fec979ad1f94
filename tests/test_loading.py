"""Loading: random presets, a local folder laid out like the repos, clear errors when weights are missing."""

import shutil

import numpy as np
import pytest
import torch

from framepack_turbo.errors import InputError, ModelUnavailableError
from framepack_turbo.models import presets
from framepack_turbo.models.loading import MODULES, load_bundle, load_component
from framepack_turbo.models.presets import COMPONENTS, ModelPreset, Source

from .conftest import FAST


@pytest.fixture(scope="module")
def tiny_dir(tiny_bundle, tmp_path_factory):
    return tiny_bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def test_tiny_dimensions_agree(tiny_bundle):
    t = tiny_bundle.transformer.config
    assert t.text_embed_dim == tiny_bundle.text_encoder.config.hidden_size
    assert t.pooled_projection_dim == tiny_bundle.text_encoder_2.config.hidden_size
    assert t.image_proj_dim == tiny_bundle.image_encoder.config.hidden_size
    assert sum(t.rope_axes_dim) == t.attention_head_dim
    assert t.has_image_proj and t.has_clean_x_embedder


def test_random_presets_are_deterministic(tiny_bundle):
    again = load_bundle("tiny-random", device="cpu")
    for name in MODULES:
        a, b = tiny_bundle.modules()[name].state_dict(), again.modules()[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_preset_size():
    bundle = load_bundle("small", device="cpu")
    params = sum(p.numel() for p in bundle.transformer.parameters())
    assert 25e6 < params < 35e6  # "about 30M" for CPU benchmarks


def test_saved_layout_is_one_folder_per_component(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(COMPONENTS)
    assert (tiny_dir / "transformer" / "config.json").exists()
    assert list((tiny_dir / "transformer").glob("*.safetensors"))


@pytest.mark.slow
def test_local_dir_round_trip_is_identical(tiny, tiny_dir, example_image, tmp_path):
    from framepack_turbo.api import FramePack

    loaded = FramePack.load("tiny-random", model_dir=tiny_dir, device="cpu")
    assert loaded.bundle.source == str(tiny_dir.resolve())
    for name in MODULES:
        a, b = tiny.bundle.modules()[name].state_dict(), loaded.bundle.modules()[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for tok in ("tokenizer", "tokenizer_2"):
        text = "a cat walks on the grass"
        assert getattr(tiny.bundle, tok)(text).input_ids == getattr(loaded.bundle, tok)(text).input_ids
    ref = tiny.generate(example_image, "a cat", out=tmp_path / "ref.mp4", **FAST)
    got = loaded.generate(example_image, "a cat", out=tmp_path / "got.mp4", **FAST)
    np.testing.assert_array_equal(ref.frames, got.frames)


def test_local_dir_missing_component(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelUnavailableError, match=r"vae.*broken.*sub-folder per component"):
        load_bundle("tiny-random", model_dir=str(broken), device="cpu")


def test_model_dir_must_exist(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        load_bundle("tiny-random", model_dir=str(tmp_path / "nope"))


def test_unknown_preset():
    with pytest.raises(
        InputError, match="unknown model preset 'huge'.*framepack, framepack-f1, tiny, tiny-random, small"
    ):
        load_bundle("huge")


def test_missing_repo_offline_names_the_repo():
    source = Source("framepack-turbo-tests/not-a-real-repo", "vae")
    with pytest.raises(ModelUnavailableError) as info:
        load_component("vae", source, torch.float32, local_files_only=True)
    message = str(info.value)
    assert "framepack-turbo-tests/not-a-real-repo/vae" in message
    assert "--model-dir" in message and "HF_HOME" in message and "offline" in message


def test_real_preset_sources_and_missing_weights(monkeypatch):
    fp = presets.PRESETS["framepack"]
    assert fp.sources["transformer"] == Source("lllyasviel/FramePackI2V_HY")
    assert presets.PRESETS["framepack-f1"].sources["transformer"] == Source("lllyasviel/FramePack_F1_I2V_HY_20250503")
    assert fp.sources["text_encoder"] == Source("hunyuanvideo-community/HunyuanVideo", "text_encoder")
    assert fp.sources["image_encoder"] == Source("lllyasviel/flux_redux_bfl", "image_encoder")
    # Same code path as the real presets, pointed at a repo no cache holds.
    fake = ModelPreset("fake", "inverted", {"transformer": Source("framepack-turbo-tests/absent")})
    monkeypatch.setitem(presets.PRESETS, "fake", fake)
    with pytest.raises(ModelUnavailableError, match="framepack-turbo-tests/absent"):
        load_bundle("fake", local_files_only=True, device="cpu")


def test_full_preset_is_the_real_size():
    from framepack_turbo.models.random import SIZES, parameter_count, transformer_config

    assert 12.5e9 < parameter_count("full") < 13.5e9  # FramePack's ~13B transformer, counted on meta
    cfg = transformer_config(SIZES["full"])
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"], cfg["num_single_layers"]) == (
        24,
        128,
        20,
        40,
    )
    assert (cfg["text_embed_dim"], cfg["pooled_projection_dim"], cfg["image_proj_dim"]) == (4096, 768, 1152)


def test_full_preset_needs_a_gpu():
    with pytest.raises(InputError, match="full-size transformer.*GPU"):
        load_bundle("full", device="cpu")


@pytest.mark.gpu
def test_full_preset_builds_on_the_gpu_in_bf16():
    bundle = load_bundle("full", device="cuda")
    assert bundle.transformer.dtype == torch.bfloat16 and bundle.transformer.device.type == "cuda"


def test_the_full_preset_is_refused_where_it_would_compute_on_the_cpu():
    import torch

    from framepack_turbo.errors import InputError
    from framepack_turbo.models.loading import load_bundle

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="full-size transformer"):
        load_bundle("full", device="cpu")
