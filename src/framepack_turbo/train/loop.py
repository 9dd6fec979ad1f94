"""The optimisation loop both trainers share: resume from the checkpoint, set the learning rate, step,
record the loss, checkpoint every `save_every` steps and at the end, show progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from framepack_turbo.train import checkpoint

log = logging.getLogger(__name__)


def fit(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ckpt: Path,
    steps: int,
    save_every: int,
    lr_at: Callable[[int], float],
    loss_at: Callable[[int], torch.Tensor],
    desc: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model` to `steps`; `loss_at(step)` draws its own data from the step number, so a resumed run
    sees the same stream. Returns the checkpoint info (step, losses, seconds)."""
    from tqdm import tqdm

    info = checkpoint.load(ckpt, model, opt) or {"step": 0, "losses": [], "seconds": 0.0}
    if info["step"]:
        log.info("Resuming the %s at step %d", desc, info["step"])
    model.train()
    bar = tqdm(total=steps, initial=info["step"], desc=desc, disable=not progress)
    started = time.perf_counter()
    for step in range(info["step"], steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        info["losses"].append(round(float(loss), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            info.update(step=step + 1, seconds=info["seconds"] + time.perf_counter() - started)
            started = time.perf_counter()
            checkpoint.save(ckpt, model, opt, info)
    bar.close()
    model.eval()
    return info
