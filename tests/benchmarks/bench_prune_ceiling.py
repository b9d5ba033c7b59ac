"""How much could skipping negligible candidates save? An oracle ceiling.

For one noised mnist5k digit and the interior candidate windows of 1,000 training images (distinct
windows only, as the engine merges them), this computes every exact logit and counts the candidates
a perfect pruner could skip: those whose weights together stay below e^-18 (~1.5e-8) of the best
one's. Any safe bound (triangle inequality on clusters, norms, ...) skips fewer than the oracle, so
the kept fraction below is a floor on the work left.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_prune_ceiling.py

Measured 2026-11-29 (kept fraction of candidate windows, every 7th query pixel):

    | k | t=0.1 | t=0.3 | t=0.5 | t=0.7 | t=0.9 |
    | 3 | 0.227 | 0.663 | 0.999 | 1.000 | 1.000 |
    | 5 | 0.121 | 0.353 | 0.851 | 1.000 | 1.000 |
    | 7 | 0.051 | 0.173 | 0.593 | 1.000 | 1.000 |

So above t ~ 0.5 nothing can be skipped, and over a 20-step schedule (half its steps at t > 0.5,
small k at small t) even the oracle saves about a quarter of the exps: not the 2x the issue asks
for, and a real bound saves less. Not built; the kernel-level measurement is in bench_fused_exp.py.
"""

import math

import torch

from edtool.data import load_dataset
from edtool.diffusion import add_noise, alpha_bar, beta


def main():
    data = load_dataset("mnist5k")[0]
    imgs = data[:1000]
    torch.manual_seed(0)
    for k in (3, 5, 7):
        P = torch.nn.functional.unfold(imgs, k).transpose(1, 2).reshape(-1, k * k)  # interior windows
        P = torch.unique(P, dim=0)
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            x = add_noise(data[4000:4001], torch.tensor([t]), torch.randn(1, 1, 32, 32))
            q = torch.nn.functional.unfold(x, k).transpose(1, 2).reshape(-1, k * k)[::7]
            a, b2 = alpha_bar(torch.tensor(t)).sqrt(), beta(torch.tensor(t))
            d = torch.cdist(q, a * P) ** 2 / (2 * b2)  # minus the log weight
            keep = d <= d.amin(1, keepdim=True) + math.log(len(P)) + 18  # skipped mass <= e^-18 of the best
            print(f"k={k} t={t} distinct windows={len(P)} kept fraction {keep.float().mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
