"""One core's ceiling for the ELS engine's work: FMA throughput (float32 sgemm) and exp throughput.

The engine's score is a product (logits), an exp per logit and a short weighted sum; its floor
time on one core is flops / (sgemm FLOP/s) + exps / (exp/s). bench_machines.py divides that floor
by the measured time to report "% of the one-core ceiling", so the percentage is recomputed on
any machine. Both rates are measured with one thread on cache-resident data (the best case), in
process CPU time. The exp rate is the faster of torch.exp and the fused kernel's own vectorized exp
(edtool/els/kernel.cpp's vexp, compiled here): on an AVX2 CPU torch.exp runs at a third of it, and a
ceiling below what the kernel itself does would read as more than 100 %.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_ceiling.py
"""

import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from edtool.els import kernel as els_kernels

# vexp of kernel.cpp over an array, `reps` times (the file is included: vexp lives in its anonymous namespace)
EXP_LOOP = '''
#include "%s"
extern "C" void exp_loop(const float* x, float* y, int64_t n, int reps) {
  for (int k = 0; k < reps; ++k)
    for (int64_t i = 0; i < n; i += VL) {
      vf v = vexp(load(x + i));
      std::memcpy(y + i, &v, sizeof v);
    }
}
'''


def kernel_exp_loop():
    """exp_loop(x, y, n, reps) compiled from the kernel's source with -march=native, or None without g++."""
    with tempfile.TemporaryDirectory() as tmp:  # a loaded library outlives its unlinked file
        src, so = Path(tmp) / "exp_loop.cpp", Path(tmp) / "exp_loop.so"
        src.write_text(EXP_LOOP % els_kernels.SOURCE)
        run = subprocess.run([els_kernels.CXX, "-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", str(src),
                              "-o", str(so)], capture_output=True)
        if run.returncode != 0:
            return None
        lib = ctypes.CDLL(str(so))
    lib.exp_loop.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib.exp_loop


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
    """{'flops': float32 FMA FLOP/s of a 1024^3 sgemm, 'exps': float32 exp/s on a 256 KiB array, the faster
    of torch.exp and the kernel's vexp, 'torch_exps' and 'kernel_exps' each}, with one thread (the caller's
    thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 1024
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        flops = _best_rate(lambda: torch.mm(a, b, out=c), 2 * n**3, seconds)
        x = torch.rand(2**16) * -80
        y = torch.empty_like(x)
        reps = 64
        torch_exps = _best_rate(lambda: [torch.exp(x, out=y) for _ in range(reps)], reps * x.numel(), seconds)
        loop = kernel_exp_loop()
        kernel_exps = 0.0 if loop is None else _best_rate(
            lambda: loop(x.data_ptr(), y.data_ptr(), x.numel(), reps), reps * x.numel(), seconds)
    finally:
        torch.set_num_threads(threads)
    return {"flops": flops, "exps": max(torch_exps, kernel_exps), "torch_exps": torch_exps, "kernel_exps": kernel_exps}


if __name__ == "__main__":
    c = ceiling()
    print(f"one core: {c['flops'] / 1e9:.1f} GFLOP/s float32 sgemm, {c['exps'] / 1e9:.2f} G exp/s "
          f"(torch.exp {c['torch_exps'] / 1e9:.2f}, the kernel's vexp {c['kernel_exps'] / 1e9:.2f})")
