"""Fidelity metrics against the baseline: relative L2 and cosine of tensors, PSNR and SSIM of video frames.

PSNR and SSIM come from torchmetrics (Gaussian-window SSIM, 11x11, sigma 1.5, as in Wang et al. 2004),
computed per frame so drift along the video shows.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def relative_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference||, in float64."""
    c, r = candidate.double().flatten(), reference.double().flatten()
    if c.shape != r.shape:
        raise ValueError(f"shapes differ: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    norm = torch.linalg.vector_norm(r)
    diff = torch.linalg.vector_norm(c - r)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)


def cosine(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    c, r = candidate.double().flatten(), reference.double().flatten()
    return float(torch.nn.functional.cosine_similarity(c, r, dim=0))


def _frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float64 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() / 255.0


def psnr_per_frame(candidate: np.ndarray, reference: np.ndarray) -> list[float]:
    """PSNR in dB of each frame (inf where identical)."""
    if candidate.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {candidate.shape} vs {reference.shape}")
    c, r = _frames_tensor(candidate), _frames_tensor(reference)
    mse = ((c - r) ** 2).flatten(1).mean(dim=1)
    return [math.inf if m == 0 else float(10 * torch.log10(1.0 / m)) for m in mse]


def ssim_per_frame(candidate: np.ndarray, reference: np.ndarray, batch: int = 16) -> list[float]:
    from torchmetrics.functional.image import structural_similarity_index_measure

    if candidate.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {candidate.shape} vs {reference.shape}")
    out: list[float] = []
    for start in range(0, len(candidate), batch):
        c = _frames_tensor(candidate[start : start + batch])
        r = _frames_tensor(reference[start : start + batch])
        values = structural_similarity_index_measure(c, r, data_range=1.0, reduction="none")
        out += [float(v) for v in values]
    return out


def mean_psnr(per_frame: list[float]) -> float:
    """PSNR of the whole video from per-frame values: via the mean MSE, so one identical frame does not
    make the video 'infinite'."""
    mses = [0.0 if math.isinf(p) else 10 ** (-p / 10) for p in per_frame]
    mse = sum(mses) / len(mses)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
