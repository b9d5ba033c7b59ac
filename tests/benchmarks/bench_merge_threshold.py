"""When does merging identical candidate windows pay? Merged vs every window gathered, per k.

For one noised digit (t = 0.5) and els-borders over 1,000 mnist5k images, times the first score
call (for the merged engine it includes the one-off merge), a second score and a Jacobian, with the
key cache on (merged) and off (every window gathered at every call, the engine before merging).
edtool.els.merging.MERGE_MAX_ENTRIES (81: k <= 9 for grey images) is set from this table.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_merge_threshold.py 7 9 11

Measured 2026-11-29, 1 thread, two calibrations running on the machine's 2 cores (seconds):

    | k | gathered: first | then | Jacobian | merged: first (with merge) | then | Jacobian |
    | 7 | 3.07 | 3.22 | 4.91 | 4.84 | 2.17 | 4.40 |
    | 9 | 2.30 | 2.70 | 5.15 | 6.00 | 1.90 | 4.47 |
    | 11 | 2.47 | 2.60 | 5.32 | 7.55 | 2.34 | 5.54 |

At k = 11 the merged score is 10 % faster and its Jacobian no faster, after a merge that costs
three scores: it never pays. At k = 9 it pays after ~5 calls (a calibration makes 20 per size).
"""

import sys
import time

import torch

from edtool.data import load_dataset
from edtool.diffusion import add_noise
import edtool.els.machine as machines
from edtool.els.factory import make_machine


def main(ks):
    machines.MERGE_MAX_ENTRIES = 10**9  # LocalMachine merges at every k, also where it would not: that is timed
    imgs = load_dataset("mnist5k")[0][:1000]
    torch.manual_seed(0)
    t = torch.tensor([0.5])
    x = add_noise(imgs[:1], t, torch.randn(1, 1, 32, 32))
    for k in ks:
        row = [f"k={k}"]
        for cache in (0, 4 * 2**30):
            m = make_machine("els-borders", imgs, None, patch_size=k, cache_bytes=cache)
            t0 = time.perf_counter()
            m.score(t, x)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.score(t, x)
            second = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.jacobian(t, x)
            jac = time.perf_counter() - t0
            row.append(f"{'merged' if cache else 'gathered'}: first {first:.2f} then {second:.2f} jacobian {jac:.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [7, 9, 11])
