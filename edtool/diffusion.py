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
    """The N evaluation times t_i = i/N for i = N..1 (index j = N - i; j = 0 is t = 1)."""
    return torch.arange(nsteps, 0, -1, dtype=torch.float64) / nsteps


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
    nsteps: int,
    on_step: Optional[Callable[[int, float, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Run N deterministic DDIM steps from x (pure noise at t = 1) and return x at t = 0.

    `on_step(j, t, x)` is called at every evaluation point before its update, which is
    where the pipeline measures the exterior derivative.
    """
    if nsteps < 1:
        raise ValueError("nsteps must be >= 1")
    for j in range(nsteps):
        t, t_next = (nsteps - j) / nsteps, (nsteps - j - 1) / nsteps
        if on_step is not None:
            on_step(j, t, x)
        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            eps = eps_fn(tb, x)
        x = ddim_step(x, eps, t, t_next)
    return x


def initial_noise(seed: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The initial noise x_T for one realization: reproducible from its seed alone."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
