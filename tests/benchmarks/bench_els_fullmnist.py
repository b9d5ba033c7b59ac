"""ELS cost per step on mnist5k vs full MNIST (60k): one els-borders score and one closed-form
Jacobian + ED at k = 5, t = 0.5, one image (the merge plan is built before timing).

    python tests/benchmarks/bench_els_fullmnist.py --data-root ../shared/data/mnist [--threads 2]
"""

import argparse
import time

import torch

from edtool.data import load_dataset
from edtool.machines import make_machine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="torchvision-style root holding MNIST/raw/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5], dtype=torch.float64)
    for name, kw in [("mnist5k", {}), ("mnist", {"root": args.data_root})]:
        images, labels = load_dataset(name, **kw)
        m = make_machine("els-borders", images, labels, patch_size=args.k)
        with torch.no_grad():
            m.score(t, x)  # builds the merge plan
            t0 = time.perf_counter()
            m.score(t, x)
            score_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.analytic_ed(t, x)
            jac_s = time.perf_counter() - t0
        print(f"{name}: {len(images)} images, els-borders k={args.k} t=0.5: score {score_s:.1f} s, "
              f"closed-form Jacobian + ED {jac_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
