"""Building an ELS-family machine: the machine a name means, its checked settings, the memory it may keep.

`make_machine` checks the training images, labels, patch sizes (one, or a schedule) and memory
bounds, and returns an `IdealMachine` (`is`) or a `LocalMachine` (`ls`, `els-circular`,
`els-borders`); `build_machine` does the same from a run's settings and says what the run records
about it; `resolve_machine_name` turns `els` into the variant that matches a network's padding.

    m = make_machine("els-borders", images, labels, patch_size=5)
    m, info = build_machine("els-circular", images, labels, scales=[3, 5, 7])
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

from edtool.config import ALIASES, MACHINES, PADDINGS, PATCH_SIZE, check_patch_size
from edtool.els.engine import chunk_size_for
from edtool.els.ideal import IdealMachine
from edtool.els.machine import LocalMachine, Machine
from edtool.els.schedule import check_fits, check_schedule
from edtool.errors import EdtoolError
from edtool.memory import device_free_bytes

DEFAULT_CACHE_BYTES = 4 * 2**30  # candidate keys kept between calls on a CPU, at least (mnist5k at k = 11: 2.5 GB)
CPU_CACHE_SHARE = 1 / 8  # of the RAM, where that is more
CUDA_CACHE_SHARE = 1 / 4  # of a GPU's free memory: CIFAR-10's merged k = 3 keys (~5.4 GB) fit on a 24 GB card


def key_cache_bytes(device: torch.device) -> int:
    """The candidate keys a machine keeps between calls on `device`: on a CPU DEFAULT_CACHE_BYTES or
    CPU_CACHE_SHARE of the RAM if more, on CUDA CUDA_CACHE_SHARE of the free memory."""
    if device.type == "cuda":
        return int(device_free_bytes(device) * CUDA_CACHE_SHARE)
    return max(DEFAULT_CACHE_BYTES, int(device_free_bytes(device) * CPU_CACHE_SHARE))


def resolve_machine_name(name: str, padding: Optional[str] = "zeros", where=None) -> str:
    """The machine `name` means next to a network with this padding: `els` follows it (els-circular for a
    circular-padded network, els-borders for a zero-padded one); other names do not depend on it. An
    unknown name, or a padding no machine models, is an EdtoolError (naming the network `where`)."""
    if name not in MACHINES + tuple(ALIASES):
        raise EdtoolError(f"unknown machine {name!r}; choose one of {', '.join(MACHINES + ('els',))}")
    if name != "els":
        return name
    padding = padding or "zeros"
    if padding not in PADDINGS:
        raise EdtoolError(f"{name} follows the network's padding, and {where or 'the network'} has padding "
                          f"{padding!r}, which no ELS machine models ({', '.join(PADDINGS)}): name the machine "
                          "instead, els-borders or els-circular")
    return "els-circular" if padding == "circular" else "els-borders"



def make_machine(
    name: str,
    images: Tensor,
    labels: Optional[Tensor] = None,
    patch_size: Optional[int] = None,
    scales: Optional[Sequence[int]] = None,
    chunk_size: Optional[int] = None,
    paper_circular: bool = False,
    cache_bytes: Optional[int] = None,
) -> Machine:
    """An ELS-family machine over training images (N, C, H, W) in [-1, 1] (labels (N,) for
    class-conditional use). Give exactly one of patch_size (odd) or scales (odd sizes, entry j
    for t = (j + 1) / len(scales)); `is` takes neither. `els` means `els-borders`; see
    `resolve_machine_name` for circular-padded networks. paper_circular: `els-circular` with
    only fully-inside training windows as candidates (the paper's variant). chunk_size bounds
    the elements of each streamed block (default `chunk_size_for` the images' device: cache-sized
    on a CPU, large on a GPU); cache_bytes (default `key_cache_bytes` of that device) the candidate
    windows kept between calls,
    identical ones merged up to k = 9 for grey images (a set beyond the budget, or of larger
    windows, is gathered afresh at every call, unmerged: same numbers). Memory: the cache
    (<= cache_bytes) + a few blocks of chunk_size elements; while a key set is being merged, also
    about seven int64 per window of its largest cell (full MNIST, k = 3: ~3 GB) and 16 bytes per
    distinct window (counting stops at the budget; the windows are copied once, into the keys).
    Measured on full MNIST, one image, k = 5 then k = 7 (tests/benchmarks/bench_merge_memory.py):
    peak 4.6 then 6.4 GiB of memory, 3.0 GiB of it cached keys."""
    name = ALIASES.get(name, name)
    if name not in MACHINES:
        raise ValueError(f"unknown machine {name!r}; choose one of {', '.join(MACHINES + ('els',))}")
    labels = _checked_labels(images, labels)
    if paper_circular and name != "els-circular":
        raise ValueError("paper_circular applies only to the els-circular machine")
    if chunk_size is None:
        chunk_size = chunk_size_for(images.device.type, device_free_bytes(images.device), images.element_size())
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sizes = _patch_sizes(name, images, patch_size, scales, paper_circular)
    if cache_bytes is None:
        cache_bytes = key_cache_bytes(images.device)
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
    if name == "is":
        return IdealMachine(images, labels, chunk_size, cache_bytes)
    return LocalMachine(name, images, labels, sizes, chunk_size, cache_bytes, paper_circular)


def _checked_labels(images: Tensor, labels) -> Optional[Tensor]:
    """The labels as (N,) int64 for training images (N, C, H, W), or None; a ValueError for either malformed."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
        raise ValueError("images must be a non-empty float tensor of shape (N, C, H, W)")
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),) or labels.is_floating_point():
        raise ValueError(f"labels must be an int tensor of shape ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()


def _patch_sizes(name: str, images: Tensor, patch_size, scales, paper_circular: bool) -> Optional[list]:
    """The machine's patch sizes, one per schedule entry (None for `is`), each odd and fitting the images;
    a ValueError for a missing, doubled or malformed choice."""
    if name == "is":
        if patch_size is not None or scales is not None:
            raise ValueError("the 'is' machine uses the whole image: give neither patch_size nor scales")
        return None
    if (patch_size is None) == (scales is None):
        raise ValueError(f"machine {name!r} needs exactly one of patch_size=k or scales=[k0, k1, ...]")
    if patch_size is not None:
        sizes = [check_patch_size(patch_size, "patch_size")]
    else:
        sizes = [check_patch_size(k, f"scales[{j}]") for j, k in enumerate(scales)]
        if not sizes:
            raise ValueError("scales must list at least one patch size")
    check_fits(sizes, images.shape, "patch size", whole=True)
    if name == "els-circular" and paper_circular:
        H, W = images.shape[-2:]
        if max(sizes) > min(H, W):
            raise ValueError(f"the paper's circular machine needs patch sizes <= image size {H}x{W}, got {max(sizes)}")
    return sizes


def build_machine(kind: str, images, labels=None, scales: Optional[Sequence[int]] = None, patch_size: int = PATCH_SIZE,
                  source: Optional[str] = None):
    """The machine `kind` with its schedule: `is` takes none; the others `scales` when given, else
    the fixed `patch_size`. Returns (machine, info), info being what a run records about it."""
    if kind == "is":
        return make_machine("is", images, labels), {}
    if scales is not None:
        scales = check_schedule(scales, f"scales for {kind}")
        return make_machine(kind, images, labels, scales=scales), {"scales": scales, "scales_file": source}
    check_patch_size(patch_size, "patch_size")
    return make_machine(kind, images, labels, patch_size=patch_size), {"patch_size": patch_size}
