"""The UniPC flow sampler and FramePack's time shift, against a float64 reference of the same formulas."""

import math

import numpy as np
import pytest
import torch

from framepack_turbo.pipeline.sampler import flow_sigmas, flux_mu, sample_unipc, shift_sigma


def test_mu_line_and_cap():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)  # the midpoint
    assert flux_mu(10**6) == pytest.approx(math.log(7.0))


def test_shift_hand_computed():
    # mu = ln 2: 2 / (2 + (1/0.5 - 1)) = 2/3
    assert float(shift_sigma(torch.tensor(0.5), math.log(2))) == pytest.approx(2 / 3)
    assert float(shift_sigma(torch.tensor(1.0), 1.0)) == pytest.approx(1.0)


def test_sigmas_shape_and_ends():
    # 128x128 tiny run: 9 latent frames of 16x16 -> 9*16*16/4 = 576 tokens
    s = flow_sigmas(25, 576)
    assert s.shape == (26,) and s.dtype == torch.float32
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert torch.all(s[1:] < s[:-1])
    mu = flux_mu(576)
    t = 1 - 3 / 25
    assert float(s[3]) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / t - 1), rel=1e-6)


def test_steps_must_be_positive():
    with pytest.raises(ValueError):
        flow_sigmas(0, 100)


# ---- reference ---------------------------------------------------------------------------------


def _phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j+k)!  (series, independent of the recursion the sampler uses)."""
    return sum(z**j / math.factorial(j + k) for j in range(60))


def reference_unipc_bh1(model, x, sigmas):
    """Float64 UniPC-bh1 in FramePack's flow form: lambda = -log(sigma), B(h) = h, x0-prediction."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    steps = len(sigmas) - 1
    order = min(3, steps - 1) if steps > 1 else 1
    ts, ms = [], []
    for i in range(steps):
        t = sigmas[i]
        if i == 0:
            m = model(x, t)
        else:
            p = min(i, order)
            t0, m0 = ts[-1], ms[-1]
            h = -math.log(t) + math.log(t0)
            hh = -h
            r = [(-math.log(ts[-(k + 1)]) + math.log(t0)) / h for k in range(1, p)]
            d = [(ms[-(k + 1)] - m0) / r[k - 1] for k in range(1, p)]
            rr = np.array(r + [1.0])
            R = np.stack([rr**i for i in range(p)])
            b = np.array([math.factorial(i) * _phi(i + 1, hh) for i in range(1, p + 1)])
            x_base = (t / t0) * x - math.expm1(hh) * m0
            if p == 1:
                rho_p, rho_c = [], [0.5]
            elif p == 2:
                rho_p, rho_c = [0.5], np.linalg.solve(R, b)
            else:
                rho_p, rho_c = np.linalg.solve(R[:-1, :-1], b[:-1]), np.linalg.solve(R, b)
            x_pred = x_base - hh * sum(rp * dk for rp, dk in zip(rho_p, d))
            m = model(x_pred, t)
            x = x_base - hh * (sum(rc * dk for rc, dk in zip(rho_c[:-1], d)) + rho_c[-1] * (m - m0))
        ts.append(t)
        ms.append(m)
        ts, ms = ts[-order:], ms[-order:]
    return ms[-1]


def _toy_model(target):
    """A smooth nonlinear x0-predictor, so every order of the sampler matters."""

    def np_model(x, t):
        return target + 0.3 * np.sin(3 * x) * t + 0.1 * x * t * t

    def torch_model(x, t):
        tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return torch.from_numpy(target).to(x.dtype) + 0.3 * torch.sin(3 * x) * tt + 0.1 * x * tt * tt

    return np_model, torch_model


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 25])
def test_matches_float64_reference(steps):
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((1, 4, 3, 2, 2))
    target = rng.standard_normal(x.shape)
    np_model, torch_model = _toy_model(target)
    sigmas = flow_sigmas(steps, 576)
    expected = reference_unipc_bh1(np_model, x, sigmas.double().numpy())
    got = sample_unipc(torch_model, torch.from_numpy(x).float(), sigmas)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=2e-5)
    # in float64 end to end, agreement is at rounding level
    got64 = sample_unipc(torch_model, torch.from_numpy(x), sigmas.double())
    np.testing.assert_allclose(got64.numpy(), expected, rtol=0, atol=1e-10)


def test_evaluates_each_sigma_but_the_last_once():
    seen = []

    def model(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    sigmas = flow_sigmas(6, 576)
    sample_unipc(model, torch.randn(1, 2, 1, 2, 2), sigmas)
    assert seen == pytest.approx(sigmas[:-1].tolist())


def test_perfect_denoiser_is_returned():
    target = torch.randn(1, 3, 2, 4, 4)
    out = sample_unipc(lambda x, t: target.clone(), torch.randn_like(target), flow_sigmas(5, 576))
    torch.testing.assert_close(out, target)


def test_callback_sees_every_step_and_can_stop():
    steps = []

    def cb(state):
        steps.append(state.step)
        if state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_unipc(lambda x, t: x * 0, torch.randn(1, 1, 1, 2, 2), flow_sigmas(10, 576), callback=cb)
    assert steps == [0, 1, 2]
