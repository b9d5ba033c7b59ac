"""Benchmark: the ELS machines' torch path (what runs on CUDA), counted on a CPU: chunks, aten operations
(each one kernel launch on a GPU) and host syncs per closed-form Jacobian call, and the CIFAR-10 key memory.

The compiled CPU kernel is switched off (EDTOOL_ELS_KERNEL=torch), so the CPU runs the same torch operations a GPU
would. Operations are counted by a TorchDispatchMode: every aten call is one launch on a GPU, and every
`_local_scalar_dense` (a tensor read as a Python number: bool(), float(), .item()) one host sync, less those of
the CPU-only clamp bound (engine._above). Chunks are the streamed blocks of candidates: calls of
engine._weighted_sums (one per block).

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_els_torch_path.py --batches 1 4            # this tree
    OMP_NUM_THREADS=1 python tests/benchmarks/bench_els_torch_path.py --score --k 11 --n-images 1000
    OMP_NUM_THREADS=1 PYTHONPATH=/work/main python tests/benchmarks/bench_els_torch_path.py    # another tree

Another tree must have this package layout (edtool.els.engine, .factory, .windows). --chunk-size picks the block
size (default: what this tree chooses for a GPU with --free-gib free). --cifar prints the CIFAR-10 key memory and
which devices' key caches hold it.
"""

import argparse
import os
import time
from collections import Counter

os.environ["EDTOOL_ELS_KERNEL"] = "torch"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from edtool.diffusion import add_noise  # noqa: E402
from edtool.els import engine, windows  # noqa: E402
from edtool.els.factory import key_cache_bytes, make_machine  # noqa: E402


class Counts(TorchDispatchMode):
    """Counts aten operations by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def gpu_chunk_size(free_gib: float) -> int:
    """The block size this tree picks for a GPU with free_gib free."""
    return engine.chunk_size_for("cuda", int(free_gib * 2**30), 4)


def count_call(machine, t, x, what: str = "jacobian") -> tuple:
    """(seconds, chunks, aten operations, host syncs) of one closed-form Jacobian call, or score call with
    what="score" (keys already cached)."""
    call = getattr(machine, what)
    chunks, weighted_sums = [0], engine._weighted_sums

    def counted(w, values):
        chunks[0] += 1
        return weighted_sums(w, values)

    with torch.no_grad():
        call(t, x)  # builds the key cache outside the count
        engine._weighted_sums = counted
        start = time.perf_counter()
        with Counts() as counts:
            call(t, x)
        seconds = time.perf_counter() - start
        engine._weighted_sums = weighted_sums
    ops = counts.ops
    # CPU-only syncs: the bound that skips the subnormal clamp (engine._above, one aminmax each) never runs on a GPU
    return seconds, chunks[0], sum(ops.values()), ops["_local_scalar_dense"] - ops["aminmax"]


def cifar_keys(k: int = 3, n_images: int = 50_000):
    """Bytes of every candidate key of els-borders on CIFAR-10 shapes (3 x 32 x 32), all windows distinct
    (colour windows rarely repeat: the merged set is about this size)."""
    cells = windows.candidate_cells("els-borders", 32, 32, k, False)
    groups = windows.stack_cells(cells, 3, 32, 32, k, "cpu")
    return sum(idx.shape[0] * (idx.shape[2] + 3) * idx.shape[1] for _, _, idx in groups) * n_images * 4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--free-gib", type=float, default=70.0, help="the GPU's free memory the chunk size is chosen for")
    p.add_argument("--cifar", action="store_true")
    p.add_argument("--score", action="store_true", help="count score calls instead of Jacobian calls")
    args = p.parse_args()

    from bench_machines import load_mnist5k

    images = load_mnist5k()[: args.n_images]
    chunk = args.chunk_size or gpu_chunk_size(args.free_gib)
    kwargs = {} if chunk is None else {"chunk_size": chunk}
    machine = make_machine("els-borders", images, patch_size=args.k, **kwargs)
    print(f"edtool at {os.path.dirname(engine.__file__)}; chunk size {machine.chunk_size} elements; "
          f"{len(images)} images, k = {args.k}, t = {args.t}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    what = "score" if args.score else "jacobian"
    print(f"| B | {what} s | chunks | aten ops (GPU launches) | host syncs |")
    print("|---|---|---|---|---|")
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        x0 = images[torch.randint(len(images), (B,), generator=g)]
        x = add_noise(x0, torch.tensor(args.t), torch.randn(x0.shape, generator=g))
        seconds, chunks, ops, syncs = count_call(machine, args.t, x, what)
        print(f"| {B} | {seconds:.2f} | {chunks} | {ops} | {syncs} |", flush=True)
    if args.cifar:
        need = cifar_keys(args.k)
        print(f"\nCIFAR-10 (50,000 x 3 x 32 x 32) els-borders k = {args.k}: every key {need / 1e9:.2f} GB")
        for name, free in (("this CPU", None), ("H100, 79 GiB free", 79), ("24 GiB GPU, 23 GiB free", 23)):
            if free is None:
                cache = key_cache_bytes(torch.device("cpu"))
            else:
                torch.cuda.mem_get_info = lambda device, f=free: (int(f * 2**30), 0)
                torch.cuda.memory_reserved = torch.cuda.memory_allocated = lambda device: 0
                cache = key_cache_bytes(torch.device("cuda"))
            print(f"  {name}: key cache {cache / 1e9:.1f} GB -> {'cached' if need <= cache else 'gathered every call'}")


if __name__ == "__main__":
    main()
