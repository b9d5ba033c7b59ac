"""Where the exterior derivative is measured: the point sources of `edtool compute --points`.

`trajectory` (the default): every model at the points of its own (or a shared) DDIM path (SPEC 2).
`noised-data` (SPEC 13, the QCSBM protocol of Chao et al., ICML 2023): forward-noised held-out
images x_t = sqrt(alpha_bar(t)) x_0 + sqrt(beta(t)) eps at the uniformly spaced t = (N - j) / N,
j = 0..N-1 (the store's step order). A realization is one held-out image x_0 and one noise draw
eps, both fixed by the run seed: x_0 is entry r of a permutation of the held-out set seeded by
the run seed (distinct images, the same ones for any number of realizations or shards), and eps
is the realization's initial noise (`diffusion.initial_noise(seed + r)`, what a trajectory starts
from). So every t of a realization sees the same image and the same noise direction.

    images, labels = load_dataset("mnist", root="data", split="test")
    idx = held_out_indices(len(images), seed=0, realizations=20)
    points = noised_points(images[idx[:1]], initial_noise(0, (1, 1, 32, 32)), nsteps=10)
"""

from typing import List, Union

import torch

from edtool.diffusion import TimeGrid, add_noise, as_grid
from edtool.errors import EdtoolError



def default_held_out(dataset: str) -> tuple:
    """The held-out set (dataset, split) for a run on `dataset`: its test split; for mnist5k (5,000
    MNIST training digits) the MNIST t10k test set."""
    return ("mnist" if dataset == "mnist5k" else dataset), "test"


def held_out_indices(n_held_out: int, seed: int, realizations: int) -> List[int]:
    """Index of realization r's held-out image, r = 0..realizations-1: the first entries of a
    permutation of range(n_held_out) seeded by `seed` (distinct images, a prefix of the same order
    whatever the number of realizations)."""
    if realizations > n_held_out:
        raise EdtoolError(f"--realizations {realizations} asks for more held-out images than the "
                          f"{n_held_out} there are (one image per realization with --points noised-data)")
    perm = torch.randperm(n_held_out, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:realizations].tolist()


def noised_points(x0: torch.Tensor, eps: torch.Tensor, nsteps: Union[TimeGrid, int]) -> List[torch.Tensor]:
    """x_t = sqrt(alpha_bar(t)) x_0 + sqrt(beta(t)) eps at each step time of the run's grid (an int N is
    short for TimeGrid(N)): one (B, C, H, W) tensor per step, in the order the store keeps steps (j = 0 is t = 1)."""
    if x0.shape != eps.shape:
        raise ValueError(f"noised_points: x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} differ")
    return [add_noise(x0, torch.full((x0.shape[0],), t, dtype=torch.float64), eps)
            for t in as_grid(nsteps).step_times.tolist()]
