"""Resumable training checkpoints without pickle: model and optimizer tensors in safetensors, the rest
(step, losses, random state of the data stream) in JSON beside them. Written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    from framepack_turbo.files import atomic_path

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in state["param_groups"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(tensors, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp, open(tmp, "w") as f:
        json.dump({"info": info, "param_groups": groups}, f)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore into `model` and `optimizer`; the saved info, or None when there is no checkpoint."""
    if not path.with_suffix(".json").is_file() or not path.with_suffix(".safetensors").is_file():
        return None
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(path.with_suffix(".safetensors"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["info"]
