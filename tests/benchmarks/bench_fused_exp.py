"""The engine's inner loop, eager vs one fused compiled kernel (where the next factor is).

A profile of one els-borders score at k = 3 on mnist5k (1 thread) spends 49 % in bmm (the logits
q @ keys with inner size D + 3 = 12, and the weighted sum with V = 2 values), 35 % in exp and 9 % in
the clamp before it: the work is memory traffic over the (queries x candidates) logit block, not
arithmetic. This times that loop as the engine runs it (bmm, clamp, exp, bmm, per cache-sized chunk)
against the same arithmetic written as one expression and compiled with torch.compile (inductor),
which keeps each logit in registers from product to weighted sum.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_fused_exp.py

Measured 2026-11-29 (2-core VM with a training run on the other core; R = 900 queries, D = 12,
M = 200,000 candidates): eager 0.60 s, fused 0.32 s (1.9x), relative difference 8e-7; the first
compiled call took 27 s (code generation and a C++ build; cached on disk afterwards). Not adopted
yet: a compiled kernel per (shape, k) costs that build time on every fresh machine and in CI, and
needs a C++ compiler at run time; worth it for calibration and full MNIST once shapes are fixed.

The engine's shapes vary per border group and patch size, so a kernel it could use must be built
with dynamic shapes, and the inner size D + 3 grows with k. Measured 2026-11-29 (idle cores but
two 1-thread calibrations running; 1 thread, R = 900, M = 1,000,000, 8,192 candidates per call):

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_fused_exp.py --dynamic --dims 12 28 52 --m 1000000

    | D (k)  | build s | eager s | fused s | speed-up | relative difference |
    | 12 (3) | 13.6    | 3.38    | 2.62    | 1.29     | 1.6e-6              |
    | 28 (5) | 3.9     | 4.58    | 3.90    | 1.18     | 6.9e-7              |
    | 52 (7) | 7.2     | 4.72    | 7.23    | 0.65     | 9.9e-7              |

So with the shapes the engine needs, the fused kernel gains 1.2-1.3x at k <= 5 and loses at k = 7
(inductor's loop is no match for BLAS once the product has some depth): not the 2x asked
for, and not adopted.
"""

import argparse
import time

import torch

R, CHUNK = 900, 1165  # queries of the interior group at k = 3; CHUNK: the engine's 2**20-element logit block / R


def eager(q, keys, vals, shift):
    """The engine's order of operations: one product, clamp, exp, one product per chunk (R x 2, float64)."""
    out = torch.zeros(R, 2, dtype=torch.float64)
    for m in range(0, keys.shape[1], CHUNK):
        logits = q @ keys[:, m : m + CHUNK] - shift[:, None]
        w = logits.clamp_(min=-80).exp_()
        out += (w @ vals[:, m : m + CHUNK].T).double()
    return out


def fused_body(q, k, v, shift):
    logits = (q[:, :, None] * k[None]).sum(1) - shift[:, None]  # (R, m), never stored
    w = torch.exp(logits.clamp(min=-80))
    return (w[:, None, :] * v[None]).sum(-1)  # (R, 2)


def compare(D: int, M: int, dynamic: bool):
    """Build, then time eager and fused (best of two each) on one random problem of inner size D."""
    torch.manual_seed(0)
    step = 8192
    m_used = M - M % step
    q, keys, vals = torch.randn(R, D) * 0.3, torch.randn(D, m_used) * 0.3, torch.randn(2, m_used)
    shift = (q @ keys).amax(1)
    compiled = torch.compile(fused_body, dynamic=dynamic)

    def fused(q, keys, vals, shift):
        out = torch.zeros(R, 2, dtype=torch.float64)
        for m in range(0, m_used, step):
            out += compiled(q, keys[:, m : m + step], vals[:, m : m + step], shift).double()
        return out

    t0 = time.perf_counter()
    fused(q, keys, vals, shift)
    print(f"D = {D}: first compiled call (build): {time.perf_counter() - t0:.1f} s")
    times = {}
    for f in (eager, fused, eager, fused):
        t0 = time.perf_counter()
        out = f(q, keys, vals, shift)
        times[f.__name__] = min(times.get(f.__name__, float("inf")), time.perf_counter() - t0)
        times[f.__name__ + "_out"] = out
    rel = (times["eager_out"] - times["fused_out"]).abs().max() / times["eager_out"].abs().max()
    print(f"eager {times['eager']:.2f} s, fused {times['fused']:.2f} s, speed-up {times['eager'] / times['fused']:.2f}, "
          f"relative difference {rel:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[12], help="inner sizes D + 3 (k = 3: 12, 5: 28, 7: 52)")
    p.add_argument("--m", type=int, default=200_000, help="candidates")
    p.add_argument("--dynamic", action="store_true", help="build for dynamic shapes, as the engine would need")
    args = p.parse_args()
    for D in args.dims:
        compare(D, args.m, args.dynamic)


if __name__ == "__main__":
    main()
