"""The ELS family of analytic score machines (SPEC 5): `is`, `ls`, `els-circular`, `els-borders`.

Every machine scores a noisy image x at time t pixel by pixel. The k x k window x_p around
pixel p (zero or circular padding) is compared with a set of candidate training windows P,
weighted by w(P) ∝ exp(-||x_p - a P||^2 / (2 b^2)) with a = sqrt(alpha_bar(t)), b^2 = beta(t),
and the score is s_p = -(x_p[center] - a E_w[P[center]]) / b^2, per channel.

The machines differ only in which training windows are candidates for which pixel. That rule
lives in `candidate_cells`: it splits the pixels into cells whose pixels share one candidate
set ("the windows centred at these positions, in every training image"). One streaming engine,
`posterior_moments`, does the rest for every rule: for all pixels of a cell at once it scores
a chunk of candidates with one matrix product, keeps a running log-sum-exp, and accumulates
the weighted sums (sum w, sum w c and, for the Jacobian, sum w P and sum w c P^T) in float64.

On the CPU in float32 the score's loop (and at k = 3 the Jacobian's logits and exp) runs fused in a
compiled kernel (`edtool.els.kernel`); this module's torch code is the fallback and the GPU path.

Many candidate windows are identical (on mnist5k only 38 % of the k = 3 windows are distinct:
the all-background window dominates). Each cell's distinct windows are kept once, with log of
their count added to their logit (`merge_plan`, `merged_keys`): the same weights, sums and
Jacobian, on fewer columns.

The Jacobian has a closed form (SPEC 5.3): d s_p / d x_q = (a^2/b^4) Cov_w(c, P[q - p]) -
delta_pq / b^2 for q in p's window, so it is a band of C*k*k numbers per output number, and
`band_ed` turns the band into ||J - J^T||_F, ||J||_F and the curl map exactly.

    m = make_machine("els-borders", images, labels, patch_size=5)
    with torch.no_grad():
        s = m.score(0.5, x)                     # (B, C, H, W)
    res = m.field(0.5).analytic_ed(x, curl_map=True)
"""

import functools
import math
from collections import OrderedDict, namedtuple
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from edtool.config import PATCH_SIZE
from edtool.diffusion import alpha_bar, beta, score_to_eps
from edtool.errors import EdtoolError
from edtool.els.schedule import check_fits, check_patch_size, check_schedule, scale_index
from edtool.els import kernel as els_kernels

MACHINES = ("is", "ls", "els-circular", "els-borders")
ALIASES = {"els": "els-borders"}
PADDINGS = ("zeros", "circular")
DEFAULT_CHUNK_SIZE = 2**20  # elements per streamed block (logits, keys or values): 4 MiB in float32, cache-sized
# (mnist5k, k = 3: 10 % faster than 2**22; 2**18 is slower again, per-block overhead)
DEFAULT_CACHE_BYTES = 4 * 2**30  # candidate keys kept between calls (mnist5k at k = 11: 2.5 GB)


# ---------------------------------------------------------------------------------------------
# Names and settings
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Candidate rules (SPEC 5.1) and window geometry
# ---------------------------------------------------------------------------------------------


def candidate_cells(rule: str, H: int, W: int, k: int, paper_circular: bool = False):
    """Split the H*W pixels into cells [(pixels, centers)] (flat indices y*W + x).

    Every pixel of a cell has the same candidates: the windows centred at `centers` in every
    training image. This function is the whole difference between the local machines.
    """
    r = k // 2
    every = list(range(H * W))
    inside = [y * W + x for y in range(r, H - r) for x in range(r, W - r)]
    if rule == "ls":
        return [([p], [p]) for p in every]
    if rule == "els-circular":
        if not paper_circular:
            return [(every, every)]
        if not inside:
            raise ValueError(f"the paper's circular machine needs patch size <= image size, got k={k} for {H}x{W}")
        return [(every, inside)]
    if rule == "els-borders":
        cells = {}
        for y in range(H):
            for x in range(W):
                near = {"top": y, "bottom": H - 1 - y, "left": x, "right": W - 1 - x}
                near = {edge: depth for edge, depth in near.items() if depth < r}
                if not near:
                    key = ("interior",)  # every fully-inside window
                elif len(near) == 1:
                    key = next(iter(near.items()))  # same depth from that edge, anywhere along it
                else:
                    key = ("corner", y, x)  # exactly the same position
                cells.setdefault(key, []).append(y * W + x)
        return [(pix, pix) for pix in cells.values()]
    raise ValueError(f"no candidate rule for machine {rule!r}")


def pad_images(x: Tensor, r: int, circular: bool) -> Tensor:
    """Pad (N, C, H, W) by r on every side: zeros, or a circular wrap (any r, even r > H)."""
    if r == 0:
        return x
    if not circular:
        return F.pad(x, (r, r, r, r))
    H, W = x.shape[-2:]
    iy = torch.arange(-r, H + r, device=x.device) % H
    ix = torch.arange(-r, W + r, device=x.device) % W
    return x[:, :, iy][:, :, :, ix]


def window_index(centers: Tensor, C: int, H: int, W: int, k: int) -> Tensor:
    """Offsets (..., C*k*k) into a flattened padded image (C, H+2r, W+2r) of the k x k windows
    centred at `centers` (flat y*W + x); entries ordered (channel, dy, dx) like F.unfold."""
    Hp, Wp = H + k - 1, W + k - 1
    y, x = centers // W, centers % W
    c, dy, dx = torch.meshgrid(torch.arange(C), torch.arange(k), torch.arange(k), indexing="ij")
    offsets = (c * Hp * Wp + dy * Wp + dx).reshape(-1).to(centers.device)
    return (y * Wp + x)[..., None] + offsets


def _stack_cells(cells, C: int, H: int, W: int, k: int, device) -> list:
    """Cells of equal shape stacked into groups for batched matrix products:
    [(pixels (G, R), query windows (G, R, D), candidate windows (G, L, D))]."""
    buckets = {}
    for pixels, centers in cells:
        buckets.setdefault((len(pixels), len(centers)), []).append((pixels, centers))
    groups = []
    for same in buckets.values():
        pixels = torch.tensor([p for p, _ in same], device=device)
        centers = torch.tensor([c for _, c in same], device=device)
        groups.append((pixels, window_index(pixels, C, H, W, k), window_index(centers, C, H, W, k)))
    return groups


# ---------------------------------------------------------------------------------------------
# The streaming engine
# ---------------------------------------------------------------------------------------------


def posterior_moments(queries: Tensor, key_chunks: Iterable[Tensor], values_of: Callable[[Tensor], Tensor]) -> Tensor:
    """Posterior means E_w[values] for every query row, streamed over chunks of candidates.

    Keys come as (G, D+2, M) columns [1; P; |P|^2] and queries (G, R, D+2) as rows
    [0, a x_p / b^2, -a^2 / (2 b^2)], so queries @ keys = -||x_p - a P||^2 / (2 b^2) up to a
    per-row constant: one matrix product per chunk. A running shift s (G, R), kept at or just
    above the largest log weight seen, is folded into that product through the ones row, so a
    chunk costs one product, one exp and one product with values_of(keys) (G, V, M), whose
    first row must be ones (it carries sum w). Where a chunk would overflow (a candidate far
    better than any before) its rows are shifted up to its own max. Sums are float64; the
    result is (G, R, V), normalized (its first column is 1).
    """
    grad = torch.is_grad_enabled()  # in-place ops are faster but autograd can't see through them
    shift, sums, buffer, bounded = None, None, None, True
    # logits and exp fused pay only for narrow windows (k = 3 grey: 1.1x on the Jacobian; k >= 5: no gain)
    lib = els_kernels.kernels() if els_kernels.usable(queries) and queries.shape[-1] <= 16 else None
    for keys in key_chunks:
        if shift is None:  # first chunk: start from its exact max
            shift = torch.bmm(queries.detach(), keys.detach()).amax(-1)
        q = torch.cat([-shift[..., None].to(queries.dtype), queries[..., 1:]], -1)
        values = values_of(keys)  # (G, V, M)
        if lib is not None:  # logits, clamp and exp fused (the weighted sum is BLAS's)
            if buffer is None or buffer.numel() < q.shape[0] * (q.shape[1] + els_kernels.ROWS) * keys.shape[-1]:
                buffer = q.new_empty(q.shape[0] * (q.shape[1] + els_kernels.ROWS) * keys.shape[-1])
            part = _weighted_sums(els_kernels.logits_exp(lib, q, keys, _clamp_floor(q.dtype), buffer), values).double()
            if bool((part[..., 0] < 1e30).all()):
                logw = None
            else:  # rare: the torch path below redoes this chunk
                lib, buffer = None, None
        if lib is None:
            logw = torch.bmm(q, keys)  # log w - s
            if logw.device.type == "cpu":  # CPUs are ~4x slower on subnormal exp results, which weigh < 1e-30 anyway
                floor = _clamp_floor(logw.dtype)
                bounded = bounded and _above(q.detach(), keys.detach(), floor)  # after one miss, stop trying
                if not bounded:
                    logw = logw.clamp(min=floor) if grad else logw.clamp_(min=floor)
            if not grad and (buffer is None or buffer.numel() < logw.numel()):
                buffer = torch.empty_like(logw).view(-1)
            part = _weighted_sums(_exp(logw, buffer), values).double()
        if not bool((part[..., 0] < 1e30).all()):  # exp overflowed or nearly: lift those rows to the chunk max
            lift = logw.detach().amax(-1).clamp(min=0)
            part = _weighted_sums(_exp(logw - lift[..., None], buffer), values).double()
            sums = None if sums is None else sums * (-lift).double().exp()[..., None]
            shift = shift + lift
        sums = part if sums is None else sums + part
        grow = part[..., 0].detach().log().clamp(min=0)  # keep the shift >= every log weight seen
        sums = sums * (-grow).exp()[..., None]
        shift = shift + grow.to(shift.dtype)
    return sums / sums[..., :1]


def _clamp_floor(dtype) -> float:
    """Logits (minus the shift) are clamped here on CPUs, which are ~4x slower on subnormal exp
    results; those weigh < 1e-30 of the largest anyway."""
    return math.log(torch.finfo(dtype).tiny) + 8


def _above(q: Tensor, keys: Tensor, floor: float) -> bool:
    """Whether every entry of q (G, R, E) @ keys (G, E, M) provably exceeds floor, from each key
    row's range in this chunk (interval arithmetic, with a margin for rounding); then the clamp
    would change nothing. Only tried for R >= 16 rows: the bound costs one pass over the keys."""
    if q.shape[1] < 16:
        return False
    lo, hi = keys.aminmax(dim=-1)  # (G, E)
    ends = torch.stack([q * lo[:, None], q * hi[:, None]])  # (2, G, R, E)
    bound = ends.amin(0).sum(-1) - 1e-4 * ends.abs().amax(0).sum(-1)  # a lower bound, minus rounding slack
    return bool((bound > floor + 1).all())


def _weighted_sums(w: Tensor, values: Tensor) -> Tensor:
    """w (G, R, M) @ values (G, V, M)^T -> (G, R, V). For V <= 3 (the score) MKL is 2-4x faster
    at it as values @ w^T; for wider values (the Jacobian) the other way round."""
    if values.shape[1] <= 3:
        return torch.bmm(values, w.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(w, values.transpose(1, 2))


def _exp(logw: Tensor, buffer: Optional[Tensor]) -> Tensor:
    """exp(logw), written into a reused buffer when one is given (no autograd; forward-mode AD, as
    Hutchinson's probes use, has no rule for out= and gets a new tensor)."""
    if buffer is None or is_functorch_wrapped_tensor(logw):
        return logw.exp()
    return torch.exp(logw, out=buffer[: logw.numel()].view_as(logw))


def _candidates_per_step(G: int, rows: int, width: int, chunk_size: int) -> int:
    """How many candidates one step may take so no block (G x rows x M logits, G x width x M
    keys/values) exceeds chunk_size elements."""
    return max(1, chunk_size // (G * max(rows, width)))


def _gathered_keys(train_flat: Tensor, key_index: Tensor, step: int):
    """Yield candidate keys (G, D+3, M) = [1; P; |P|^2; log count = 0], M <= step, gathered from
    the flat padded training images for the window offsets key_index (G, L, D): every image,
    every position, one column per window (nothing merged)."""
    N = train_flat.shape[0]
    G, L, D = key_index.shape
    positions = min(step, L)
    images = max(1, step // L)
    for i in range(0, N, images):
        block = train_flat[i : i + images]
        for l in range(0, L, positions):
            idx = key_index[:, l : l + positions]
            P = block.index_select(1, idx.reshape(-1)).view(len(block), *idx.shape)  # (n, G, l, D)
            P = P.permute(1, 3, 0, 2).reshape(G, D, -1)
            yield torch.cat([torch.ones_like(P[:, :1]), P, P.square().sum(1, keepdim=True), torch.zeros_like(P[:, :1])], 1)


def _image_keys(train_flat: Tensor, step: int):
    """Yield whole-image keys (1, n+2, M) = [1; y; |y|^2], M <= step (the `is` machine)."""
    for i in range(0, len(train_flat), step):
        y = train_flat[i : i + step].T
        yield torch.cat([torch.ones_like(y[:1]), y, y.square().sum(0, keepdim=True)])[None]


def _sliced_keys(keys: Tensor, step: int):
    """Yield consecutive slices (G, rows, <= step) of cached keys."""
    for m in range(0, keys.shape[-1], step):
        yield keys[..., m : m + step]


def _fill(out: Tensor, source) -> Tensor:
    """Concatenate a key source's chunks along candidates into the preallocated `out`."""
    m = 0
    for keys in source(2**22 // out.shape[1] + 1):
        out[..., m : m + keys.shape[-1]] = keys
        m += keys.shape[-1]
    return out


# ---------------------------------------------------------------------------------------------
# Identical candidate windows, merged (exact: a window met n times is one column with log n
# added to its logit, so w and every weighted sum are unchanged)
# ---------------------------------------------------------------------------------------------

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
    them straight into the keys, so a plan costs 16 bytes per distinct window.
    Windows are grouped by a hash of their bits, then every window is compared with its group's
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
    keys = train_flat.new_zeros(G, D + 3, U)
    keys[:, 0] = 1
    keys[:, D + 2] = torch.finfo(dtype).min / 4  # exp of it is 0 (or the CPU floor, < 1e-34)
    rows = max(1, MERGE_BLOCK // D)
    for g, (first, count) in enumerate(plans):
        for s in range(0, len(first), rows):
            P = cell_windows(train_flat, key_index[g], first[s : s + rows]).T  # (D, <= rows)
            keys[g, 1 : D + 1, s : s + P.shape[1]] = P
            keys[g, D + 1, s : s + P.shape[1]] = P.square().sum(0)
        keys[g, D + 2, : len(first)] = count.to(dtype).log()
    return keys


# ---------------------------------------------------------------------------------------------
# Jacobian bands: dense form and the exterior derivative
# ---------------------------------------------------------------------------------------------


def _band_valid(H: int, W: int, k: int, device) -> Tensor:
    """valid[y, x, dy, dx]: window entry (dy, dx) of pixel (y, x) lies inside the image."""
    r = k // 2
    qy = torch.arange(H, device=device)[:, None] + torch.arange(k, device=device)[None] - r  # (H, k)
    qx = torch.arange(W, device=device)[:, None] + torch.arange(k, device=device)[None] - r  # (W, k)
    vy, vx = (qy >= 0) & (qy < H), (qx >= 0) & (qx < W)
    return vy[:, None, :, None] & vx[None, :, None, :]


def dense_jacobian(band: Tensor, padding: str) -> Tensor:
    """The (B, n, n) Jacobian of a band (B, C, H, W, C, k, k); circular wraps add up."""
    B, C, H, W, _, k, _ = band.shape
    r, n = k // 2, C * H * W
    dev = band.device
    i, y, x, j, dy, dx = torch.meshgrid(
        *(torch.arange(s, device=dev) for s in (C, H, W, C, k, k)), indexing="ij"
    )
    qy, qx = y + dy - r, x + dx - r
    if padding == "circular":
        valid = torch.ones_like(qy, dtype=torch.bool)
        qy, qx = qy % H, qx % W
    elif padding == "zeros":
        valid = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    else:
        raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}")
    flat = ((i * H + y) * W + x) * n + (j * H + qy) * W + qx
    dense = band.new_zeros(B, n * n)
    dense.index_add_(1, flat[valid], band.reshape(B, -1)[:, valid.reshape(-1)])
    return dense.view(B, n, n)


def dense_ed(jac: Tensor, shape: Sequence[int], curl_map: bool = False) -> dict:
    """ed_fro, jac_fro (B,) and optionally the curl map (B, H, W) of dense Jacobians (B, n, n)."""
    C, H, W = shape
    asym = jac - jac.transpose(1, 2)
    row = asym.square().sum(-1).sqrt().view(-1, C, H, W)
    return {
        "ed_fro": asym.square().sum((1, 2)).sqrt(),
        "jac_fro": jac.square().sum((1, 2)).sqrt(),
        "curl_map": row.sum(1) if curl_map else None,
    }


def band_transpose(band: Tensor, circular: bool) -> Tensor:
    """The band of J^T: entry [b, i, p, j, d] = J[(j, p + d - r), (i, p)] (windows are symmetric)."""
    B, C, H, W, _, k, _ = band.shape
    r = k // 2
    mirrored = band.flip(-2, -1).transpose(1, 4)  # [b, i, q, j, d] = J[(j, q), (i, q + r - d)]
    shifted = torch.stack(
        [torch.roll(mirrored[..., dy, dx], shifts=(r - dy, r - dx), dims=(2, 3)) for dy in range(k) for dx in range(k)],
        dim=-1,
    ).view_as(band)
    if circular:
        return shifted
    return shifted * _band_valid(H, W, k, band.device)[None, None, :, :, None]


def band_ed(band: Tensor, padding: str, curl_map: bool = False) -> dict:
    """ed_fro = ||J - J^T||_F, jac_fro = ||J||_F (B,) and optionally the curl map (B, H, W),
    r_p = sum over channels of ||(J - J^T)[(c, p), :]||_2, exactly from the band."""
    B, C, H, W, _, k, _ = band.shape
    circular = padding == "circular"
    if circular and (k > H or k > W):  # a window meets the same pixel twice: fold through dense J
        return dense_ed(dense_jacobian(band, padding), (C, H, W), curl_map)
    asym = band - band_transpose(band, circular)
    row = asym.square().sum((4, 5, 6))  # (B, C, H, W)
    return {
        "ed_fro": row.sum((1, 2, 3)).sqrt(),
        "jac_fro": band.square().sum((1, 2, 3, 4, 5, 6)).sqrt(),
        "curl_map": row.sqrt().sum(1) if curl_map else None,
    }


# ---------------------------------------------------------------------------------------------
# The machines
# ---------------------------------------------------------------------------------------------


LastScore = namedtuple("LastScore", "x t k label score")  # a Jacobian's inputs and the score it also gave


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


class Machine:
    """What every analytic score machine shares: settings, input checks, the split of a batch
    into runs of one patch size and one label, the padded training images; `.score`, `.eps`,
    `.jacobian`, `.field`. Subclasses say how a run is scored (`_score_run`, `_jacobian_run`)."""

    padding = "zeros"

    def __init__(self, name, images, labels, patch_sizes, chunk_size, cache_bytes):
        self.name = name
        self.patch_sizes = patch_sizes  # None for `is`, else one size per scale entry
        self.chunk_size = chunk_size
        self.images = images
        self.labels = labels
        self._cache = {}  # padded training images and window indices
        self._keys = KeyCache(cache_bytes)

    # -- settings ---------------------------------------------------------------------------

    def patch_size_at(self, t: float) -> Optional[int]:
        """The patch size used at time t (None for `is`, which uses the whole image)."""
        return self.patch_sizes[scale_index(t, len(self.patch_sizes))]

    def _coefficients(self, t: Tensor, x: Tensor):
        """a = sqrt(alpha_bar(t)) and b^2 = beta(t), shape (B,), in x's dtype and device."""
        t64 = t.to(torch.float64)
        return alpha_bar(t64).sqrt().to(x.dtype), beta(t64).to(x.dtype)

    def _times(self, t, x: Tensor) -> Tensor:
        """t as a (B,) float64 tensor on x's device; every value must lie in (0, 1]."""
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).detach().to(x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a float or a tensor of shape ({B},), got shape {tuple(t.shape)}")
        if not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError("t must lie in (0, 1]: at t = 0 the machines' score is undefined")
        return t

    def _labels(self, label, B: int, device) -> Optional[Tensor]:
        """label as (B,) int64 (an int is broadcast), or None for the unconditional machine."""
        if label is None:
            return None
        if self.labels is None:
            raise ValueError("a label was given but the machine was made without labels; pass labels to make_machine")
        label = torch.as_tensor(label, dtype=torch.int64).detach().to(device)
        if label.dim() == 0:
            label = label.expand(B)
        if label.shape != (B,):
            raise ValueError(f"label must be an int or a tensor of shape ({B},), got shape {tuple(label.shape)}")
        return label

    def _check_x(self, x: Tensor):
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.images.shape[1:]):
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.images.shape[1:]))}) like the training images, "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype}")

    def _runs(self, t, x: Tensor, label):
        """Checked (t, label) and the batch split into runs sharing one patch size and one label:
        [(index, k, label)]."""
        self._check_x(x)
        t = self._times(t, x)
        label = self._labels(label, x.shape[0], x.device)
        ks = [self.patch_size_at(v) for v in t.tolist()]
        labs = [None] * len(ks) if label is None else label.tolist()
        runs = {}
        for b, key in enumerate(zip(ks, labs)):
            runs.setdefault(key, []).append(b)
        return t, label, [(torch.tensor(idx, device=t.device), k, lab) for (k, lab), idx in runs.items()]

    # -- cached training data ---------------------------------------------------------------

    def _train(self, label, r: int, x: Tensor) -> Tensor:
        """The training images with this label, padded by r and flattened: (N, F)."""
        key = ("train", label, r, x.dtype, x.device)
        if key not in self._cache:
            images = self.images
            if label is not None:
                images = images[self.labels == label]
                if len(images) == 0:
                    raise ValueError(f"no training images have label {label}")
            images = images.to(device=x.device, dtype=x.dtype)
            self._cache[key] = pad_images(images, r, self.padding == "circular").flatten(1).contiguous()
        return self._cache[key]

    # -- public -----------------------------------------------------------------------------

    def score(self, t, x: Tensor, label=None) -> Tensor:
        """The machine's score s(t, x) (B, C, H, W); t a float or (B,), label None or (B,)."""
        t, label, runs = self._runs(t, x, label)
        if len(runs) == 1:
            _, k, lab = runs[0]
            return self._score_run(x, t, k, lab)
        idx = torch.cat([i for i, _, _ in runs])
        parts = [self._score_run(x[i], t[i], k, lab) for i, k, lab in runs]
        return torch.cat(parts)[torch.argsort(idx)]

    def eps(self, t, x: Tensor, label=None) -> Tensor:
        """The noise prediction eps_hat = -sqrt(beta) s that drives DDIM."""
        return score_to_eps(self.score(t, x, label), self._times(t, x).to(x.dtype))

    def jacobian(self, t, x: Tensor, label=None) -> Tensor:
        """The closed-form score Jacobian (see the subclass for its shape)."""
        t, label, runs = self._runs(t, x, label)
        if len({k for _, k, _ in runs}) > 1:
            raise ValueError("jacobian: all samples of a batch must use the same patch size; split the batch by t")
        idx = torch.cat([i for i, _, _ in runs])
        parts = [self._jacobian_run(x[i], t[i], k, lab) for i, k, lab in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(idx)]

    def field(self, t, label=None) -> "MachineField":
        """The score field x -> s(t, x) at one time, with its exact `analytic_ed`."""
        return MachineField(self, t, label)

    def __repr__(self):
        sizes = "whole image" if self.patch_sizes is None else self.patch_sizes
        return f"{type(self).__name__}({self.name!r}, {len(self.images)} images, patch sizes {sizes})"


class IdealMachine(Machine):
    """The ideal score `is`: the exact score of the empirical distribution, whole training images
    as candidates; its Jacobian is dense (n x n) and symmetric."""

    def __init__(self, images, labels, chunk_size, cache_bytes):
        super().__init__("is", images, labels, None, chunk_size, cache_bytes)

    def patch_size_at(self, t: float) -> None:
        return None

    def _source(self, label, x: Tensor):
        """A function step -> chunks (1, n+2, <= step) of the whole-image keys [1; y; |y|^2]."""
        train = self._train(label, 0, x)
        shape = (1, train.shape[1] + 2, len(train))
        make = lambda: [_fill(train.new_empty(shape), lambda step: _image_keys(train, step))]
        cached = self._keys.get((label, None, x.dtype, x.device), lambda: (math.prod(shape) * train.element_size(), make))
        if cached is None:
            return lambda step: _image_keys(train, step)
        return lambda step: _sliced_keys(cached[0], step)

    def _queries(self, x, a, b2) -> Tensor:
        """Rows [0, a x / b^2, -a^2 / (2 b^2)] (1, B, n+2) for whole-image candidates."""
        q = x.flatten(1) * (a / b2)[:, None]
        return torch.cat([torch.zeros_like(q[:, :1]), q, (-a * a / (2 * b2))[:, None]], -1)[None]

    def _score_run(self, x, t, k, label) -> Tensor:
        """-(x - a E_w[y]) / b^2 over whole training images y, for samples sharing a label."""
        a, b2 = self._coefficients(t, x)
        n = x[0].numel()
        step = _candidates_per_step(1, x.shape[0], n + 2, self.chunk_size)
        moments = posterior_moments(self._queries(x, a, b2), self._source(label, x)(step), lambda keys: keys[:, : n + 1])
        mean = moments[0, :, 1:].view_as(x)
        ab = a.view(-1, 1, 1, 1)
        return -(x - ab * mean.to(x.dtype)) / b2.view(-1, 1, 1, 1)

    def _jacobian_run(self, x, t, k, label) -> Tensor:
        """Dense (B, n, n) Jacobian of the ideal score: (a^2/b^4) Cov_w(y) - I/b^2; weights below
        eps^2 of the total are dropped (their share is below float precision)."""
        a, b2 = self._coefficients(t, x)
        train = self._train(label, 0, x)  # (N, n)
        B, n = x.shape[0], train.shape[1]
        q = self._queries(x, a, b2)
        step = _candidates_per_step(1, B, n + 2, self.chunk_size)
        w = torch.softmax(torch.cat([torch.bmm(q, keys)[0] for keys in self._source(label, x)(step)], -1).double(), -1)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        tiny = torch.finfo(x.dtype).eps ** 2
        out = []
        for b in range(B):
            keep = w[b] > tiny
            wb = (w[b][keep] / w[b][keep].sum()).to(x.dtype)
            yb = train[keep]
            z = (yb - wb @ yb) * wb.sqrt()[:, None]
            out.append((a[b] ** 2 / b2[b] ** 2) * (z.T @ z) - eye / b2[b])
        return torch.stack(out)

    def jacobian(self, t, x: Tensor, label=None) -> Tensor:
        """The dense (B, n, n) Jacobian d s / d x of the ideal score."""
        return super().jacobian(t, x, label)

    def analytic_ed(self, t, x: Tensor, label=None, curl_map: bool = False) -> dict:
        """Exact ed_fro, jac_fro (B,) and the curl map (B, H, W) or None, one sample at a time
        (the dense Jacobian is n x n)."""
        t = self._times(t, x)
        label = self._labels(label, x.shape[0], x.device)
        res = [
            dense_ed(self.jacobian(t[b : b + 1], x[b : b + 1], None if label is None else label[b : b + 1]), x.shape[1:], curl_map)
            for b in range(x.shape[0])
        ]
        return {key: None if res[0][key] is None else torch.cat([r[key] for r in res]) for key in res[0]}


class LocalMachine(Machine):
    """The local machines `ls`, `els-circular`, `els-borders`: k x k windows, candidates per
    `candidate_cells`; identical candidate windows (of <= MERGE_MAX_ENTRIES entries) are merged with
    their count; the Jacobian is a band of C*k*k numbers per output number."""

    def __init__(self, name, images, labels, patch_sizes, chunk_size, cache_bytes, paper_circular=False):
        super().__init__(name, images, labels, patch_sizes, chunk_size, cache_bytes)
        self.padding = "circular" if name == "els-circular" else "zeros"
        self.paper_circular = paper_circular
        self._last = None  # LastScore of the last Jacobian: DDIM asks for that score next

    def _groups(self, k: int, x: Tensor) -> list:
        """The stacked candidate cells of this machine for patch size k, on x's device."""
        key = ("groups", k, x.device)
        if key not in self._cache:
            C, H, W = x.shape[1:]
            cells = candidate_cells(self.name, H, W, k, self.paper_circular)
            self._cache[key] = _stack_cells(cells, C, H, W, k, x.device)
        return self._cache[key]

    def _sources(self, label, k, x: Tensor) -> list:
        """Per group, a function step -> chunks (G, D+3, <= step) of its candidate keys
        [1; P; |P|^2; log count]: the cached distinct windows with their counts when they fit
        the cache's budget, else every window gathered afresh from the padded images."""
        train = self._train(label, k // 2, x)
        groups = self._groups(k, x)
        gathered = [functools.partial(_gathered_keys, train, idx) for _, _, idx in groups]
        every = sum(idx.shape[0] * (idx.shape[2] + 3) * idx.shape[1] for _, _, idx in groups) * len(train) * train.element_size()

        def plan():
            if every > 4 * self._keys.budget:  # merging would not bring it within the budget
                return math.inf, None
            if groups[0][2].shape[2] > MERGE_MAX_ENTRIES:  # large windows rarely repeat: kept unmerged (k = 11: 1.2-1.3x)
                shapes = [(idx.shape[0], idx.shape[2] + 3, len(train) * idx.shape[1]) for _, _, idx in groups]
                return every, lambda: [_fill(train.new_empty(shape), lambda step, idx=idx: _gathered_keys(train, idx, step))
                                       for shape, (_, _, idx) in zip(shapes, groups)]
            plans, need = [], 0
            for _, _, idx in groups:  # stop as soon as the distinct windows counted so far overflow the budget
                column = idx.shape[0] * (idx.shape[2] + 3) * train.element_size()  # bytes per merged column
                limit = (self._keys.budget - need) // column
                cells = []
                for cell in idx:  # the first cell over the limit ends the plan: the rest are not hashed
                    cells.append(merge_plan(train, cell, limit) if limit > 0 else None)
                    if cells[-1] is None:
                        return math.inf, None
                plans.append(cells)
                need += column * max(len(first) for first, _ in cells)

            def make():  # the old sets are evicted by now; each group's plan is freed once its keys are built
                keys = []
                for g, (_, _, idx) in enumerate(groups):
                    keys.append(merged_keys(train, idx, plans[g]))
                    plans[g] = None
                return keys

            return need, make

        cached = self._keys.get((label, k, x.dtype, x.device), plan)
        if cached is None:
            return gathered
        return [functools.partial(_sliced_keys, keys) for keys in cached]

    def _moments(self, x, a, b2, k, label, jacobian: bool) -> Tensor:
        """Posterior moments per pixel (B, H*W, V): V = [1, c] (score) or [1, c] x [1, P]
        flattened (jacobian), in float64."""
        B, C, H, W = x.shape
        D = C * k * k
        center = torch.arange(C, device=x.device) * k * k + (k // 2) * k + k // 2
        value_rows = torch.cat([center.new_zeros(1), 1 + center])  # rows [1; c] of the keys
        xflat = pad_images(x, k // 2, self.padding == "circular").flatten(1)
        scale = (a / b2).view(B, 1, 1, 1)
        bias = (-a * a / (2 * b2)).view(B, 1, 1, 1)

        def values_of(keys):  # keys (G, D+3, M) -> values (G, V, M)
            vc = keys[:, value_rows]
            if not jacobian:
                return vc
            return (vc[:, :, None] * keys[:, None, : D + 1]).flatten(1, 2)

        width = (1 + C) * (1 + D) if jacobian else D + 3
        pixels, pieces = [], []
        for (pix, query_index, _), source in zip(self._groups(k, x), self._sources(label, k, x)):
            G, R, _ = query_index.shape
            q = xflat.index_select(1, query_index.reshape(-1)).view(B, G, R, D)
            q = torch.cat([torch.zeros_like(q[..., :1]), q * scale, bias.expand(B, G, R, 1), torch.ones_like(q[..., :1])], -1)
            q = q.transpose(0, 1).reshape(G, B * R, D + 3)  # rows [0, a x_p / b^2, -a^2 / (2 b^2), 1]
            step = _candidates_per_step(G, B * R, width, self.chunk_size)
            fused = not jacobian and len(value_rows) <= 4 and els_kernels.usable(q)
            lib = els_kernels.kernels() if fused else None
            if lib is not None:  # the fused score kernel: chunks as large as the cache holds them (views)
                chunks = source(source.args[0].shape[-1] if source.func is _sliced_keys else step)
                m = els_kernels.score_moments(lib, q, chunks, value_rows, _clamp_floor(q.dtype))
            else:
                m = posterior_moments(q, source(step), values_of)
            pieces.append(m.view(G, B, R, -1).transpose(0, 1).reshape(B, G * R, -1))
            pixels.append(pix.reshape(-1))
        order = torch.argsort(torch.cat(pixels))
        return torch.cat(pieces, 1)[:, order]

    def _remembered_score(self, x, t, k, label) -> Optional[Tensor]:
        """The score saved by the last _jacobian_run if it was for exactly these inputs, else None.
        Only outside autograd (DDIM's no_grad evaluation): a differentiated call always recomputes."""
        last = self._last
        if torch.is_grad_enabled() or last is None or last.k != k or x.shape != last.x.shape or x.dtype != last.x.dtype:
            return None
        if isinstance(label, Tensor) or isinstance(last.label, Tensor):
            same_label = isinstance(label, Tensor) and isinstance(last.label, Tensor) and torch.equal(label, last.label)
        else:
            same_label = label == last.label
        if same_label and torch.equal(t, last.t) and torch.equal(x, last.x):
            return last.score
        return None

    def _score_run(self, x, t, k, label) -> Tensor:
        """The score for samples that share patch size k and label."""
        remembered = self._remembered_score(x, t, k, label)
        if remembered is not None:  # measured the Jacobian here a moment ago: same sums, no second pass
            return remembered
        a, b2 = self._coefficients(t, x)
        B, C, H, W = x.shape
        m = self._moments(x, a, b2, k, label, jacobian=False)  # (B, HW, 1 + C)
        mean = m[..., 1:].transpose(1, 2).reshape(B, C, H, W)
        return -(x - a.view(B, 1, 1, 1) * mean.to(x.dtype)) / b2.view(B, 1, 1, 1)

    def _jacobian_run(self, x, t, k, label) -> Tensor:
        """The closed-form band for samples sharing k and label (SPEC 5.3); remembers the score."""
        a, b2 = self._coefficients(t, x)
        B, C, H, W = x.shape
        D = C * k * k
        m = self._moments(x, a, b2, k, label, jacobian=True).view(B, H * W, 1 + C, 1 + D)
        cov = m[..., 1:, 1:] - m[..., 1:, :1] * m[..., :1, 1:]  # Cov_w(c_i, P_j): (B, HW, C, D)
        center = torch.arange(C, device=x.device) * k * k + (k // 2) * k + k // 2
        delta = torch.zeros(C, D, dtype=torch.float64, device=x.device)
        delta[torch.arange(C), center] = 1
        a64, b64 = a.double().view(B, 1, 1, 1), b2.double().view(B, 1, 1, 1)
        band = (a64**2 / b64**2) * cov - delta / b64
        band = band.view(B, H, W, C, C, k, k).permute(0, 3, 1, 2, 4, 5, 6).to(x.dtype)
        if self.padding == "zeros":
            band = band * _band_valid(H, W, k, x.device)[None, None, :, :, None]
        mean = m[..., 1:, 0].transpose(1, 2).reshape(B, C, H, W)  # E_w[c], the score's posterior mean
        score = -(x - a.view(B, 1, 1, 1) * mean.to(x.dtype)) / b2.view(B, 1, 1, 1)
        self._last = LastScore(x.detach().clone(), t.detach().clone(), k,
                               label.detach().clone() if isinstance(label, Tensor) else label, score.detach())
        return band

    def jacobian(self, t, x: Tensor, label=None) -> Tensor:
        """The closed-form band (B, C, H, W, C, k, k), entry [b, c, y, x, c', dy, dx]
        = d s_{c,y,x} / d x_{c', y+dy-k//2, x+dx-k//2} (0 at zero padding; circular positions wrap)."""
        return super().jacobian(t, x, label)

    def analytic_ed(self, t, x: Tensor, label=None, curl_map: bool = False) -> dict:
        """Exact ed_fro, jac_fro (B,) and the curl map (B, H, W) or None, from the band."""
        return band_ed(self.jacobian(t, x, label), self.padding, curl_map)


class MachineField:
    """A machine's score field at a fixed time (and label): call it, or ask for its analytic ED.
    `edtool.jacobian.ed.exterior_derivative` uses `analytic_ed` when a field has one."""

    def __init__(self, machine: Machine, t, label=None):
        self.machine, self.t, self.label = machine, t, label

    def __call__(self, x: Tensor) -> Tensor:
        return self.machine.score(self.t, x, self.label)

    def analytic_ed(self, x: Tensor, curl_map: bool = False) -> dict:
        """dict(ed_fro=(B,), jac_fro=(B,), curl_map=(B, H, W) or None), exact, from the closed form."""
        return self.machine.analytic_ed(self.t, x, self.label, curl_map)


def make_machine(
    name: str,
    images: Tensor,
    labels: Optional[Tensor] = None,
    patch_size: Optional[int] = None,
    scales: Optional[Sequence[int]] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    paper_circular: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Machine:
    """An ELS-family machine over training images (N, C, H, W) in [-1, 1] (labels (N,) for
    class-conditional use). Give exactly one of patch_size (odd) or scales (odd sizes, entry j
    for t = (j + 1) / len(scales)); `is` takes neither. `els` means `els-borders`; see
    `resolve_machine_name` for circular-padded networks. paper_circular: `els-circular` with
    only fully-inside training windows as candidates (the paper's variant). chunk_size bounds
    the elements of each streamed block; cache_bytes the candidate windows kept between calls,
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
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
        raise ValueError("images must be a non-empty float tensor of shape (N, C, H, W)")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(images),) or labels.is_floating_point():
            raise ValueError(f"labels must be an int tensor of shape ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
    if paper_circular and name != "els-circular":
        raise ValueError("paper_circular applies only to the els-circular machine")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if name == "is":
        if patch_size is not None or scales is not None:
            raise ValueError("the 'is' machine uses the whole image: give neither patch_size nor scales")
        sizes = None
    elif (patch_size is None) == (scales is None):
        raise ValueError(f"machine {name!r} needs exactly one of patch_size=k or scales=[k0, k1, ...]")
    elif patch_size is not None:
        sizes = [check_patch_size(patch_size, "patch_size")]
    else:
        sizes = [check_patch_size(k, f"scales[{j}]") for j, k in enumerate(scales)]
        if not sizes:
            raise ValueError("scales must list at least one patch size")
    if sizes is not None:
        check_fits(sizes, images.shape, "patch size", whole=True)
    if name == "els-circular" and paper_circular:
        H, W = images.shape[-2:]
        if max(sizes) > min(H, W):
            raise ValueError(f"the paper's circular machine needs patch sizes <= image size {H}x{W}, got {max(sizes)}")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
    if name == "is":
        return IdealMachine(images, labels, chunk_size, cache_bytes)
    return LocalMachine(name, images, labels, sizes, chunk_size, cache_bytes, paper_circular)


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
