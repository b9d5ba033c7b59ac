"""The paper's diffusion conventions (SPEC 2): cosine schedule, score <-> noise, deterministic DDIM.

Time t runs in [0, 1]; beta(t) is the noise variance and alpha_bar(t) = 1 - beta(t) the
signal power, so x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps.

Two things every stage must agree on live here and nowhere else: the time grid (`TimeGrid`,
built once per run and passed down, as k-diffusion passes `sigmas`) and what a realization's
seed fixes (`realization_seeds`, `initial_noise(s)`, `drawn_labels`, `seed_labels`).

    grid = TimeGrid(20)
    x_T = initial_noises(realization_seeds(0, 4), (1, 32, 32))
    x_0 = ddim_sample(eps_fn, x_T, grid)
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from edtool.errors import EdtoolError

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


@dataclass(frozen=True)
class TimeGrid:
    """The DDIM time grid of N steps, float64, in its two index orders (the only place they meet):

    - step j = 0..N-1, the sampler's and the store's order: the model is evaluated at
      t_j = (N - j) / N and moves to t_{j+1}. `times` holds the N + 1 points from 1 down to 0
      (like k-diffusion's sigmas, ending at 0), `step_times` the N evaluation points.
    - entry i = 0..N-1, a scale schedule's and a calibration's order: entry i is for
      t = (i + 1) / N, ascending (`entry_times`); entry i is step N - 1 - i (`as_entries`).
    """

    nsteps: int

    def __post_init__(self):
        n = self.nsteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"nsteps must be a positive int, got {n!r}")

    @property
    def times(self) -> torch.Tensor:
        """(N + 1,) t_j = (N - j) / N for j = 0..N: 1 down to 0 (a fresh tensor on every call)."""
        return torch.arange(self.nsteps, -1, -1, dtype=torch.float64) / self.nsteps

    @property
    def step_times(self) -> torch.Tensor:
        """(N,) the times the model is evaluated at, step j at t_j: what a run store records as `time`."""
        return self.times[:-1]

    @property
    def entry_times(self) -> tuple:
        """(1/N, 2/N, ..., 1): the time of each schedule entry, the same float64 values as step_times."""
        return tuple(self.as_entries(self.step_times).tolist())

    def as_entries(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in step order (first axis, t decreasing) put in entry order (t ascending)."""
        if rows.shape[0] != self.nsteps:
            raise ValueError(f"{rows.shape[0]} rows for a grid of {self.nsteps} steps")
        return rows.flip(0)


def as_grid(grid: Union[TimeGrid, int]) -> TimeGrid:
    """A TimeGrid as given, or an int N as short for TimeGrid(N) (for scripts and tests)."""
    return grid if isinstance(grid, TimeGrid) else TimeGrid(grid)


def timesteps(nsteps: int) -> torch.Tensor:
    """TimeGrid(nsteps).times: t_j = (N - j) / N for j = 0..N, float64, from 1 down to 0."""
    return TimeGrid(nsteps).times


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
    on_step: Optional[Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Deterministic DDIM from x at times[0] (pure noise at t = 1) to times[-1]; returns the last x.

    `times` is a TimeGrid (an int N is short for TimeGrid(N)) or any decreasing 1-D grid. eps_fn gets the
    times as float64 (B,) tensors, exactly the grid's values (a network casts them to its dtype;
    an ELS machine picks its scale entry from them), and its output is cast to x's dtype.
    `on_step(j, t_j, x)` is called at every evaluation point before its update, which is where
    the pipeline measures the exterior derivative. It returns None, or the noise prediction eps_hat at
    (t_j, x) when it computed it on the way (an ELS machine's closed-form Jacobian comes with its score):
    the update then takes that one instead of calling eps_fn.
    """
    if isinstance(times, (TimeGrid, int)):
        times = as_grid(times).times
    times = torch.as_tensor(times, dtype=torch.float64).cpu()
    if times.dim() != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must be a decreasing 1-D grid of at least 2 points, e.g. timesteps(20)")
    grid = times.tolist()
    for j, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        eps = None if on_step is None else on_step(j, t, x)
        if eps is None:
            tb = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
            with torch.no_grad():
                eps = eps_fn(tb, x)
        x = ddim_step(x, eps.to(x.dtype), t, t_next)
    return x


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, t: float, t_next: float, z: torch.Tensor,
              clip_x0: Optional[float] = None) -> torch.Tensor:
    """One ancestral (DDPM) update: a draw from q(x_t_next | x_t, x0_hat), x0_hat from eps, optionally clipped.

    The posterior of the forward process between t and t_next < t: with a = alpha_bar(t) / alpha_bar(t_next),
    mean = sqrt(ab_next) (1 - a) / (1 - ab) x0_hat + sqrt(a) (1 - ab_next) / (1 - ab) x, variance
    (1 - a) (1 - ab_next) / (1 - ab); at t_next = 0 the variance is 0 and the step lands on x0_hat.
    """
    tt = torch.tensor([t, t_next], dtype=torch.float64)
    ab, ab_next = alpha_bar(tt).tolist()
    a = ab / ab_next
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = (math.sqrt(ab_next) * (1 - a) / (1 - ab)) * x0 + (math.sqrt(a) * (1 - ab_next) / (1 - ab)) * x
    return mean + math.sqrt((1 - a) * (1 - ab_next) / (1 - ab)) * z


def ddpm_sample(eps_fn: EpsFn, x: torch.Tensor, times, seed: int = 0, clip_x0: Optional[float] = None) -> torch.Tensor:
    """Stochastic ancestral sampling (Ho et al. 2020) over a TimeGrid (or int N), fresh noise from `seed` each step.

    Not what the pipeline measures (that is deterministic DDIM, SPEC 2); it is how a DDPM's sample quality
    is usually judged, since the injected noise corrects the score's errors instead of compounding them.
    `clip_x0=1` clips the denoised estimate to the data range [-1, 1] as DDPM implementations do.
    """
    grid = as_grid(times).times.tolist()
    g = torch.Generator().manual_seed(int(seed))
    for t, t_next in zip(grid[:-1], grid[1:]):
        tb = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            eps = eps_fn(tb, x).to(x.dtype)
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        x = ddpm_step(x, eps, t, t_next, z, clip_x0)
    return x


# ------------------------------------------------------------------ what a realization's seed fixes


def realization_seeds(seed: int, n: int) -> List[int]:
    """The seeds of n realizations from a run seed: realization r has seed + r."""
    return [int(seed) + r for r in range(int(n))]


def initial_noise(seed: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The initial noise x_T for one realization: reproducible from its seed alone."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def initial_noises(seeds: Sequence[int], shape, device="cpu") -> torch.Tensor:
    """x_T of each seed, stacked: (len(seeds), *shape), float32, each initial_noise(s, (1, *shape))."""
    return torch.cat([initial_noise(s, (1, *shape), device=device) for s in seeds])


def drawn_labels(seeds: Sequence[int], n_classes: int) -> torch.Tensor:
    """The class label of each seed for a conditional network when none is given: one draw from
    0..n_classes-1 with a generator seeded by the seed (a generator of its own, not x_T's). (len(seeds),) int64."""
    return torch.tensor([int(torch.randint(0, n_classes, (1,), generator=torch.Generator().manual_seed(int(s))))
                         for s in seeds], dtype=torch.int64)


def seed_labels(seeds: Sequence[int], labels: Optional[torch.Tensor], label: Optional[int], conditional: bool,
                n_classes: Optional[int] = None) -> Optional[torch.Tensor]:
    """Class label per seed for a conditional network (the given one, else one drawn from the seed,
    drawn_labels); None for an unconditional one. compute, calibrate and sample all label this way. The classes are 0..n_classes-1
    (from the network's manifest), else those of the training labels."""
    if not conditional:
        if label is not None:  # never a label recorded beside samples that did not use it
            raise EdtoolError(f"--label {label}: the network is unconditional (it takes no class label); drop "
                              "--label, or give a class-conditional checkpoint")
        return None
    if n_classes is None:
        if labels is None:
            raise EdtoolError("a conditional network needs the training labels or its number of classes")
        n_classes = int(labels.max()) + 1
    if label is not None:
        if not 0 <= int(label) < n_classes:
            raise EdtoolError(f"label {label} is not a class of the data (0..{n_classes - 1})")
        return torch.full((len(seeds),), int(label), dtype=torch.int64)
    return drawn_labels(seeds, n_classes)
