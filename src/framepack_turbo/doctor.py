"""`framepack doctor`: what this machine has, what every setting is and why, what would run. Loads no model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from framepack_turbo import compat, placement
from framepack_turbo.hardware import OPTIONAL_BACKENDS, Hardware, library_versions
from framepack_turbo.optim.plan import make_plan
from framepack_turbo.settings import Settings, known_env, unknown_env_warnings


def diagnose(
    settings: Settings, hardware: Hardware | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The doctor report as data: keys settings, known_env, plan, placement, compat, hardware (+ versions, warnings,
    host_memory and disk: what the run needs against what the machine has, before anything loads).

    The plan and placement are exactly what `FramePack.load` would apply with these settings on this machine
    (the sidecar records the same plan)."""
    hardware = hardware or Hardware.detect(import_backends=True)
    report = compat.check(settings, hardware)
    plan = make_plan(settings, report, hardware)
    return {
        "hardware": hardware.to_dict(),
        "versions": library_versions(),
        "settings": settings.to_json_dict(),
        "known_env": known_env(type(settings)),
        "plan": plan.to_list(),
        "placement": plan.placement.to_dict(),
        "compat": report.to_list(),
        "warnings": unknown_env_warnings(os.environ if environ is None else environ, type(settings)),
        "host_memory": host_memory(settings, hardware),
        "disk": disk(settings, hardware),
    }


def host_memory(settings: Settings, hardware: Hardware) -> dict[str, Any]:
    """The run's host RAM estimate (placement.host_memory) with the machine's RAM and the rule's verdict."""
    return {
        **placement.host_memory(settings, hardware).to_dict(),
        "ram_total_gb": hardware.ram_total_gb,
        "ram_available_gb": hardware.ram_available_gb,
        "swap_free_gb": hardware.swap_free_gb,
        "short": compat.RULES_BY_ID["host-ram-short"].when(settings, hardware),
    }


def disk(settings: Settings, hardware: Hardware) -> dict[str, Any]:
    """The disk the run writes (compat.disk_need) against the free space where it writes."""
    return {
        **compat.disk_need(settings).to_dict(),
        "path": hardware.disk_path,
        "free_gb": hardware.disk_free_gb,
        "short": compat.RULES_BY_ID["disk-space-short"].when(settings, hardware),
    }


def host_lines(data: dict[str, Any]) -> list[str]:
    """The host-RAM and disk lines of the text report."""
    mem, dsk, size = data["host_memory"], data["disk"], placement.size_text
    if mem["ram_total_gb"] is None:
        has = "machine's RAM unknown"
    else:
        has = f"machine has {size(mem['ram_total_gb'])} total"
        if mem["ram_available_gb"] is not None:
            has += f" / {size(mem['ram_available_gb'])} available"
        if mem["swap_free_gb"]:
            has += f" (+ {size(mem['swap_free_gb'])} free swap)"
    flag = "  [short: see host-ram-short]" if mem["short"] else ""
    lines = [f"  host RAM: needs {placement.about(mem['need_gb'])} ({mem['detail']}), {has}{flag}"]
    free = "free space unknown" if dsk["free_gb"] is None else f"{size(dsk['free_gb'])} free"
    where = f" at {dsk['path']}" if dsk["path"] else ""
    flag = "  [short: see disk-space-short]" if dsk["short"] else ""
    lines.append(f"  disk: needs {placement.about(dsk['need_gb'])}{where} ({dsk['detail']}), {free}{flag}")
    return lines


def render_text(data: dict[str, Any]) -> str:
    hw = data["hardware"]
    lines = ["Hardware"]
    if hw["device"] == "cuda":
        cap = hw["compute_capability"]
        lines.append(
            f"  {hw['device_name']}: {hw['total_vram_gb']} GB ({hw['free_vram_gb']} GB free), "
            f"compute capability {cap[0]}.{cap[1]}, bf16 {'yes' if hw['bf16'] else 'no'}"
        )
    else:
        lines.append(f"  no CUDA device; CPU {hw['device_name']} x{hw['cpu_count']}")
    installed = [name for name, ok in hw["backends"].items() if ok]
    missing = [name for name, ok in hw["backends"].items() if not ok]
    lines.append(f"  backends that import: {', '.join(installed) or 'none'}")
    lines.append(f"  missing or broken: {', '.join(f'{m} ({OPTIONAL_BACKENDS[m]})' for m in missing) or 'none'}")
    if hw["onnx_providers"]:
        lines.append(f"  onnxruntime providers: {', '.join(hw['onnx_providers'])}")
    v = data["versions"]
    lines.append("  " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "diffusers", "transformers")))

    lines.append("")
    lines.append("Settings (value, source); * = not the default")
    for entry in data["settings"].values():
        mark = "*" if entry["source"] != "default" else " "
        value = entry["value"]
        value = ",".join(value) if isinstance(value, list) else value
        lines.append(f" {mark} {entry['env']:38} {str(value):>16}  {entry['source']}")

    lines.append("")
    lines.append("Plan (in order)")
    for p in data["plan"]:
        detail = f": {p['reason']}" if p["reason"] else ""
        lossy = " [lossy]" if p.get("lossy") and p["status"] == "active" else ""
        lines.append(f"  {p['status']:>9}  {p['title']}{lossy}{detail}")

    lines.append("")
    lines.append(f"Memory placement: {data['placement']['mode']} ({data['placement']['reason']})")
    lines += host_lines(data)

    lines.append("")
    lines.append("Compatibility")
    if not data["compat"]:
        lines.append("  no findings")
    for f in data["compat"]:
        lines.append(f"  [{f['severity']}] {f['id']}: {f['message']}")
        lines.append(f"      fix: {f['fix']}")
    for w in data["warnings"]:
        lines.append(f"  [warning] {w}")
    return "\n".join(lines)
