"""ELS cost per step on mnist5k vs full MNIST (60k): one els-borders score and one closed-form
Jacobian + ED at each patch size k (default 5), t = 0.5, one image (where windows are merged,
k <= 9, the merge plan is built before timing; a study builds it once per k).

    python tests/benchmarks/bench_els_fullmnist.py --data-root ../shared/data/mnist [--threads 2] [--k 5,11,15]

Measured 2026-11-29 (2-core VM, a training run on the other core): --threads 1 --k 15,11,3: mnist5k
k = 15 score 7.6 s, Jacobian + ED 16.2 s; k = 11 8.2 s, 16.1 s; k = 3 4.3 s, 5.5 s; full MNIST k = 15
86.2 s, 194.6 s (11.3x, 12.0x). Earlier, --threads 2 --k 5: 2.5 s, 3.6 s vs 32.0 s, 45.9 s (12.8x).
"""

import argparse
import time

import torch

from edtool.data import load_dataset
from edtool.els.factory import make_machine
from edtool.els.merging import MERGE_MAX_ENTRIES


def time_step(images, labels, k: int, x, t) -> tuple:
    """Seconds for one els-borders score and one closed-form Jacobian + ED at patch size k."""
    m = make_machine("els-borders", images, labels, patch_size=k)
    with torch.no_grad():
        if images.shape[1] * k * k <= MERGE_MAX_ENTRIES:
            m.score(t, x)  # builds the merge plan
        t0 = time.perf_counter()
        m.score(t, x)
        score_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.analytic_ed(t, x)
        return score_s, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="torchvision-style root holding MNIST/raw/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", default="5", help="comma-separated patch sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5], dtype=torch.float64)
    for name, kw in [("mnist5k", {}), ("mnist", {"root": args.data_root})]:
        images, labels = load_dataset(name, **kw)
        for k in map(int, args.k.split(",")):
            score_s, jac_s = time_step(images, labels, k, x, t)
            print(f"{name}: {len(images)} images, els-borders k={k} t=0.5: score {score_s:.1f} s, "
                  f"closed-form Jacobian + ED {jac_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
