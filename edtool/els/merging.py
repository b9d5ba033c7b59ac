"""Identical candidate windows, merged (exact: a window met n times is one column with log n added to
its logit, so w and every weighted sum are unchanged), and the cache that keeps key sets between calls."""

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from edtool.els import kernel as els_kernels
from edtool.els.engine import fill_from, gathered_keys


MERGE_BLOCK = 2**22  # window entries hashed or compared per block while merging (32 MiB of int64)
# Windows of more entries (C k^2) are not merged: on mnist5k at k = 11, 73 % of them are distinct and
# the one-off merge costs ~3 scores while a merged score is no faster (k = 9: pays after ~5 calls;
# k <= 7: after 1-2). Measured by tests/benchmarks/bench_merge_threshold.py.
MERGE_MAX_ENTRIES = 81


def _row_hash(rows: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """A 64-bit hash (M,) of the bit patterns of each row of rows (M, D): equal rows, equal hashes
    (written into `out` when given)."""
    if rows.element_size() not in (4, 8):
        rows = rows.float()
    bits = rows.contiguous().view(torch.int32 if rows.element_size() == 4 else torch.int64).long()
    g = torch.Generator().manual_seed(20292)
    mult = torch.randint(-(2**62), 2**62, (rows.shape[1],), generator=g).to(rows.device) * 2 + 1
    return torch.sum(bits * mult, -1, out=out)  # wraps modulo 2^64


def cell_windows(train_flat: Tensor, cell_index: Tensor, m: Tensor) -> Tensor:
    """Windows (len(m), D) number m = i*L + l (image i of train_flat (N, F), position l of the
    cell's window offsets cell_index (L, D)); callers pass blocks of m to bound the copy."""
    L = cell_index.shape[0]
    return train_flat.view(-1)[(m // L * train_flat.shape[1])[:, None] + cell_index[m % L]]


def merge_plan(train_flat: Tensor, cell_index: Tensor, limit: Optional[int] = None):
    """The distinct candidate windows of one cell (window offsets cell_index (L, D) in every
    training image), as (first, count): the number i*L + l (image i, position l) of each one's
    first occurrence, ascending, and how often it occurs, both (U,) int64; None when there are
    more than `limit`. `cell_windows` copies the windows themselves, and `merged_keys` copies
    them straight into the keys, so a plan costs 16 bytes per distinct window. The compiled
    kernel does it in one pass (a hash table, windows compared entry by entry on equal hashes:
    mnist5k, k = 7: ~15x faster); `merge_plan_torch` is the path without it."""
    lib = els_kernels.key_kernels(train_flat)
    if lib is not None and len(train_flat) * cell_index.shape[0] < 2**32 - 1:  # its table holds 32-bit indices
        return els_kernels.merge_windows(lib, train_flat, cell_index, limit)
    return merge_plan_torch(train_flat, cell_index, limit)


def merge_plan_torch(train_flat: Tensor, cell_index: Tensor, limit: Optional[int] = None):
    """merge_plan in torch ops. Windows are grouped by a hash of their bits, then every window is compared with its group's
    first entry by entry: a hash collision only leaves windows unmerged (count 1), it never
    merges different ones. Transient memory: about seven int64 per window of the cell (hashes,
    sort, inverse, first occurrence; full MNIST at k = 3: ~3 GB), freed on return. Per-block
    results go into tensors allocated up front: small results kept between the blocks' large
    temporaries fragmented glibc's heap to ~16 GB (full MNIST, k = 7)."""
    N = train_flat.shape[0]
    L, D = cell_index.shape
    M = N * L
    n = max(1, MERGE_BLOCK // (L * D))  # images per block
    block = lambda i: train_flat[i : i + n].index_select(1, cell_index.reshape(-1)).view(-1, D)  # windows i*L .. (i+n)*L - 1
    hashes = torch.empty(M, dtype=torch.int64, device=train_flat.device)
    for i in range(0, N, n):
        _row_hash(block(i), out=hashes[i * L : (i + n) * L])
    _, inverse, count = torch.unique(hashes, return_inverse=True, return_counts=True)
    del hashes
    if limit is not None and len(count) > limit:
        return None
    first = torch.full_like(count, M).scatter_reduce_(0, inverse, torch.arange(M, device=count.device), "amin")
    differs = torch.empty(M, dtype=torch.bool, device=train_flat.device)  # differs from its hash group's first window
    for i in range(0, N, n):
        group_first = cell_windows(train_flat, cell_index, first[inverse[i * L : (i + n) * L]])
        torch.any(block(i) != group_first, 1, out=differs[i * L : (i + n) * L])
    bad = torch.nonzero(differs)[:, 0]
    del differs, group_first
    if len(bad):  # equal hashes, different windows: those stand alone
        count = count.index_add(0, inverse[bad], -torch.ones_like(bad))
        first, count = torch.cat([first, bad]), torch.cat([count, torch.ones_like(bad)])
    order = first.argsort()
    return first[order], count[order]


def merged_keys(train_flat: Tensor, key_index: Tensor, plans: Sequence) -> Tensor:
    """Keys (G, D+3, U) = [1; P; |P|^2; log count] of each cell's distinct windows (plans from
    merge_plan), copied block by block from train_flat; cells with fewer than U are padded with
    columns of weight 0 (log count -inf)."""
    G, L, D = key_index.shape
    U = max(len(first) for first, _ in plans)
    dtype = train_flat.dtype
    lib = els_kernels.key_kernels(train_flat)
    keys = train_flat.new_empty(G, D + 3, U)  # (zeroing all of it took ~1 s at k = 7: only the padding is)
    keys[:, 0] = 1
    keys[:, D + 2] = torch.finfo(dtype).min / 4  # exp of it is 0 (or the CPU floor, < 1e-34)
    rows = max(1, MERGE_BLOCK // D)
    for g, (first, count) in enumerate(plans):
        keys[g, 1 : D + 2, len(first) :] = 0  # padding columns
        if lib is not None:  # rows 0 .. D+1 of the distinct windows' columns, in one pass
            els_kernels.window_keys(lib, train_flat, key_index[g], keys[g, :, : len(first)], first)
        else:
            for s in range(0, len(first), rows):
                P = cell_windows(train_flat, key_index[g], first[s : s + rows]).T  # (D, <= rows)
                keys[g, 1 : D + 1, s : s + P.shape[1]] = P
                keys[g, D + 1, s : s + P.shape[1]] = P.square().sum(0)
        keys[g, D + 2, : len(first)] = count.to(dtype).log()
    return keys


class KeyCache:
    """Candidate key sets kept between calls, per (label, k, dtype, device), within `budget`
    bytes: the least recently used sets make room; a set that alone exceeds the budget is
    refused (and remembered as such) and its keys are gathered afresh at every call."""

    def __init__(self, budget: int):
        self.budget = budget
        self.sets = OrderedDict()
        self.refused = set()

    def nbytes(self) -> int:
        return sum(t.nbytes for keys in self.sets.values() for t in keys)

    def get(self, key, plan: Callable[[], tuple]) -> Optional[list]:
        """The key tensors under `key`, or None when they do not fit. On first use plan() returns
        (bytes needed, make), and make() builds them once the older sets have made room."""
        if key in self.refused:
            return None
        if key not in self.sets:
            need, make = plan()
            if need > self.budget:
                self.refused.add(key)
                return None
            while self.sets and need + self.nbytes() > self.budget:
                self.sets.popitem(last=False)
            self.sets[key] = make()
        self.sets.move_to_end(key)
        return self.sets[key]


def every_window_keys(train_flat: Tensor, key_index: Tensor) -> Tensor:
    """Keys (G, D+3, N * L) = [1; P; |P|^2; log count = 0] of every window of each cell (nothing
    merged: large windows rarely repeat), columns in window order i * L + l."""
    G, L, D = key_index.shape
    keys = train_flat.new_empty(G, D + 3, len(train_flat) * L)
    lib = els_kernels.key_kernels(train_flat)
    for g in range(G):
        if lib is None:
            fill_from(keys[g : g + 1], lambda step: gathered_keys(train_flat, key_index[g : g + 1], step))
        else:
            els_kernels.window_keys(lib, train_flat, key_index[g], keys[g])
            keys[g, D + 2] = 0
    return keys
