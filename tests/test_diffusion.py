"""DDIM and the schedule against independent truth (SPEC 2)."""

import math

import pytest
import torch

from edtool.diffusion import (add_noise, alpha_bar, beta, ddim_sample, ddpm_sample, eps_to_score, initial_noise,
                              score_to_eps, timesteps)


def test_schedule_matches_the_paper_formula():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = 1 - torch.cos(t / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(beta(t), expected)
    assert torch.allclose(alpha_bar(t) + beta(t), torch.ones_like(t))
    assert beta(torch.tensor(0.0)) == 0 and 0.999 < beta(torch.tensor(1.0)) < 1


def test_timesteps_run_from_one_down_to_zero():
    assert timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and timesteps(4).dtype == torch.float64


def test_score_noise_round_trip():
    t = torch.tensor([0.3, 0.9])
    eps = torch.randn(2, 1, 4, 4)
    assert torch.allclose(score_to_eps(eps_to_score(eps, t), t), eps, atol=1e-6)
    assert torch.allclose(eps_to_score(eps, t)[1], -eps[1] / beta(t[1]).sqrt())


def test_one_image_training_set_lands_on_that_image():
    """The exact denoiser of a delta distribution makes DDIM land on the image."""
    y = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1

    def ideal_eps(t, x):  # eps such that sqrt(ab) y + sqrt(b) eps = x
        ab, b = alpha_bar(t).view(-1, 1, 1, 1), beta(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * y) / b.sqrt()

    x = initial_noise(3, (4, 1, 8, 8), dtype=torch.float64)
    out = ddim_sample(ideal_eps, x, timesteps(7))
    assert torch.allclose(out, y.expand_as(out), atol=1e-10)


def test_gaussian_data_statistics_are_reproduced():
    """For N(mu, s^2 I) data the score is known in closed form; DDIM's output has mean mu, std s."""
    mu, s = 0.4, 0.3

    def gaussian_eps(t, x):
        ab, b = alpha_bar(t).view(-1, 1, 1, 1), beta(t).view(-1, 1, 1, 1)
        score = -(x - ab.sqrt() * mu) / (ab * s**2 + b)
        return score_to_eps(score, t)

    g = torch.Generator().manual_seed(0)
    t1 = torch.tensor(1.0, dtype=torch.float64)
    std1 = (alpha_bar(t1) * s**2 + beta(t1)).sqrt()
    x = alpha_bar(t1).sqrt() * mu + std1 * torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = ddim_sample(gaussian_eps, x, timesteps(100))
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.03)
    # ancestral sampling reaches the same law by another road (fresh noise each step), from pure noise
    noise = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = ddpm_sample(gaussian_eps, noise, 200, seed=1)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.03)
    assert torch.equal(ddpm_sample(gaussian_eps, noise, 200, seed=1), out)  # the seed fixes the draw


def test_ancestral_sampling_lands_on_a_single_training_image_and_clips():
    """With the exact denoiser of a delta distribution every ancestral step's x0_hat is the image itself."""
    y = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1

    def ideal_eps(t, x):
        ab, b = alpha_bar(t).view(-1, 1, 1, 1), beta(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * y) / b.sqrt()

    x = initial_noise(3, (4, 1, 8, 8), dtype=torch.float64)
    assert torch.allclose(ddpm_sample(ideal_eps, x, 7, seed=5), y.expand(4, -1, -1, -1), atol=1e-10)
    # a denoiser that overshoots the data range is clipped back into [-clip, clip]
    far = ddpm_sample(lambda t, x: -3 * x, x, 5, clip_x0=1.0)
    assert far.abs().max().item() <= 1.0 + 1e-12


def test_on_step_sees_every_point_before_its_update():
    seen = []
    ddim_sample(lambda t, x: torch.zeros_like(x), torch.ones(1, 1, 2, 2), 5, on_step=lambda j, t, x: seen.append((j, t)))
    assert seen == [(j, (5 - j) / 5) for j in range(5)]


def test_the_model_sees_the_grid_times_exactly_and_x_keeps_its_dtype():
    """eps_fn gets t_j of the grid as float64, bit for bit (what a machine's schedule lookup needs),
    and a float64 eps does not turn a float32 x into float64; an int is short for timesteps(N)."""
    seen = []

    def eps_fn(t, x):
        seen.append(t)
        return torch.zeros_like(x, dtype=torch.float64) + t[:, None, None, None]

    x = torch.ones(2, 1, 2, 2)
    out = ddim_sample(eps_fn, x, timesteps(20))
    assert out.dtype == torch.float32 and len(seen) == 20
    assert all(t.dtype == torch.float64 and t.tolist() == [(20 - j) / 20] * 2 for j, t in enumerate(seen))
    assert torch.equal(ddim_sample(eps_fn, x, 20), out)
    halfway = ddim_sample(eps_fn, x, torch.tensor([1.0, 0.5]))  # a custom grid: two points, one step
    assert torch.equal(halfway, ddim_sample(eps_fn, x, timesteps(2)[:2]))
    with pytest.raises(ValueError, match="decreasing"):
        ddim_sample(eps_fn, x, [0.0, 1.0])


def test_forward_process_and_initial_noise_are_reproducible():
    assert torch.equal(initial_noise(7, (2, 1, 4, 4)), initial_noise(7, (2, 1, 4, 4)))
    x0, eps, t = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([0.5])
    assert torch.allclose(add_noise(x0, t, eps), alpha_bar(t).sqrt() * x0)
    with pytest.raises(ValueError):
        ddim_sample(lambda t, x: x, torch.ones(1, 1, 2, 2), 0)
