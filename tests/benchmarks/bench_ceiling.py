"""One core's ceiling for the ELS engine's work: FMA throughput (float32 sgemm) and exp throughput.

The engine's score is a product (logits), an exp per logit and a short weighted sum; its floor
time on one core is flops / (sgemm FLOP/s) + exps / (exp/s). bench_machines.py divides that floor
by the measured time to report "% of the one-core ceiling", so the percentage is recomputed on
any machine. Both rates are measured with one thread on cache-resident data (the best case), in
process CPU time.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_ceiling.py
"""

import time

import torch


def _best_rate(f, work: float, seconds: float = 1.0) -> float:
    """work / the best process CPU time of f() over about `seconds` (CPU time: a busy neighbour
    core's preemptions do not count)."""
    f()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.process_time()
        f()
        dt = time.process_time() - t0
        best, spent = min(best, dt), spent + dt
    return work / best


def ceiling(seconds: float = 1.0) -> dict:
    """{'flops': float32 FMA FLOP/s of a 1024^3 sgemm, 'exps': float32 exp/s of torch.exp on a
    256 KiB array}, with one thread (the caller's thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 1024
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        flops = _best_rate(lambda: torch.mm(a, b, out=c), 2 * n**3, seconds)
        x = torch.rand(2**16) * -80
        y = torch.empty_like(x)
        reps = 64
        exps = _best_rate(lambda: [torch.exp(x, out=y) for _ in range(reps)], reps * x.numel(), seconds)
    finally:
        torch.set_num_threads(threads)
    return {"flops": flops, "exps": exps}


if __name__ == "__main__":
    c = ceiling()
    print(f"one core: {c['flops'] / 1e9:.1f} GFLOP/s float32 sgemm, {c['exps'] / 1e9:.2f} G exp/s")
