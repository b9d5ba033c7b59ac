"""The streaming engine of the ELS machines: posterior moments over chunks of candidate keys
(`posterior_moments`, its torch path; edtool.els.kernel holds the fused CPU kernels), and the key
sources it streams (gathered windows, whole images, slices of cached keys)."""

import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor



def posterior_moments(queries: Tensor, key_chunks: Iterable[Tensor], values_of: Callable[[Tensor], Tensor],
                      checked: bool = True) -> Tensor:
    """Posterior means E_w[values] for every query row, streamed over chunks of candidates.

    Keys come as (G, D+2, M) columns [1; P; |P|^2] and queries (G, R, D+2) as rows
    [0, a x_p / b^2, -a^2 / (2 b^2)], so queries @ keys = -||x_p - a P||^2 / (2 b^2) up to a
    per-row constant: one matrix product per chunk. A running shift s (G, R), kept at or just
    above the largest log weight seen, is folded into that product through the ones row, so a
    chunk costs one product, one exp and one product with values_of(keys) (G, V, M), whose
    first row must be ones (it carries sum w). Where a chunk would overflow (a candidate far
    better than any before) its rows are shifted up to its own max; that check reads a number
    from the device for every chunk (a host sync on a GPU), and `checked=False` leaves it out
    (`streamed_moments` checks the result once instead). Sums are float64; the result is
    (G, R, V), normalized (its first column is 1).
    """
    grad = torch.is_grad_enabled()  # in-place ops are faster but autograd can't see through them
    shift, sums, buffer, bounded = None, None, None, True
    for keys in key_chunks:
        if shift is None:  # first chunk: start from its exact max
            shift = torch.bmm(queries.detach(), keys.detach()).amax(-1)
        q = torch.cat([-shift[..., None].to(queries.dtype), queries[..., 1:]], -1)
        values = values_of(keys)  # (G, V, M)
        logw = torch.bmm(q, keys)  # log w - s
        if logw.device.type == "cpu":  # CPUs are ~4x slower on subnormal exp results, which weigh < 1e-30 anyway
            floor = clamp_floor(logw.dtype)
            bounded = bounded and _above(q.detach(), keys.detach(), floor)  # after one miss, stop trying
            if not bounded:
                logw = logw.clamp(min=floor) if grad else logw.clamp_(min=floor)
        if not grad and (buffer is None or buffer.numel() < logw.numel()):
            buffer = torch.empty_like(logw).view(-1)
        part = _weighted_sums(_exp(logw, buffer), values).double()
        if checked and not bool((part[..., 0] < 1e30).all()):  # exp overflowed or nearly: lift rows to the chunk max
            lift = logw.detach().amax(-1).clamp(min=0)
            part = _weighted_sums(_exp(logw - lift[..., None], buffer), values).double()
            sums = None if sums is None else sums * (-lift).double().exp()[..., None]
            shift = shift + lift
        sums = part if sums is None else sums + part
        grow = part[..., 0].detach().log().clamp(min=0)  # keep the shift >= every log weight seen
        sums = sums * (-grow).exp()[..., None]
        shift = shift + grow.to(shift.dtype)
    return sums / sums[..., :1]


def streamed_moments(queries: Tensor, source: Callable[[int], Iterable[Tensor]], step: int,
                     values_of: Callable[[Tensor], Tensor]) -> Tensor:
    """posterior_moments over the chunks source(step), with one host sync per call instead of one per
    chunk: unchecked first; a chunk that overflowed leaves inf or NaN in the result (an overflowing sum
    of weights turns the rescaled sums into inf * 0), and only then is the call redone checked. Without
    overflow every operation is the checked path's, so the numbers are the same."""
    moments = posterior_moments(queries, source(step), values_of, checked=False)
    if bool(torch.isfinite(moments).all()):
        return moments
    return posterior_moments(queries, source(step), values_of)


def clamp_floor(dtype) -> float:
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


CPU_CHUNK_SIZE = 2**20  # elements per streamed block on a CPU: 4 MiB in float32, cache-sized
# (mnist5k, k = 3: 10 % faster than 2**22; 2**18 is slower again, per-block overhead)
CUDA_CHUNK_SIZE = 2**27  # at most, on a GPU: 512 MiB blocks in float32, so a call is a few large kernels
BLOCKS_IN_MEMORY = 16  # blocks of one chunk's size a step may hold at once (logits, weights, values, keys, copies)


def chunk_size_for(device_type: str, free_bytes: int, element_size: int = 4) -> int:
    """Elements per streamed block on a device: cache-sized on a CPU; on CUDA as large as
    BLOCKS_IN_MEMORY blocks in the free memory allow, up to CUDA_CHUNK_SIZE (never below the CPU's)."""
    if device_type != "cuda":
        return CPU_CHUNK_SIZE
    return max(CPU_CHUNK_SIZE, min(CUDA_CHUNK_SIZE, free_bytes // (BLOCKS_IN_MEMORY * element_size)))


def candidates_per_step(G: int, rows: int, width: int, chunk_size: int) -> int:
    """How many candidates one step may take so no block (G x rows x M logits, G x width x M
    keys/values) exceeds chunk_size elements."""
    return max(1, chunk_size // (G * max(rows, width)))


def gathered_keys(train_flat: Tensor, key_index: Tensor, step: int):
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


def image_keys(train_flat: Tensor, step: int):
    """Yield whole-image keys (1, n+2, M) = [1; y; |y|^2], M <= step (the `is` machine)."""
    for i in range(0, len(train_flat), step):
        y = train_flat[i : i + step].T
        yield torch.cat([torch.ones_like(y[:1]), y, y.square().sum(0, keepdim=True)])[None]


def sliced_keys(keys: Tensor, step: int):
    """Yield consecutive slices (G, rows, <= step) of cached keys."""
    for m in range(0, keys.shape[-1], step):
        yield keys[..., m : m + step]


def fill_from(out: Tensor, source) -> Tensor:
    """Concatenate a key source's chunks along candidates into the preallocated `out`."""
    m = 0
    for keys in source(2**22 // out.shape[1] + 1):
        out[..., m : m + keys.shape[-1]] = keys
        m += keys.shape[-1]
    return out
