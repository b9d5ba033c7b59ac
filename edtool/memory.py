"""How much memory a computation may use on a device, and what an out-of-memory error looks like.

    budget = memory_budget(x.device)   # bytes: EDTOOL_MAX_MEMORY, else a share of the device's memory

On CUDA the budget is half of what the device can still hand out (free memory plus what PyTorch's caching
allocator holds unused); on the CPU a quarter of the physical RAM (a fixed number per machine, so the
chunking, and with it every number, is the same when a run is resumed on the same machine).
`EDTOOL_MAX_MEMORY` (bytes, or a size like `8GiB`, `512MiB`) overrides both.
"""

import os
import re

import torch

from edtool.errors import EdtoolError

MEMORY_ENV = "EDTOOL_MAX_MEMORY"
CUDA_SHARE = 0.5  # of the device's free memory: the rest is for what the estimate does not count (fragmentation)
CPU_SHARE = 0.25  # of the physical RAM: other processes, the models and the run's own arrays share it
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}

# What CUDA libraries say when an allocation fails without the words "out of memory". cuDNN reports some
# failed workspace allocations and too-large batches as NOT_SUPPORTED: a smaller batch is the cure for both.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed",
                        "cudnn_status_alloc_failed", "cudnn_status_not_supported", "cudaerrormemoryallocation",
                        "cuda_error_out_of_memory", "cusolver_status_alloc_failed", "cufft_alloc_failed")


def parse_size(text: str, what: str = MEMORY_ENV) -> int:
    """Bytes from `12345`, `8GiB`, `512 MiB` or `2GB`; an EdtoolError naming `what` otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise EdtoolError(f"{what}={text!r} is not a memory size; give bytes or a size like 8GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def device_free_bytes(device: torch.device) -> int:
    """What the device can still hand out: CUDA's free memory plus what the caching allocator holds
    unused; on the CPU the physical RAM (a fixed number, see the module's note)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device) -> int:
    """Bytes a computation may hold at once on `device`: EDTOOL_MAX_MEMORY when set, else CUDA_SHARE of
    the free memory on CUDA, CPU_SHARE of the RAM on the CPU."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        return parse_size(override)
    device = torch.device(device)
    share = CUDA_SHARE if device.type == "cuda" else CPU_SHARE
    return int(device_free_bytes(device) * share)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an error is a failed allocation: Python's MemoryError, torch's OutOfMemoryError, or a CUDA
    library's allocation failure whose message does not say "out of memory" (cuBLAS, cuDNN)."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(t in text for t in _OUT_OF_MEMORY_TEXTS)
