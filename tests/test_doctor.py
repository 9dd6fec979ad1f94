"""`framepack doctor`, the generate gate, the API gate and the generated configuration docs."""

import json
import re

import pytest
from typer.testing import CliRunner

from framepack_turbo import api
from framepack_turbo.cli import app
from framepack_turbo.settings import Settings, known_env, markdown_table

from .conftest import ROOT
from .test_settings import SPEC_VARIABLES


def doctor(*args, env=None):
    return CliRunner().invoke(app, ["doctor", *args], env=env)


def test_doctor_json_has_the_contract_keys():
    result = doctor("--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"settings", "known_env", "plan", "compat", "hardware"} <= data.keys()
    assert {"FRAMEPACK_" + v for v in SPEC_VARIABLES} <= set(data["known_env"])
    assert data["settings"]["quant_bits"] == {"value": 8, "source": "default", "env": "FRAMEPACK_QUANT_BITS"}
    assert {"device", "backends", "compute_capability"} <= data["hardware"].keys()
    assert {p["name"] for p in data["plan"] if p["status"] != "off"} == {"placement", "loading.parallel"}
    assert data["placement"]["mode"] in ("cpu", "high-vram", "v1", "v2") and data["placement"]["reason"]
    # the defaults raise nothing, but the host RAM and disk rules measure this machine against the real model
    assert [f["id"] for f in data["compat"] if f["id"] not in ("host-ram-short", "disk-space-short")] == []
    assert {"need_gb", "ram_total_gb", "short"} <= data["host_memory"].keys()
    assert {"need_gb", "free_gb", "path", "short"} <= data["disk"].keys()


def test_doctor_env_source():
    data = json.loads(doctor("--json", env={"FRAMEPACK_ENABLE_COMPILE": "1"}).output)
    assert data["settings"]["enable_compile"]["source"] == "env"
    assert data["settings"]["enable_compile"]["value"] is True


def test_doctor_flags_and_preset_sources():
    data = json.loads(doctor("--json", "--preset", "fp8-quality", "--quant-bits", "4", "--enable-quant").output)
    assert data["settings"]["quant_bits"]["source"] == "cli"
    assert data["settings"]["enable_fp8"]["source"] == "preset"
    assert data["settings"]["preset"]["value"] == "fp8-quality"
    assert "multiple-quantization" in [f["id"] for f in data["compat"]]


def test_doctor_bad_value_exits_2_naming_the_variable():
    result = doctor("--json", env={"FRAMEPACK_QUANT_BITS": "3"})
    assert result.exit_code == 2
    assert result.output.strip() == "error: FRAMEPACK_QUANT_BITS=3: allowed 4 or 8"


def test_doctor_warns_about_a_misspelt_variable():
    result = CliRunner().invoke(app, ["doctor", "--json"], env={"FRAMEPACK_ENABLE_COMPLIE": "1"})
    assert result.exit_code == 0
    data = json.loads(result.output[result.output.index("{") :])
    assert data["warnings"] == [
        "unknown variable FRAMEPACK_ENABLE_COMPLIE is ignored; did you mean FRAMEPACK_ENABLE_COMPILE?"
    ]
    text = doctor(env={"FRAMEPACK_ENABLE_COMPLIE": "1"}).output
    assert "did you mean FRAMEPACK_ENABLE_COMPILE?" in text


def test_doctor_critical_exits_1():
    result = doctor("--json", env={"FRAMEPACK_ENABLE_TENSORRT": "1", "FRAMEPACK_USE_BNB": "1"})
    assert result.exit_code == 1
    data = json.loads(result.output)
    critical = [f for f in data["compat"] if f["severity"] == "critical"]
    assert [f["id"] for f in critical] == ["tensorrt-bitsandbytes"]
    assert critical[0]["fix"].startswith("FRAMEPACK_USE_BNB=0")


def test_doctor_text():
    text = doctor("--use-onnx-engines").output
    for heading in ("Hardware", "Settings (value, source)", "Plan (in order)", "Memory placement", "Compatibility"):
        assert heading in text
    assert "FRAMEPACK_USE_ONNX_ENGINES" in text
    assert re.search(r"active +ONNX engines \(onnxruntime\)", text) or "onnx-needs-onnxruntime" in text


def test_generate_stops_before_loading_on_critical(monkeypatch, example_image, tmp_path):
    def no_loading(*a, **k):
        raise AssertionError("models must not load when a critical rule fires")

    monkeypatch.setattr(api, "load_bundle", no_loading)
    args = [
        "generate",
        "--image",
        str(example_image),
        "--prompt",
        "x",
        "--model",
        "tiny-random",
        "--out",
        str(tmp_path / "o.mp4"),
    ]
    result = CliRunner().invoke(app, args, env={"FRAMEPACK_ENABLE_TENSORRT": "1", "FRAMEPACK_USE_BNB": "1"})
    assert result.exit_code == 1
    assert "tensorrt-bitsandbytes" in result.output and "FRAMEPACK_USE_BNB=0" in result.output
    assert "--ignore-incompatible" in result.output


def test_api_gate_and_ignore(monkeypatch):
    loaded = []
    monkeypatch.setattr(api, "load_bundle", lambda *a, **k: loaded.append(a) or _FakeBundle())
    monkeypatch.setattr(api.time, "sleep", lambda s: loaded.append(("slept", s)))
    with pytest.raises(api.IncompatibleSettings, match="multiple-quantization"):
        api.FramePack.load("tiny-random", enable_quant=True, enable_fp8=True)
    assert loaded == []
    monkeypatch.setattr(api, "apply_plan", lambda *a, **k: [])
    fp = api.FramePack.load("tiny-random", enable_quant=True, enable_fp8=True, ignore_incompatible=True)
    assert ("slept", api.INCOMPATIBLE_PAUSE_S) in loaded
    assert fp.settings.source_of("enable_fp8") == "api"


class _FakeBundle:
    class preset:
        name = "tiny-random"


def test_generate_with_preset_runs_baseline_and_records_settings(tiny, example_image, tmp_path):
    fp = api.FramePack(tiny.bundle, Settings.load({"preset": "max-performance", "model": "tiny-random"}))
    result = fp.generate(example_image, "a cat", out=tmp_path / "o.mp4", seconds=1, steps=1, resolution=64)
    record = result.sidecar["settings"]
    assert record["values"]["enable_quant"] == {"value": True, "source": "preset", "env": "FRAMEPACK_ENABLE_QUANT"}
    assert {p["name"]: p["status"] for p in record["plan"]}["onnx"] == "off"


def test_settings_defaults_flow_into_options(tiny, example_image, tmp_path):
    fp = api.FramePack(tiny.bundle, Settings.load({"steps": 1, "seconds": 1, "resolution": 64, "seed": 7}))
    result = fp.generate(example_image, "a cat", out=tmp_path / "o.mp4")
    assert result.sidecar["options"]["steps"] == 1 and result.sidecar["seed"] == 7
    assert result.frames.shape[0] == 37


def test_configuration_docs_are_up_to_date():
    path = ROOT / "docs" / "configuration.md"
    assert path.read_text() == markdown_table(), "run: python -m framepack_turbo.settings > docs/configuration.md"
    for name in known_env():
        assert f"`{name}`" in path.read_text()


def test_backend_that_fails_to_import_is_reported_missing(tmp_path, monkeypatch):
    from framepack_turbo.hardware import _imports, _installed

    (tmp_path / "brokenbackend.py").write_text("raise RuntimeError('built for another CUDA')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _installed("brokenbackend") is True
    assert _imports("brokenbackend") is False
    assert _imports("json") is True
