"""Fused CPU kernels for the ELS engine, compiled from kernel.cpp on first use.

The score's inner loop (logits, clamp, exp, weighted sum) is memory traffic over a block of
logits when run as separate torch ops; fused, each logit stays in a register from product to sum.
The Jacobian's moments (the same weights against the outer product [1, c] x [1, P]) are fused too,
their weights kept in L1 between the exp and the sums. Building the candidate keys (finding the
distinct windows, copying them into key columns) is here too: one pass instead of many torch ops.
kernel.cpp is plain C++ (no torch headers) compiled with the system's g++ into a per-machine
cache (~/.cache/edtool/kernels, or $EDTOOL_KERNEL_DIR) the first time it is needed (a second or
two), and called through ctypes, which releases the GIL. The sha256 of each build is written beside
it (`els_<tag>.so.sha256`) and checked before the library is loaded: a truncated or overwritten file is
built again, never mapped (mapping one can kill the process). When it cannot be built (no compiler,
say) `kernels()` returns None after one warning and the engine runs its pure-torch path, which
gives the same numbers. EDTOOL_ELS_KERNEL=torch forces the torch path.
"""

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Iterable, Optional

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch import Tensor

SOURCE = pathlib.Path(__file__).with_name("kernel.cpp")
ROWS = 6  # query rows per register tile (RB in the C++ source)
ENV = "EDTOOL_ELS_KERNEL"  # "torch": never use the compiled kernels
CXX = os.environ.get("CXX", "g++")


def enabled() -> bool:
    """Whether the compiled kernels may be used at all (EDTOOL_ELS_KERNEL is not 'torch')."""
    return os.environ.get(ENV, "").strip().lower() not in ("torch", "0", "off")


def kernels():
    """The compiled kernel library, or None (torch path) when disabled or when it cannot be built."""
    return _load() if enabled() else None


def _cpu_tag() -> str:
    """A short hash of the source, this CPU's model and flags and the compiler: a binary built with
    -march=native is only reused on the same kind of CPU (a shared home keeps one build per kind)."""
    info = platform.machine() + CXX
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(l for l in f if l.startswith(("model name", "flags")))[:4000]
    except OSError:
        pass
    return hashlib.sha256(SOURCE.read_bytes() + info.encode()).hexdigest()[:12]


def _build(target: pathlib.Path) -> None:
    """Compile SOURCE into the shared library `target` (-march=native when the compiler takes it)."""
    if shutil.which(CXX) is None:
        raise RuntimeError(f"no C++ compiler {CXX!r} on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = ""
    for arch in (["-march=native"], []):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: concurrent builds are safe
            out = pathlib.Path(tmp) / target.name
            cmd = [CXX, "-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", *arch, str(SOURCE), "-o", str(out)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                _write_checksum(out, target)
                os.replace(out, target)
                return
            errors = (run.stderr.strip().splitlines() or ["failed"])[-1]
    raise RuntimeError(f"{CXX} failed: {errors}")


def _checksum_path(target: pathlib.Path) -> pathlib.Path:
    """Where the sha256 of a built library is kept: <library>.sha256 beside it."""
    return target.with_name(target.name + ".sha256")


def _write_checksum(built: pathlib.Path, target: pathlib.Path) -> None:
    """Record the sha256 of the freshly built `built` (about to be renamed to `target`), atomically: written
    beside it in the build's temporary folder, then renamed into place."""
    tmp = built.with_name(built.name + ".sha256")
    tmp.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
    os.replace(tmp, _checksum_path(target))


def _verified(target: pathlib.Path) -> Optional[bytes]:
    """The cached library's bytes when they match the checksum written after its build; None when either
    is missing or unreadable or they differ (truncated, overwritten, a build from before checksums)."""
    try:
        data, recorded = target.read_bytes(), _checksum_path(target).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return data if hashlib.sha256(data).hexdigest() == recorded else None


@functools.lru_cache(maxsize=None)
def _load():
    """Build the library when the cache has no verified one, then load a private copy of the verified bytes.
    Mapping a damaged library can kill the process (SIGBUS on a truncated file) before any error could be
    raised, so nothing is handed to the dynamic loader unchecked, and the copy cannot change under it."""
    root = pathlib.Path(os.environ.get("EDTOOL_KERNEL_DIR") or pathlib.Path(
        os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "edtool" / "kernels")
    target = root / f"els_{_cpu_tag()}.so"
    try:
        data = _verified(target)
        if data is None:  # not built yet, or damaged: build it (again)
            _build(target)
            data = _verified(target)
            if data is None:
                raise RuntimeError(f"{target} does not match its checksum right after the build")
        return _bind(_open_copy(data, target.name, target.parent))
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use the torch path
        warnings.warn(f"the fused ELS kernel is unavailable ({e}); using the pure-torch engine (same "
                      f"numbers, slower). Install g++ to enable it, or set {ENV}=torch to silence this.",
                      RuntimeWarning, stacklevel=2)
        return None


def _open_copy(data: bytes, name: str, folder: pathlib.Path):
    """ctypes.CDLL of a private copy of the verified bytes, which nothing else changes while it is mapped: in
    the cache folder, else in the system's temporary folder (a read-only cache)."""
    for where in (folder, None):
        try:
            with tempfile.TemporaryDirectory(dir=where) as tmp:  # a loaded library may be unlinked
                private = pathlib.Path(tmp) / name
                private.write_bytes(data)
                return ctypes.CDLL(str(private))
        except OSError:
            if where is None:
                raise


def _bind(lib):
    """Declare the kernels' C signatures on the loaded library (AttributeError if one is missing)."""
    i, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.score_chunk.argtypes = [ptr, i, i, i, ptr, i64, i64, i64, ptr, i, ptr, ptr, f32, i64, i]
    lib.moments_chunk.argtypes = [ptr, i, i, i, ptr, i64, i64, i64, ptr, i, i, ptr, ptr, f32, i64, i]
    lib.merge_windows.argtypes = [ptr, i64, i64, ptr, i64, i, i64, i, ptr, ptr]
    lib.merge_windows.restype = i64
    lib.window_keys.argtypes = [ptr, i64, ptr, i64, i, ptr, i64, ptr, i64, i]
    lib.score_chunk.restype = lib.moments_chunk.restype = lib.window_keys.restype = None
    lib.box_score.argtypes = [ptr, i, i, i, i, i, ptr, i64, ptr, ptr, i, ptr, ptr, f32, ptr, i]
    lib.box_score.restype = None
    return lib


def usable(queries: Tensor) -> bool:
    """Whether the fused kernels apply to these queries (G, R, E), or (E = 1 stands for any) to a batch of
    images: float32 on the CPU, no autograd, E <= 256 (windows of at most 253 entries)."""
    return (queries.device.type == "cpu" and queries.dtype == torch.float32 and not torch.is_grad_enabled()
            and not is_functorch_wrapped_tensor(queries)  # torch.func's jvp/vmap (Hutchinson probes)
            and queries.shape[-1] <= 256)


def _padded(q: Tensor) -> Tensor:
    """q (G, R, E) with rows padded to a multiple of ROWS (zeros), contiguous."""
    pad = -q.shape[1] % ROWS
    return torch.nn.functional.pad(q, (0, 0, 0, pad)).contiguous() if pad else q.contiguous()


def _stream(kernel, queries: Tensor, key_chunks: Iterable[Tensor], value_rows: Tensor, width: int, counts: tuple,
            floor: float, block: int) -> Tensor:
    """Run a fused kernel over the key chunks into `width` float64 sums per query row (with the running
    shift of the logits), and normalize by the first (the weights' total): (G, R, width)."""
    G, R, E = queries.shape
    q = _padded(queries)
    shift = torch.full(q.shape[:2], -math.inf)
    sums = torch.zeros(*q.shape[:2], width, dtype=torch.float64)
    rows = value_rows.to(torch.int64).contiguous()
    for keys in key_chunks:
        if keys.stride(-1) != 1:
            keys = keys.contiguous()
        G, E, M = keys.shape
        kernel(q.data_ptr(), G, q.shape[1], E, keys.data_ptr(), keys.stride(0), keys.stride(1), M, rows.data_ptr(),
               *counts, shift.data_ptr(), sums.data_ptr(), floor, block, torch.get_num_threads())
    return (sums / sums[..., :1])[:, :R]


def score_moments(lib, queries: Tensor, key_chunks: Iterable[Tensor], value_rows: Tensor, floor: float,
                  block: Optional[int] = None) -> Tensor:
    """posterior_moments for the score, fused: E_w[keys[value_rows]] (G, R, V) float64, normalized,
    for queries (G, R, E) and chunks of keys (G, E, M), value_rows[0] = 0 (the ones row), 2 <= V <= 4."""
    if block is None:  # candidates per block: its keys (64 KiB) stay in L2 while every row passes over them
        block = max(16, 16384 // queries.shape[-1] // 16 * 16)
    V = len(value_rows)
    return _stream(lib.score_chunk, queries, key_chunks, value_rows, V, (V,), floor, block)


def jacobian_moments(lib, queries: Tensor, key_chunks: Iterable[Tensor], value_rows: Tensor, J: int, floor: float,
                     block: Optional[int] = None) -> Tensor:
    """posterior_moments for the Jacobian, fused: E_w[c_v P_j] (G, R, V * J) float64, normalized, for
    c = keys[value_rows] (value_rows[0] = 0, the ones row) and P = keys[:J] (row 0 the ones row), v-major:
    the moments of the outer product [1, c] x [1, P] that the closed-form band needs."""
    if block is None:  # candidates per float64 flush (the kernel streams them in L1-sized sub-blocks)
        block = 1024
    V = len(value_rows)
    return _stream(lib.moments_chunk, queries, key_chunks, value_rows, V * J, (V, J), floor, block)


TAIL = 64  # floats readable past the end of box_score's image arrays (its vectors may read beyond a row)


def with_tail(t: Tensor) -> Tensor:
    """t as contiguous float32 storage with TAIL zeros after it (a view of t's shape)."""
    flat = torch.cat([t.reshape(-1).float(), t.new_zeros(TAIL, dtype=torch.float32)])
    return flat[: t.numel()].view(t.shape)


def box_score(lib, x_padded: Tensor, train_padded: Tensor, window_norms: Tensor, cells: Tensor, k: int,
              scale: Tensor, bias: Tensor, floor: float) -> Tensor:
    """The score's posterior means E_w[1, c] (B, H * W, 1 + C) float64 with every patch inner product from
    box sums (cost per candidate independent of k): queries x_padded (B, C, Hp, Wp) and training images
    train_padded (N, C, Hp, Wp), both padded by k // 2 as the machine pads and made by `with_tail`;
    window_norms (N, H, W) |window|^2 of every candidate (`with_tail`); cells (n, 9) int32 rectangles of
    window centres [py0, py1, px0, px1, qy0, qy1, qx0, qx1, same] (pixels, their candidates; same = 1:
    each pixel's candidates in its own row only; els.windows.cell_rectangles); logits
    scale[b] <x_p, y_q> + bias[b] |y_q|^2. At most 3 channels."""
    assert x_padded.shape[1] <= 3 and bool((cells[:, 8] <= 1).all()), "at most 3 channels, rows or all in a cell"
    B, C, Hp, Wp = x_padded.shape
    H, W = Hp - k + 1, Wp - k + 1
    out = torch.zeros(B, H * W, 1 + C, dtype=torch.float64)  # pixels of no cell stay 0
    cells = cells.to(torch.int32).contiguous()
    scale, bias = scale.float().contiguous(), bias.float().contiguous()
    lib.box_score(x_padded.data_ptr(), B, C, H, W, k, train_padded.data_ptr(), len(train_padded),
                  window_norms.data_ptr(), cells.data_ptr(), len(cells), scale.data_ptr(), bias.data_ptr(), floor,
                  out.data_ptr(), torch.get_num_threads())
    return out


def key_kernels(train_flat: Tensor):
    """The compiled library when its key builders (merge_windows, window_keys) apply to these images,
    else None: float32 contiguous CPU images, not a torch.func wrapper (keys first built inside
    Hutchinson's jvp), and the kernels enabled and built."""
    usable = (train_flat.device.type == "cpu" and train_flat.dtype == torch.float32 and train_flat.is_contiguous()
              and not is_functorch_wrapped_tensor(train_flat))
    return kernels() if usable else None


def merge_windows(lib, train_flat: Tensor, cell_index: Tensor, limit: Optional[int], hash_bits: int = 64):
    """merge_plan's (first, count) by one pass over the windows with a hash table (exact compare on
    equal hashes), or None when there are more than `limit` distinct windows."""
    N, F = train_flat.shape
    L, D = cell_index.shape
    M = N * L
    room = M if limit is None else min(M, limit + 1)
    first, count = torch.empty(room, dtype=torch.int64), torch.empty(room, dtype=torch.int64)
    cell = cell_index.to(torch.int64).contiguous()
    U = lib.merge_windows(train_flat.data_ptr(), N, F, cell.data_ptr(), L, D, M if limit is None else limit,
                          hash_bits, first.data_ptr(), count.data_ptr())
    return None if U < 0 else (first[:U].clone(), count[:U].clone())


def window_keys(lib, train_flat: Tensor, cell_index: Tensor, out: Tensor, windows: Optional[Tensor] = None) -> Tensor:
    """Fill rows 0..D+1 of out (D+3, n) with keys [1; P; |P|^2] of the given window numbers (all
    N * L windows, in order, when None); row D+2 is left as it is."""
    L, D = cell_index.shape
    n = out.shape[-1]
    assert out.stride(-1) == 1 and out.dtype == torch.float32
    cell = cell_index.to(torch.int64).contiguous()
    idx = None if windows is None else windows.to(torch.int64).contiguous()
    lib.window_keys(train_flat.data_ptr(), train_flat.shape[1], cell.data_ptr(), L, D,
                    None if idx is None else idx.data_ptr(), n, out.data_ptr(), out.stride(-2), torch.get_num_threads())
    return out
