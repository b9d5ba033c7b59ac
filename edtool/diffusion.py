"""The paper's diffusion conventions (SPEC 2): cosine schedule, score <-> noise, deterministic DDIM.

Time t runs in [0, 1]; beta(t) is the noise variance and alpha_bar(t) = 1 - beta(t) the
signal power, so x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps.
"""

import math
from typing import Callable, Optional

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eps_hat(t (B,), x (B,C,H,W))


def beta(t: torch.Tensor) -> torch.Tensor:
    """Noise variance beta(t) = 1 - cos((t / 1.008) pi / 2)^2."""
    return 1 - torch.cos((t / 1.008) * math.pi / 2) ** 2


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Signal power alpha_bar(t) = 1 - beta(t)."""
    return 1 - beta(t)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample (B,) or scalar tensor to broadcast against x (B, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


def add_noise(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps."""
    return _bcast(alpha_bar(t), x0).sqrt() * x0 + _bcast(beta(t), x0).sqrt() * eps


def eps_to_score(eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s(x, t) = -eps_hat / sqrt(beta(t))."""
    return -eps / _bcast(beta(t), eps).sqrt()


def score_to_eps(score: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps_hat = -sqrt(beta(t)) s: how a score machine drives the DDIM sampler."""
    return -score * _bcast(beta(t), score).sqrt()


def timesteps(nsteps: int) -> torch.Tensor:
    """The DDIM time grid, float64: t_j = (N - j) / N for j = 0..N, from t_0 = 1 down to t_N = 0.
    Step j evaluates the model at t_j and moves to t_{j+1} (like k-diffusion's sigmas, ending at 0)."""
    if isinstance(nsteps, bool) or not isinstance(nsteps, int) or nsteps < 1:
        raise ValueError(f"nsteps must be a positive int, got {nsteps!r}")
    return torch.arange(nsteps, -1, -1, dtype=torch.float64) / nsteps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One deterministic DDIM update from t to t_next given the noise prediction eps."""
    tt = torch.tensor([t, t_next], dtype=torch.float64)
    ab, ab_next = alpha_bar(tt).tolist()
    b, b_next = beta(tt).tolist()
    ratio = math.sqrt(ab_next / ab)
    return ratio * x + (math.sqrt(b_next) - ratio * math.sqrt(b)) * eps


def ddim_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    times,
    on_step: Optional[Callable[[int, float, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Deterministic DDIM from x at times[0] (pure noise at t = 1) to times[-1]; returns the last x.

    `times` is a decreasing grid such as timesteps(N) (an int N is short for it). eps_fn gets the
    times as float64 (B,) tensors, exactly the grid's values (a network casts them to its dtype;
    an ELS machine picks its scale entry from them), and its output is cast to x's dtype.
    `on_step(j, t_j, x)` is called at every evaluation point before its update, which is where
    the pipeline measures the exterior derivative.
    """
    times = timesteps(times) if isinstance(times, int) else torch.as_tensor(times, dtype=torch.float64).cpu()
    if times.dim() != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must be a decreasing 1-D grid of at least 2 points, e.g. timesteps(20)")
    grid = times.tolist()
    for j, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if on_step is not None:
            on_step(j, t, x)
        tb = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            eps = eps_fn(tb, x)
        x = ddim_step(x, eps.to(x.dtype), t, t_next)
    return x


def initial_noise(seed: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The initial noise x_T for one realization: reproducible from its seed alone."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
