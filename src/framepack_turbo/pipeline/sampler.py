"""UniPC (B(h)=h, "bh1") for flow matching, with FramePack's resolution-dependent time shift.

Written from the UniPC paper (Zhao et al. 2023) in the flow-matching parameterisation FramePack uses:
the model returns the clean estimate x0, time is sigma in (0, 1], lambda = -log(sigma). One model
evaluation per step; step i evaluates at `sigmas[i]`, so the final sigma (0) is never evaluated and
the result is the last x0 estimate, as in FramePack.

diffusers' `UniPCMultistepScheduler` does not reproduce this (it predicts with its own sigma
convention and needs a final denoise step), so the sampler is ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma[B]) -> x0 estimate
StepCallback = Callable[["StepState"], None]

MAX_ORDER = 3
MU_POINTS = ((256, 0.5), (4096, 1.15))  # (latent tokens, mu): the line FramePack takes from Flux
MU_EXP_MAX = 7.0


def flux_mu(latent_tokens: int) -> float:
    """Shift exponent for a sequence of `latent_tokens` (`T*H*W/4`), capped at ln 7."""
    (x1, y1), (x2, y2) = MU_POINTS
    k = (y2 - y1) / (x2 - x1)
    return min(k * latent_tokens + (y1 - k * x1), math.log(MU_EXP_MAX))


def shift_sigma(t: torch.Tensor, mu: float) -> torch.Tensor:
    """`exp(mu) / (exp(mu) + (1/t - 1))`; maps 1 -> 1 and 0 -> 0, spending more steps at high noise."""
    e = math.exp(mu)
    return e / (e + (1.0 / t - 1.0))


def flow_sigmas(steps: int, latent_tokens: int) -> torch.Tensor:
    """`steps+1` float32 sigmas from 1 to 0, shifted for the sequence length."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1), flux_mu(latent_tokens))


@dataclass
class StepState:
    """What a step callback sees: the step index (0-based), the current sample and the x0 estimate."""

    step: int
    steps: int
    x: torch.Tensor
    denoised: torch.Tensor


def _unipc_coefficients(hh: torch.Tensor, rks: list[torch.Tensor], order: int):
    """Predictor and corrector weights of UniPC-bh1 for an update of `order` over step `-h`.

    Solves `R rho = b` with R_ij = r_j^(i) (the previous steps' relative log-SNR offsets, last one 1)
    and b_i = phi_{i+1}(h) i! / B(h), B(h) = h.
    """
    h_phi_1 = torch.expm1(hh)
    r = torch.stack([*rks, torch.ones_like(hh)])
    rows, b = [], []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / hh)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(b)
    if order == 1:
        rho_p, rho_c = None, torch.tensor([0.5], dtype=hh.dtype)
    elif order == 2:
        rho_p, rho_c = torch.tensor([0.5], dtype=hh.dtype), torch.linalg.solve(R, b)
    else:
        rho_p, rho_c = torch.linalg.solve(R[:-1, :-1], b[:-1]), torch.linalg.solve(R, b)
    return h_phi_1, rho_p, rho_c


def sample_unipc(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run `len(sigmas)-1` steps from noise `x` and return the final x0 estimate.

    `denoise(x, sigma)` returns the clean estimate. The callback runs after every step; raising from it
    stops sampling (that is how cancel works).
    """
    steps = len(sigmas) - 1
    order = min(MAX_ORDER, steps - 1) if steps > 1 else 1
    batch = x.shape[0]
    # The coefficients are formed in the sigmas' dtype, as FramePack forms them: float32 from its float32
    # sigmas. Because the sample is rounded to the model's dtype before every call, a last-bit difference
    # here compounds over the steps; float32 reproduces FramePack bit for bit (float64 sigmas give the
    # float64 reference the tests compare with).
    sig = sigmas

    history_t: list[torch.Tensor] = []  # previous times (scalars in the sigmas' dtype)
    history_m: list[torch.Tensor] = []  # previous x0 estimates
    for i in range(steps):
        t = sig[i]
        if i == 0:
            model_t = denoise(x, sigmas[i].expand(batch))
        else:
            step_order = min(i, order)
            t0, m0 = history_t[-1], history_m[-1]
            lam0 = -torch.log(t0)
            h = -torch.log(t) - lam0
            rks, d1s = [], []
            for k in range(1, step_order):
                rk = (-torch.log(history_t[-(k + 1)]) - lam0) / h
                rks.append(rk)
                d1s.append((history_m[-(k + 1)] - m0) / rk.to(m0.dtype))
            h_phi_1, rho_p, rho_c = _unipc_coefficients(-h, rks, step_order)
            b_h = (-h).to(x.dtype)  # B(h) of the bh1 variant

            x_base = (t / t0).to(x.dtype) * x - h_phi_1.to(x.dtype) * m0
            if d1s:
                d1 = torch.stack(d1s, dim=1)
                predicted = torch.tensordot(d1, rho_p.to(x.dtype), dims=([1], [0]))
                x_pred = x_base - b_h * predicted
            else:
                d1, x_pred = None, x_base
            model_t = denoise(x_pred, sigmas[i].expand(batch))
            corrected = rho_c[-1].to(x.dtype) * (model_t - m0)
            if d1 is not None:
                corrected = corrected + torch.tensordot(d1, rho_c[:-1].to(x.dtype), dims=([1], [0]))
            x = x_base - b_h * corrected
        history_t = (history_t + [t])[-order:]
        history_m = (history_m + [model_t])[-order:]
        if callback is not None:
            callback(StepState(step=i, steps=steps, x=x, denoised=model_t))
    return history_m[-1]
