"""Peak memory of one ELS machine as it meets new patch sizes on full MNIST (run by hand).

One els-borders machine with the schedule --ks (entry j at t = (j + 1) / len), one score of one
image per entry, in order: each new k builds (or refuses) its merged key set while the previous
set is still cached. Prints, after each call, its time, the process's resident and peak memory
and the cached keys.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_merge_memory.py --data-root ../shared/data/mnist --ks 3,5,7

Measured 2026-11-29 on the 2-core VM (a sampling run on the other core), --ks 3,5,7 (the calls
run at k = 5, then k = 7, then k = 7: t = 1/3 takes entry 1), peak memory in GiB after the k = 5
and k = 7 calls, 3.0 GiB of keys cached at k = 5 (the k = 7 set exceeds the 4 GiB budget and is
refused after counting):

    | engine                                                            | k = 5 | k = 7 |
    | distinct windows copied, then keys built from them (cddcfdd)      | 9.0   | 20.0  |
    | + per-block results written into tensors allocated up front       | 9.1   | 9.1   |
    | + plans hold first-occurrence numbers, windows copied once (keys) | 4.6   | 6.4   |

Since the keys are built in the compiled kernel (merge_windows' hash table, 2026-12-02, training and
sampling on the other core; the schedule now runs k = 3, 5, 7 in order): peak 2.01 GiB after k = 3
(42.6 s), 5.42 GiB after k = 5 (74.0 s; 3.82 GiB of keys cached for k = 3 and 5), 5.66 GiB after k = 7
(refused after counting).

The 20 GiB came from glibc's heap: each hashing block left a small result between its large
freed temporaries, and the heap grew by tens of MB per block (476 blocks at k = 7). It does not
happen on every run (a run with a sampling thread attached stayed at 3.7 GiB); with
MALLOC_MMAP_THRESHOLD_=1048576 it never did.
"""

import argparse
import resource
import time

import torch

from edtool.data import load_dataset
from edtool.els.factory import make_machine


def resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="torchvision-style root holding MNIST/raw/")
    ap.add_argument("--ks", default="3,5,7", help="the machine's schedule, comma-separated")
    args = ap.parse_args()
    images = load_dataset("mnist", root=args.data_root, download=False)[0]
    print(f"data {tuple(images.shape)}: resident {resident_gib():.2f} GiB", flush=True)
    ks = [int(k) for k in args.ks.split(",")]
    m = make_machine("els-borders", images, scales=ks)
    x = images[:1] + torch.randn(images[:1].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for j in range(len(ks)):
            t = (j + 1) / len(ks)
            t0 = time.perf_counter()
            m.score(t, x)
            print(f"t = {t:.2f}, k = {m.patch_size_at(t)}: {time.perf_counter() - t0:.1f} s, resident "
                  f"{resident_gib():.2f} GiB, peak {peak_gib():.2f} GiB, cached keys {m._keys.nbytes() / 2**30:.2f} GiB, "
                  f"refused {len(m._keys.refused)} set(s)", flush=True)


if __name__ == "__main__":
    main()
