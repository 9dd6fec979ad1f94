"""LoRA: every format read onto the right modules, merged exactly, refused loudly, switched without reloading.

The merged weights must equal W + weight * scale * B A per module (1e-6, float32); a generation with the LoRA
merged must equal one from a model merged by hand; merged and unmerged (PEFT adapters) generations agree
within one 8-bit level (measured: mean 4e-6 levels on these clips).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack_turbo.api import FramePack
from framepack_turbo.errors import InputError
from framepack_turbo.models.lora import load_lora, merge_into
from framepack_turbo.optim import artifact
from framepack_turbo.optim.lora import preflight
from framepack_turbo.settings import Settings, SettingsError

from .lora_files import (
    ALPHA,
    DETECTED,
    FORMATS,
    RANK,
    Expected,
    diffusers_trained,
    loha,
    peft_folder,
    stub,
    write,
)

CLIP = dict(seconds=1.2, steps=3, seed=3, resolution=64)
PROMPT = "the red circle moves right"


@pytest.fixture(scope="module")
def base():
    return FramePack.load("tiny", device="cpu")


@pytest.fixture(scope="module")
def picture():
    img = np.full((64, 64, 3), 40, np.uint8)
    img[20:40, 10:30] = (220, 30, 30)
    return img


def _weights(transformer) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


MERGE_TOLERANCE = 1e-6  # relative to the largest entry of the reference update (measured: <= 3.5e-7)
ADAPTER_TOLERANCE = 1e-6  # the adapters' update through a forward pass (measured: <= 3.8e-7)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _check_merged(before, after, expected: list[Expected], weight: float) -> float:
    """Each module's merged update against the reference float32 `up @ down * scale * weight`; the worst."""
    worst = 0.0
    for e in expected:
        worst = max(worst, _relative(after[e.module] - before[e.module], weight * e.delta()))
    assert worst <= MERGE_TOLERANCE, worst
    return worst


def _adapter_updates(transformer, modules) -> dict[str, torch.Tensor]:
    """What the PEFT adapters on each module add to its weight: (wrapper(I) - base(I))^T."""
    out = {}
    with torch.no_grad():
        for name in modules:
            wrapper = transformer.get_submodule(name)
            x = torch.eye(wrapper.base_layer.in_features)
            out[name] = (wrapper(x) - wrapper.base_layer(x)).T
    return out


def _check_adapters(transformer, expected: list[Expected], weight: float) -> float:
    got = _adapter_updates(transformer, [e.module for e in expected])
    worst = max(_relative(got[e.module], weight * e.delta()) for e in expected)
    assert worst <= ADAPTER_TOLERANCE, worst
    return worst


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_merges_exactly_onto_the_modules_it_names(base, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    expected = write(path, fmt, base.bundle.transformer, seed=1)
    transformer = FramePack.load("tiny", device="cpu").bundle.transformer
    before = _weights(transformer)
    lora = load_lora(path, transformer)
    assert lora.format == DETECTED[fmt]
    assert {d.module for d in lora.deltas} == {e.module for e in expected}
    assert merge_into(transformer, [(lora, 0.7)]) == len(expected)
    after = _weights(transformer)
    _check_merged(before, after, expected, 0.7)
    untouched = set(before) - {e.module for e in expected}
    assert untouched and all(torch.equal(before[n], after[n]) for n in untouched)


def test_a_merged_generation_equals_the_hand_merged_model(base, picture, tmp_path):
    path = tmp_path / "hunyuan.safetensors"
    expected = write(path, "hunyuan", base.bundle.transformer, seed=2)
    merged = FramePack.load("tiny", device="cpu", loras=(f"{path}:0.8",))
    by_hand = FramePack.load("tiny", device="cpu")
    with torch.no_grad():
        for e in expected:
            w = by_hand.bundle.transformer.get_submodule(e.module).weight
            w.copy_(w + 0.8 * e.delta())
    a = merged.generate(picture, PROMPT, out=tmp_path / "a.mp4", **CLIP)
    b = by_hand.generate(picture, PROMPT, out=tmp_path / "b.mp4", **CLIP)
    without = base.generate(picture, PROMPT, out=tmp_path / "c.mp4", **CLIP)
    assert np.abs(a.frames.astype(int) - b.frames).max() <= 1
    assert np.abs(a.frames.astype(int) - without.frames).mean() > 0.5  # the LoRA changed the clip
    lora = a.sidecar["lora"]
    assert lora["mode"] == "merged" and lora["loras"][0]["weight"] == 0.8
    assert lora["loras"][0]["format"] == "hunyuan" and lora["loras"][0]["modules"] == len(expected)
    assert len(lora["loras"][0]["sha256"]) == 64


def test_merged_and_unmerged_agree_and_adapters_switch_without_reloading(base, picture, tmp_path, monkeypatch):
    path = tmp_path / "kohya.safetensors"
    write(path, "kohya-framepack", base.bundle.transformer, seed=4)
    merged = FramePack.load("tiny", device="cpu", loras=(f"{path}:1.5",))
    adapters = FramePack.load("tiny", device="cpu", loras=(f"{path}:1.5",), lora_mode="unmerged")
    assert merged.plan.is_active("lora.merge") and not merged.plan.is_active("lora.adapters")
    assert adapters.plan.is_active("lora.adapters") and not adapters.plan.is_active("lora.merge")
    m = merged.generate(picture, PROMPT, out=tmp_path / "m.mp4", **CLIP).frames
    u = adapters.generate(picture, PROMPT, out=tmp_path / "u.mp4", **CLIP)
    assert np.abs(m.astype(int) - u.frames).max() <= 1
    assert u.sidecar["lora"]["mode"] == "unmerged"
    wrapped = {n for n, mod in adapters.bundle.transformer.named_modules() if hasattr(mod, "lora_A")}
    assert wrapped == {d.module for d in load_lora(path, base.bundle.transformer).deltas}  # those, no others

    loads = []
    transformer = adapters.bundle.transformer
    real = transformer.load_lora_adapter
    monkeypatch.setattr(transformer, "load_lora_adapter", lambda *a, **k: (loads.append(a), real(*a, **k))[1])
    other_weight = Settings.load(
        {"model": "tiny", "device": "cpu", "loras": (f"{path}:0.5",), "lora_mode": "unmerged"}, source="api"
    )
    assert adapters.reconfigure(other_weight)  # no reload
    half = adapters.generate(picture, PROMPT, out=tmp_path / "h.mp4", **CLIP).frames
    assert loads == [] and np.abs(half.astype(int) - u.frames).mean() > 0.1
    assert adapters.reconfigure(Settings.load({"model": "tiny", "device": "cpu"}, source="api"))
    off = adapters.generate(picture, PROMPT, out=tmp_path / "o.mp4", **CLIP)
    plain = base.generate(picture, PROMPT, out=tmp_path / "p.mp4", **CLIP)
    assert np.array_equal(off.frames, plain.frames) and "lora" not in off.sidecar  # adapters off: the base model
    assert adapters.reconfigure(other_weight)  # on again: still loaded, nothing read
    again = adapters.generate(picture, PROMPT, out=tmp_path / "g.mp4", **CLIP).frames
    assert loads == [] and np.array_equal(again, half)
    # a merged model cannot switch in place: another weight loads it again
    assert not merged.reconfigure(
        Settings.load({"model": "tiny", "device": "cpu", "loras": (f"{path}:0.5",)}, source="api")
    )


def test_several_loras_sum(base, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ea = write(a, "diffusers", base.bundle.transformer, seed=5)
    eb = write(b, "kohya-hunyuan", base.bundle.transformer, seed=6)
    fp = FramePack.load("tiny", device="cpu", loras=(f"{a}:0.5", f"{b}:-1"))
    after, before = _weights(fp.bundle.transformer), _weights(base.bundle.transformer)
    want = {n: w.clone() for n, w in before.items()}
    for e, weight in [(e, 0.5) for e in ea] + [(e, -1.0) for e in eb]:
        want[e.module] += weight * e.delta()
    for name in {e.module for e in ea + eb}:
        torch.testing.assert_close(after[name], want[name], rtol=0, atol=1e-6)


# ---- nothing loads silently in part ---------------------------------------------------------------------


def test_keys_not_understood_are_an_error_naming_them_unless_partial(base, tmp_path):
    path = tmp_path / "dora.safetensors"
    expected = write(
        path, "diffusers", base.bundle.transformer, extra={"transformer.proj_out.dora_scale": torch.ones(1, 64)}
    )
    transformer = FramePack.load("tiny", device="cpu").bundle.transformer
    with pytest.raises(
        InputError, match=r"would load in part: 1 keys not understood \(transformer.proj_out.dora_scale\)"
    ):
        load_lora(path, transformer)
    lora = load_lora(path, transformer, allow_partial=True)
    assert len(lora.deltas) == len(expected) and lora.not_understood == ["transformer.proj_out.dora_scale"]


def test_modules_the_model_lacks_are_named(base, tmp_path):
    path = tmp_path / "deep.safetensors"
    extra = {
        "double_blocks.19.img_attn_proj.lora_A.weight": torch.zeros(RANK, 128),
        "double_blocks.19.img_attn_proj.lora_B.weight": torch.zeros(128, RANK),
    }
    write(path, "hunyuan", base.bundle.transformer, extra=extra)
    with pytest.raises(
        InputError, match=r"1 modules that are no linear layer of this model \(double_blocks.19.img_attn_proj\)"
    ):
        load_lora(path, base.bundle.transformer)


def test_a_lora_for_another_model_size_names_the_first_mismatched_module(base, tmp_path):
    path = tmp_path / "13b.safetensors"
    save_file(
        {
            "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": torch.zeros(RANK, 3072),
            "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight": torch.zeros(3 * 3072, RANK),
        },
        str(path),
    )
    with pytest.raises(
        InputError,
        match=r"double_blocks.0.img_attn_qkv makes a 9216 x 3072 update, but the model's "
        r"transformer_blocks.0.attn.to_q\+.*to_v is 384 x 128",
    ):
        load_lora(path, base.bundle.transformer, allow_partial=True)  # never allowed, even partial


def test_text_encoder_keys_are_ignored_and_said(base, tmp_path, caplog):
    path = tmp_path / "te.safetensors"
    extra = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 32),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(32, RANK),
    }
    write(path, "kohya-hunyuan", base.bundle.transformer, extra=extra)
    with caplog.at_level(logging.WARNING):
        fp = FramePack.load("tiny", device="cpu", loras=(str(path),))
    assert "its 2 text-encoder keys are ignored" in caplog.text
    report = next(r for r in fp.reports if r.name == "lora.merge")
    assert (
        report.counters["loras"][0]["text_encoder_keys_ignored"] == 2 and "2 text-encoder keys ignored" in report.detail
    )


def test_corrupt_foreign_and_unknown_files_are_one_line(base, tmp_path):
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match=r"torn.safetensors: not a readable safetensors file") as info:
        load_lora(torn, base.bundle.transformer)
    assert "\n" not in str(info.value)
    weights = tmp_path / "model.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(
        InputError, match=r"not a LoRA in a format this tool reads .*: its first keys are blocks.0.weight"
    ):
        load_lora(weights, base.bundle.transformer)
    with pytest.raises(SettingsError, match="only .safetensors"):
        Settings.load({"loras": (str(tmp_path / "x.ckpt"),)}, environ={})
    with pytest.raises(SettingsError, match="no such file"):
        Settings.load({"loras": (str(tmp_path / "missing.safetensors:0.5"),)}, environ={})
    with pytest.raises(SettingsError, match="weight must be a number from -4 to 4"):
        Settings.load({"loras": (f"{stub(tmp_path)}:9",)}, environ={})


def test_preflight_checks_before_the_weights_load(base, tmp_path):
    good = tmp_path / "good.safetensors"
    write(good, "diffusion-pipe", base.bundle.transformer)
    settings = Settings.load({"model": "tiny", "loras": (f"{good}:0.5",)}, environ={})
    (line,) = preflight(settings)
    assert line.startswith("LoRA good.safetensors (diffusion-pipe, rank 4): 17 modules") and line.endswith("weight 0.5")
    bad = tmp_path / "bad.safetensors"
    write(bad, "hunyuan", base.bundle.transformer, extra={"double_blocks.0.img_attn_qkv.lokr_w1": torch.zeros(2)})
    with pytest.raises(InputError, match="lokr_w1"):
        preflight(Settings.load({"model": "tiny", "loras": (str(bad),)}, environ={}))


def test_env_and_settings_read_the_list(tmp_path):
    path = stub(tmp_path)
    s = Settings.load({}, environ={"FRAMEPACK_LORAS": f"{path}:0.25, {path}"})
    assert s.loras == (f"{path}:0.25", f"{path}:1")


# ---- identity -------------------------------------------------------------------------------------------


def test_the_artifact_key_holds_each_files_hash_and_weight(base, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write(a, "diffusers", base.bundle.transformer, seed=7)
    write(b, "diffusers", base.bundle.transformer, seed=8)

    def key(**values):
        return artifact.shaping_settings(Settings.load({"model": "tiny", **values}, environ={}), "cpu")

    assert key(loras=(f"{a}:1",))["lora.merge"][0]["weight"] == 1.0
    assert key(loras=(f"{a}:1",)) != key(loras=(f"{a}:0.5",)) != key(loras=(f"{b}:0.5",))
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(a.read_bytes())
    assert key(loras=(f"{a}:1",)) == key(loras=(f"{moved}:1",))  # the contents key it, not the path
    assert key(loras=(f"{a}:1",), lora_mode="unmerged")["lora.merge"] is None  # adapters leave the weights alone
    assert "loras" not in key(loras=(f"{a}:1",))


def test_a_cached_artifact_built_with_another_lora_is_refused_and_rebuilt(base, picture, tmp_path, caplog):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write(a, "diffusers", base.bundle.transformer, seed=9)
    write(b, "diffusers", base.bundle.transformer, seed=10)
    cache = dict(
        enable_opt_cache=True, enforce_low_precision=True, optimized_transformer=str(tmp_path / "opt.safetensors")
    )
    built = FramePack.load("tiny", device="cpu", loras=(f"{a}:1",), **cache)
    caplog.clear()  # the build's own lines ("no artifact ... building it") where logging is already at INFO
    with caplog.at_level(logging.INFO):
        reused = FramePack.load("tiny", device="cpu", loras=(f"{a}:1",), **cache)
    assert "cache not used" not in caplog.text
    assert not any(r.name == "lora.merge" for r in reused.reports)  # the artifact holds the merged weights
    same = built.generate(picture, PROMPT, out=tmp_path / "x.mp4", **CLIP).frames
    assert np.array_equal(same, reused.generate(picture, PROMPT, out=tmp_path / "z.mp4", **CLIP).frames)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        other = FramePack.load("tiny", device="cpu", loras=(f"{b}:1",), **cache)
    assert "Optimized transformer cache not used: built for other settings: lora.merge" in caplog.text
    assert any(r.name == "lora.merge" for r in other.reports)  # rebuilt, with b merged


def test_an_onnx_export_identity_names_the_merged_loras(base, tmp_path):
    from framepack_turbo.optim.onnx_export import module_fingerprint

    path = tmp_path / "a.safetensors"
    write(path, "diffusers", base.bundle.transformer, seed=11)
    merged = FramePack.load("tiny", device="cpu", loras=(f"{path}:0.5",)).bundle.transformer
    fingerprint = module_fingerprint(merged)
    assert fingerprint["loras"] == [{"sha256": load_lora(path, base.bundle.transformer).sha256, "weight": 0.5}]
    assert "loras" not in module_fingerprint(base.bundle.transformer)


# ---- the formats the tools write ------------------------------------------------------------------------


def _fresh():
    return FramePack.load("tiny", device="cpu").bundle.transformer


def test_comfyui_names_map_every_hunyuan_module_of_the_model(base, tmp_path):
    """ComfyUI's own names (`img_attn.qkv`, `img_mod.lin`, `img_mlp.0`, `modulation.lin`, `time_in.in_layer`, ...):
    every linear module of the model but FramePack's own image projection, the fused ones split."""
    path = tmp_path / "comfy.safetensors"
    expected = write(path, "comfyui", base.bundle.transformer, seed=12)
    transformer = _fresh()
    linear = set(_weights(transformer))
    assert {e.module for e in expected} == {n for n in linear if not n.startswith("image_projection.")}
    before = _weights(transformer)
    lora = load_lora(path, transformer)
    assert lora.format == "comfyui" and len(lora.deltas) == len(expected)
    merge_into(transformer, [(lora, 1.0)])
    _check_merged(before, _weights(transformer), expected, 1.0)


def test_todays_diffusion_pipe_files_are_labelled_diffusion_pipe(base, tmp_path):
    """diffusion-pipe's `transformer.` + the original layout's names: not "hunyuan" in the sidecar."""
    path = tmp_path / "dp.safetensors"
    write(path, "diffusion-pipe", base.bundle.transformer, seed=13)
    fp = FramePack.load("tiny", device="cpu", loras=(str(path),))
    report = next(r for r in fp.reports if r.name == "lora.merge")
    assert report.counters["loras"][0]["format"] == "diffusion-pipe"


def test_peft_save_pretrained_folder_or_file_reads_its_config_beside(base, tmp_path):
    """PEFT's own output (`base_model.model.` keys; r, lora_alpha, rank_pattern, alpha_pattern in
    adapter_config.json beside it), named by its folder or its file."""
    folder = tmp_path / "peft-out"
    expected = peft_folder(folder, base.bundle.transformer, seed=14)
    assert {e.scale for e in expected} == {1.5, 2.5}  # 6 / 4, and proj_mlp's 5 / 2
    for named in (folder, folder / "adapter_model.safetensors"):
        transformer = _fresh()
        before = _weights(transformer)
        lora = load_lora(named, transformer)
        assert lora.format == "peft" and {d.module for d in lora.deltas} == {e.module for e in expected}
        merge_into(transformer, [(lora, 0.6)])
        _check_merged(before, _weights(transformer), expected, 0.6)
    fp = FramePack.load("tiny", device="cpu", loras=(f"{folder}:0.6",))  # through the settings and the pass
    _check_merged(_weights(base.bundle.transformer), _weights(fp.bundle.transformer), expected, 0.6)
    entry = next(r for r in fp.reports if r.name == "lora.merge").counters["loras"][0]
    assert entry["format"] == "peft" and len(entry["config_sha256"]) == 64


def test_diffusers_header_config_scales_by_lora_alpha_over_r(base, tmp_path):
    """diffusers' training scripts write the adapter's config into the header (`lora_adapter_metadata`):
    lora_alpha 8 over r 4 is a scale of 2, as diffusers applies it, not 1."""
    expected = diffusers_trained(tmp_path / "trained", base.bundle.transformer, seed=15, r=4, alpha=8)
    assert {e.scale for e in expected} == {2.0}
    path = tmp_path / "trained" / "pytorch_lora_weights.safetensors"
    transformer = _fresh()
    before = _weights(transformer)
    lora = load_lora(path, transformer)
    assert {d.scale for d in lora.deltas} == {2.0}
    merge_into(transformer, [(lora, 1.0)])
    _check_merged(before, _weights(transformer), expected, 1.0)


def test_loha_and_lokr_files_are_refused_as_unsupported(base, tmp_path):
    path = tmp_path / "loha.safetensors"
    loha(path, base.bundle.transformer)
    with pytest.raises(InputError, match=r"loha.safetensors: a LoHa file .*hada_w1_a.*LoHa and LoKr are not supported"):
        load_lora(path, base.bundle.transformer)
    lokr = tmp_path / "lokr.safetensors"
    save_file(
        {"lora_unet_proj_out.lokr_w1": torch.ones(4, 4), "lora_unet_proj_out.lokr_w2": torch.ones(16, 32)}, str(lokr)
    )
    with pytest.raises(InputError, match=r"a LoKr file .*not supported"):
        load_lora(lokr, base.bundle.transformer)


def test_a_half_pair_names_the_key_there_and_the_one_missing(base, tmp_path):
    """A kohya file missing one lora_up: named as it is (lora_down), not under a lora_A key it does not hold."""
    path = tmp_path / "half.safetensors"
    write(path, "kohya-framepack", base.bundle.transformer, drop=("lora_unet_proj_out.lora_up.weight",))
    with pytest.raises(InputError) as info:
        load_lora(path, base.bundle.transformer)
    message = str(info.value)
    assert "lora_unet_proj_out.lora_down.weight without lora_unet_proj_out.lora_up.weight" in message
    assert "lora_A" not in message


# ---- unmerged adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya-hunyuan", "comfyui", "diffusion-pipe"])
def test_unmerged_adapters_add_what_the_merge_adds(base, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    expected = write(path, fmt, base.bundle.transformer, seed=16)
    fp = FramePack.load("tiny", device="cpu", loras=(f"{path}:0.7",), lora_mode="unmerged")
    _check_adapters(fp.bundle.transformer, expected, 0.7)


def test_unmerged_bf16_adapters_are_rounded_once(base, tmp_path):
    """A bf16 kohya file with alpha / rank = 3 / 4: the scale stays out of the factors (PEFT's scaling), so the
    adapters add the float32 merge's update; folding it into lora_B rounded it twice (~0.4% off)."""
    path = tmp_path / "bf16.safetensors"
    expected = write(path, "kohya-framepack", base.bundle.transformer, seed=17, dtype=torch.bfloat16, alpha=3.0)
    assert {e.scale for e in expected} == {0.75}
    fp = FramePack.load("tiny", device="cpu", loras=(f"{path}:1",), lora_mode="unmerged")
    _check_adapters(fp.bundle.transformer, expected, 1.0)


def test_unmerged_peft_folder_and_header_config_scale_as_merged(base, tmp_path):
    folder = tmp_path / "peft-out"
    expected = peft_folder(folder, base.bundle.transformer, seed=18)
    fp = FramePack.load("tiny", device="cpu", loras=(f"{folder}:0.5",), lora_mode="unmerged")
    _check_adapters(fp.bundle.transformer, expected, 0.5)
    trained = diffusers_trained(tmp_path / "trained", base.bundle.transformer, seed=19)
    path = tmp_path / "trained" / "pytorch_lora_weights.safetensors"
    fp = FramePack.load("tiny", device="cpu", loras=(f"{path}:1",), lora_mode="unmerged")
    _check_adapters(fp.bundle.transformer, trained, 1.0)


def test_unmerged_second_lora_on_the_same_modules(base, tmp_path):
    """Two files changing the same modules, at once and one after the other (`reconfigure`, as the web app's
    queue does): the second resolves through PEFT's wrappers, and nothing is lost."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ea = write(a, "diffusers", base.bundle.transformer, seed=20)
    eb = write(b, "kohya-framepack", base.bundle.transformer, seed=21)
    assert {e.module for e in ea} == {e.module for e in eb}
    both = dict(model="tiny", device="cpu", loras=(f"{a}:0.5", f"{b}:-1"), lora_mode="unmerged")
    assert len(preflight(Settings.load(both, environ={}))) == 2
    fp = FramePack.load(**both)
    got = _adapter_updates(fp.bundle.transformer, [e.module for e in ea])
    for x, y in zip(ea, eb):
        assert _relative(got[x.module], 0.5 * x.delta() - y.delta()) <= ADAPTER_TOLERANCE

    fp = FramePack.load("tiny", device="cpu", loras=(f"{a}:1",), lora_mode="unmerged")
    only_b = Settings.load(
        {"model": "tiny", "device": "cpu", "loras": (f"{b}:0.8",), "lora_mode": "unmerged"}, source="api"
    )
    assert fp.reconfigure(only_b)
    _check_adapters(fp.bundle.transformer, eb, 0.8)  # A is off and gone, B on every module it names
    entry = next(r for r in fp.reports if r.name == "lora.adapters").counters["loras"]
    assert [e["name"] for e in entry] == ["b.safetensors"]


# ---- refused: broken values, the weight cap, names ---------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora_unet_proj_out.lora_down.weight", float("nan")),
        ("lora_unet_proj_out.lora_up.weight", float("inf")),
        ("lora_unet_proj_out.alpha", float("nan")),
    ],
)
def test_non_finite_values_are_refused_at_read(base, tmp_path, key, value):
    """A NaN or inf anywhere (a factor, an alpha) gave an all-black clip with exit 0: refused at read."""
    path = tmp_path / "nan.safetensors"
    write(path, "kohya-framepack", base.bundle.transformer)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    broken = tensors[key].clone().flatten()
    broken[0] = value
    tensors[key] = broken.reshape(tensors[key].shape)
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=rf"nan.safetensors: {key} holds 1 NaN or infinite values"):
        load_lora(path, base.bundle.transformer)
    with pytest.raises(InputError, match="NaN or infinite"):
        FramePack.load("tiny", device="cpu", loras=(str(path),))


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_an_update_that_overflows_is_refused_naming_the_module(base, tmp_path, mode):
    path = tmp_path / "huge.safetensors"
    m = base.bundle.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((RANK, m.in_features), 1e20),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.full((m.out_features, RANK), 1e20),
        },
        str(path),
    )
    with pytest.raises(
        InputError, match=r"huge.safetensors x1: transformer_blocks.0.attn.to_q's weights are not finite"
    ):
        FramePack.load("tiny", device="cpu", loras=(str(path),), lora_mode=mode)


def test_rank_zero_and_a_two_valued_alpha_are_one_line_naming_the_key(base, tmp_path):
    zero = tmp_path / "rank0.safetensors"
    save_file(
        {
            "lora_unet_proj_out.lora_down.weight": torch.zeros(0, 128),
            "lora_unet_proj_out.lora_up.weight": torch.zeros(64, 0),
            "lora_unet_proj_out.alpha": torch.tensor(ALPHA),
        },
        str(zero),
    )
    with pytest.raises(InputError, match=r"rank0.safetensors: lora_unet_proj_out is a rank-0 pair") as info:
        load_lora(zero, base.bundle.transformer)
    assert "\n" not in str(info.value)
    two = tmp_path / "alpha2.safetensors"
    write(two, "kohya-framepack", base.bundle.transformer, extra={"lora_unet_proj_out.alpha": torch.tensor([2.0, 2.0])})
    with pytest.raises(InputError, match=r"alpha2.safetensors: lora_unet_proj_out.alpha holds 2 values"):
        load_lora(two, base.bundle.transformer)


def test_one_file_named_many_times_is_held_to_the_weight_cap(base, tmp_path):
    """The weights of one file (by SHA-256: the same path or a copy) add up; their sum is capped as one weight."""
    path = tmp_path / "a.safetensors"
    expected = write(path, "diffusers", base.bundle.transformer, seed=22)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    eight = Settings.load({"model": "tiny", "loras": (f"{path}:4",) * 8}, environ={})
    with pytest.raises(InputError, match=r"a.safetensors is named 8 times .*= 32: one file's weights add up"):
        preflight(eight)
    with pytest.raises(InputError, match=r"= 32"):
        FramePack.load("tiny", device="cpu", loras=(f"{path}:4",) * 8)
    with pytest.raises(InputError, match=r"named 2 times .*3 \+ 3 = 6"):
        FramePack.load("tiny", device="cpu", loras=(f"{path}:3", f"{copy}:3"), lora_mode="unmerged")
    fp = FramePack.load("tiny", device="cpu", loras=(f"{path}:2", f"{copy}:2"))  # 4 in all: allowed, and summed
    _check_merged(_weights(base.bundle.transformer), _weights(fp.bundle.transformer), expected, 4.0)


def test_a_file_without_tensors_and_a_folder_are_named(base, tmp_path):
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(InputError, match=r"LoRA empty.safetensors: not a LoRA .*no tensors"):
        load_lora(empty, base.bundle.transformer)
    folder = tmp_path / "loras.safetensors"
    folder.mkdir()
    with pytest.raises(SettingsError, match="is a folder, not a LoRA file"):
        Settings.load({"loras": (str(folder),)}, environ={})
    with pytest.raises(InputError, match="is a folder, not a LoRA file"):
        load_lora(folder, base.bundle.transformer)
