"""Settings: every spec variable, defaults, parsing, precedence and sources, presets, errors, suggestions."""

import pytest
from pydantic import ValidationError

from framepack_turbo.presets import PRESETS
from framepack_turbo.settings import (
    Settings,
    SettingsError,
    env_name,
    flag_name,
    known_env,
    parse_flags,
    setting_names,
    unknown_env_warnings,
)

# Every FRAMEPACK_* variable the spec (shared/seeds) names: the promise this object keeps.
SPEC_VARIABLES = """
ENABLE_QUANT QUANT_BITS ENABLE_FP8 FP8_TARGET_KEYS FP8_EXCLUDE_KEYS FP8_USE_SCALED_MM USE_BNB BNB_LOAD_IN_4BIT
BNB_CPU_OFFLOAD BNB_DEVICE_MAP BNB_DOUBLE_QUANT ENABLE_COMPILE ENABLE_OPT_CACHE OPTIMIZED_TRANSFORMER RUNTIME_CACHE
RUNTIME_CACHE_DIR ENABLE_FBCACHE FBCACHE_THRESHOLD FBCACHE_VERBOSE ENABLE_SIM_CACHE SIM_CACHE_THRESHOLD
SIM_CACHE_MAX_SKIP SIM_CACHE_MAX_ENTRIES SIM_CACHE_USE_FAISS SIM_CACHE_VERBOSE ENABLE_KV_CACHE KV_CACHE_LEN
KV_CACHE_VERBOSE ENABLE_TENSORRT TRT_TRANSFORMER TRT_TEXT_ENCODERS USE_ONNX_ENGINES TENSORRT_CACHE_DIR
TRT_WORKSPACE_MB TRT_MAX_AUX_STREAMS TRT_MAX_CACHED_SHAPES ONNX_TRT_ENABLE ONNX_TRT_FP16 ONNX_TRT_INT8
ONNX_TRT_DEVICE_ID ONNX_TRT_WORKSPACE_MB ONNX_TRT_CACHE_DIR JIT_ARTIFACT JIT_SAVE JIT_LOAD JIT_STRICT XFORMERS_MODE
ENABLE_PRUNE ENFORCE_LOW_PRECISION FAST_START PARALLEL_LOADERS PRELOAD_REPOS FORCE_PARALLEL_LOADERS VAE_CHUNK_SIZE
VAE_CHUNK_RESERVE_GB VAE_CHUNK_SAFETY VAE_UPSCALE_FACTOR ENABLE_MODULE_CACHE ENABLE_BETTERTRANSFORMER
""".split()


def test_every_spec_variable_is_known():
    assert len(SPEC_VARIABLES) == 59
    missing = sorted(set("FRAMEPACK_" + v for v in SPEC_VARIABLES) - set(known_env()))
    assert missing == []
    assert "FRAMEPACK_PRESET" in known_env()


def test_spec_flags_parse():
    parsed = parse_flags(
        [
            "--use-memory-v2",
            "--jit-mode",
            "trace",
            "--xformers-mode",
            "aggressive",
            "--enforce-low-precision",
            "--fast-start",
            "--disable-bettertransformer",
            "--quant-bits",
            "4",
        ]
    )
    s = Settings.load(parsed)
    assert s.use_memory_v2 and s.jit_mode == "trace" and s.xformers_mode == "aggressive"
    assert s.enforce_low_precision and s.fast_start and s.enable_bettertransformer is False and s.quant_bits == 4


def test_every_setting_has_a_flag_an_env_name_a_meaning():
    for name in setting_names():
        field = Settings.model_fields[name]
        assert field.description, name
        assert (field.json_schema_extra or {}).get("group"), name
        assert env_name(name) == "FRAMEPACK_" + name.upper()
        assert flag_name(name) == "--" + name.replace("_", "-")
    assert len(set(known_env())) == len(known_env())


def test_spec_defaults():
    s = Settings.load({})
    assert s.enable_bettertransformer is False
    assert s.runtime_cache is True
    assert s.quant_bits == 8
    assert s.fbcache_threshold == 0.035
    assert s.sim_cache_threshold == 0.9 and s.sim_cache_max_skip == 1 and s.sim_cache_max_entries == 12
    assert s.kv_cache_len == 4096
    assert s.trt_workspace_mb == 4096 and s.trt_max_aux_streams == 2 and s.trt_max_cached_shapes == 8
    assert s.onnx_trt_workspace_mb == 4096
    assert s.xformers_mode == "standard" and s.jit_mode == "off"
    assert s.vae_chunk_reserve_gb == 2.0 and s.vae_chunk_safety == 1.2 and s.vae_upscale_factor == 8
    # generation defaults are FramePack's
    assert (s.seconds, s.steps, s.window, s.seed, s.gs, s.cfg, s.rs, s.resolution, s.crf) == (
        5.0,
        25,
        9,
        31337,
        10.0,
        1.0,
        0.0,
        640,
        16,
    )
    assert s.gpu_memory_preservation == 6.0
    assert all(src == "default" for src in s.sources.values())


def test_precedence_cli_over_env_over_preset_over_default(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_PRESET", "max-performance")  # sets enable_quant, quant_bits 8, teacache ...
    monkeypatch.setenv("FRAMEPACK_QUANT_BITS", "4")
    monkeypatch.setenv("FRAMEPACK_FBCACHE_THRESHOLD", "0.05")
    s = Settings.load({"fbcache_threshold": "0.1"})
    assert (s.fbcache_threshold, s.source_of("fbcache_threshold")) == (0.1, "cli")  # cli beats env
    assert (s.quant_bits, s.source_of("quant_bits")) == (4, "env")  # env beats preset
    assert (s.enable_quant, s.source_of("enable_quant")) == (True, "preset")  # preset beats default
    assert (s.kv_cache_len, s.source_of("kv_cache_len")) == (4096, "default")
    assert (s.preset, s.source_of("preset")) == ("max-performance", "env")


def test_cli_preset_beats_env_preset(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_PRESET", "max-performance")
    s = Settings.load({"preset": "low-vram"})
    assert s.preset == "low-vram" and s.use_bnb and not s.enable_quant
    assert s.source_of("use_bnb") == "preset" and s.source_of("enable_quant") == "default"


def test_api_source_label():
    assert Settings.load({"steps": 4}, source="api").source_of("steps") == "api"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load_and_match_their_table(name):
    s = Settings.load({"preset": name})
    for key, value in PRESETS[name].items():
        assert getattr(s, key) == value, key
        assert s.source_of(key) == "preset"


def test_spec_example_presets_exist():
    assert set(PRESETS) == {"default", "max-performance", "fast", "tensorrt", "fp8-quality", "low-vram"}
    assert PRESETS["tensorrt"]["use_bnb"] is False  # "Don't use BitsAndBytes with TensorRT!"


@pytest.mark.parametrize(
    "raw, expected",
    [("1", True), ("true", True), ("yes", True), ("on", True), ("0", False), ("false", False), ("off", False)],
)
def test_bool_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("FRAMEPACK_ENABLE_COMPILE", raw)
    s = Settings.load({})
    assert s.enable_compile is expected and s.source_of("enable_compile") == "env"


def test_empty_variable_means_unset(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_QUANT_BITS", "")
    s = Settings.load({})
    assert s.quant_bits == 8 and s.source_of("quant_bits") == "default"


def test_csv_lists(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_FP8_TARGET_KEYS", "attn, mlp,")
    assert Settings.load({}).fp8_target_keys == ("attn", "mlp")
    assert Settings.load(parse_flags(["--fp8-exclude-keys=norm,proj"])).fp8_exclude_keys == ("norm", "proj")


def test_settings_are_frozen():
    s = Settings.load({})
    with pytest.raises(ValidationError):
        s.quant_bits = 4


@pytest.mark.parametrize(
    "env, line",
    [
        ({"FRAMEPACK_QUANT_BITS": "3"}, "FRAMEPACK_QUANT_BITS=3: allowed 4 or 8"),
        ({"FRAMEPACK_FBCACHE_THRESHOLD": "1.5"}, "FRAMEPACK_FBCACHE_THRESHOLD=1.5: allowed a number > 0 and <= 1"),
        (
            {"FRAMEPACK_SIM_CACHE_THRESHOLD": "-0.1"},
            "FRAMEPACK_SIM_CACHE_THRESHOLD=-0.1: allowed a number >= 0 and <= 1",
        ),
        ({"FRAMEPACK_XFORMERS_MODE": "fast"}, "FRAMEPACK_XFORMERS_MODE=fast: allowed standard or aggressive or off"),
        ({"FRAMEPACK_ENABLE_COMPILE": "maybe"}, "FRAMEPACK_ENABLE_COMPILE=maybe: allowed 1 or 0"),
        ({"FRAMEPACK_JIT_LOAD": "/no/such/file.pt"}, "FRAMEPACK_JIT_LOAD=/no/such/file.pt: must be an existing file"),
        ({"FRAMEPACK_MODEL_DIR": "/no/such/dir"}, "FRAMEPACK_MODEL_DIR=/no/such/dir: must be an existing folder"),
        ({"FRAMEPACK_KV_CACHE_LEN": "many"}, "FRAMEPACK_KV_CACHE_LEN=many: allowed an integer >= 1"),
        ({"FRAMEPACK_PRESET": "turbo"}, "FRAMEPACK_PRESET=turbo: unknown preset; choose default, max-performance"),
        ({"FRAMEPACK_DEVICE": "gpu0"}, "FRAMEPACK_DEVICE=gpu0: must be cpu, cuda or cuda:N"),
    ],
)
def test_bad_env_values_name_variable_value_and_allowed(monkeypatch, env, line):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as info:
        Settings.load({})
    assert str(info.value).startswith(line)
    assert info.value.exit_code == 2


def test_bad_flag_value_names_the_flag():
    with pytest.raises(SettingsError, match=r"^--quant-bits 3: allowed 4 or 8$"):
        Settings.load(parse_flags(["--quant-bits", "3"]))


def test_several_bad_values_one_line_each(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_QUANT_BITS", "3")
    with pytest.raises(SettingsError) as info:
        Settings.load({"steps": "0"})
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert any(line.startswith("FRAMEPACK_QUANT_BITS=3") for line in lines)
    assert any(line.startswith("--steps 0") for line in lines)


def test_unknown_variable_suggests_nearest():
    assert unknown_env_warnings({"FRAMEPACK_ENABLE_COMPLIE": "1"}) == [
        "unknown variable FRAMEPACK_ENABLE_COMPLIE is ignored; did you mean FRAMEPACK_ENABLE_COMPILE?"
    ]
    assert "FRAMEPACK_QUANT_BITS" in unknown_env_warnings({"FRAMEPACK_QUANT_BIT": "8"})[0]
    assert "docs/configuration.md" in unknown_env_warnings({"FRAMEPACK_ZZZZZZ": "1"})[0]
    assert unknown_env_warnings({"FRAMEPACK_ENABLE_COMPILE": "1", "PATH": "/bin"}) == []


def test_unknown_variable_is_logged_not_fatal(monkeypatch, caplog):
    monkeypatch.setenv("FRAMEPACK_ENABLE_COMPLIE", "1")
    s = Settings.load({})
    assert s.enable_compile is False
    assert "did you mean FRAMEPACK_ENABLE_COMPILE?" in caplog.text


def test_flag_parsing_forms():
    assert parse_flags(["--enable-compile", "--no-runtime-cache", "--quant-bits=4", "--steps", "8"]) == {
        "enable_compile": True,
        "runtime_cache": False,
        "quant_bits": "4",
        "steps": "8",
    }
    with pytest.raises(SettingsError, match="unknown option --enable-complie; did you mean --enable-compile"):
        parse_flags(["--enable-complie"])
    with pytest.raises(SettingsError, match="--steps needs a value"):
        parse_flags(["--steps"])
    with pytest.raises(SettingsError, match="unknown option --bogus$"):
        parse_flags(["--bogus"])


def test_json_view():
    view = Settings.load({"steps": 3}).to_json_dict()
    assert view["steps"] == {"value": 3, "source": "cli", "env": "FRAMEPACK_STEPS"}
    assert view["runtime_cache_dir"]["value"] == "Cache/runtime_caches"
    assert set(view) == set(setting_names())


def test_seed_random_draws_a_seed_that_is_then_the_seed():
    from framepack_turbo.constants import RANDOM_SEED_BELOW

    drawn = [Settings.load({"seed": value}).seed for value in ("random", "Random", " RANDOM ")]
    assert all(isinstance(s, int) and 0 <= s < RANDOM_SEED_BELOW for s in drawn)
    assert len(set(drawn + [Settings.load(parse_flags(["--seed", "random"])).seed])) > 1  # drawn, not fixed
    assert Settings.load({"seed": "42"}).seed == 42
    with pytest.raises(SettingsError, match="--seed randomly"):
        Settings.load({"seed": "randomly"})
