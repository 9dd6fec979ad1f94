"""The training sets of the tiny model: procedural clips encoded once with the VAE, cached as safetensors.

Encoding is most of a training set's cost (minutes on two cores), so it is done in chunks of clips, each
saved as it finishes, and a stopped run resumes where it was; the chunks are joined into one file at the
end. Each chunk draws its clips from its own seed, so a chunk's content does not depend on the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def pixels(clip: np.ndarray) -> torch.Tensor:
    """A rendered clip (T, H, W, 3) uint8 as the VAE takes it: (1, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(clip).float().permute(3, 0, 1, 2)[None] / 127.5 - 1


def latents(vae, x: torch.Tensor) -> torch.Tensor:
    """The VAE's latents of pixels `x` (its posterior's mode, scaled), in float16 as the sets store them."""
    return (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).half()


def encoded_clips(
    path: Path,
    count: int,
    seed: Sequence[int],
    one_clip: Callable[[np.random.Generator], dict[str, torch.Tensor]],
    desc: str,
    chunk: int = 50,
) -> dict[str, torch.Tensor]:
    """`count` rows, each a dict of tensors `one_clip(rng)` makes, stacked per key; cached at `path`.
    The chunk starting at clip `first` draws from `np.random.default_rng([*seed, first])`."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    if path.is_file():
        return load_file(path)
    parts = []
    for first in tqdm(range(0, count, chunk), desc=desc):
        part_path = path.with_name(f"{path.stem}-{first:05d}.safetensors")
        if not part_path.is_file():
            rng = np.random.default_rng([*seed, first])
            rows = [one_clip(rng) for _ in range(min(chunk, count - first))]
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({key: torch.stack([row[key] for row in rows]) for key in rows[0]}, part_path)
        parts.append(load_file(part_path))
    data = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    save_file(data, path)
    return data
