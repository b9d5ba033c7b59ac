"""The engine as of 2e567e5 (before issue 13: every candidate window scored), kept verbatim so
bench_machines.py --before can time it side by side with the current one. Not imported by edtool."""

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

The Jacobian has a closed form (SPEC 5.3): d s_p / d x_q = (a^2/b^4) Cov_w(c, P[q - p]) -
delta_pq / b^2 for q in p's window, so it is a band of C*k*k numbers per output number, and
`band_ed` turns the band into ||J - J^T||_F, ||J||_F and the curl map exactly.

    m = make_machine("els-borders", images, labels, patch_size=5)
    with torch.no_grad():
        s = m.score(0.5, x)                     # (B, C, H, W)
    res = m.field(0.5).analytic_ed(x, curl_map=True)
"""

import math
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from edtool.diffusion import alpha_bar, beta, score_to_eps

MACHINES = ("is", "ls", "els-circular", "els-borders")
ALIASES = {"els": "els-borders"}
PADDINGS = ("zeros", "circular")
DEFAULT_CHUNK_SIZE = 2**22  # elements per streamed block (logits, keys or values): 16 MiB in float32
DEFAULT_CACHE_BYTES = 4 * 2**30  # candidate keys kept between calls (mnist5k at k = 11: 2.5 GB)


# ---------------------------------------------------------------------------------------------
# Names and settings
# ---------------------------------------------------------------------------------------------


def resolve_machine_name(name: str, padding: str = "zeros") -> str:
    """The machine name to use next to a network with this padding: `els` means the circular
    machine for a circular-padded network and `els-borders` for a zero-padded one."""
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}")
    if name == "els":
        return "els-circular" if padding == "circular" else "els-borders"
    if name not in MACHINES:
        raise ValueError(f"unknown machine {name!r}; choose one of {', '.join(MACHINES + ('els',))}")
    return name


def _check_patch_size(k, what: str) -> int:
    """An odd positive int, or a ValueError that says so."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"{what} must be an odd integer >= 1 (3, 5, 7, ...), got {k!r}")
    return k


def scale_index(t: float, nscales: int) -> int:
    """Entry j of a scale schedule that applies at time t (entry j is for t = (j + 1) / N).
    The tolerance absorbs float32 rounding of t = (j + 1) / N (DDIM's times arrive as float32)."""
    return min(max(math.ceil(t * nscales - 1e-4) - 1, 0), nscales - 1)


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
    shift, sums, buffer = None, None, None
    for keys in key_chunks:
        if shift is None:  # first chunk: start from its exact max
            shift = torch.bmm(queries.detach(), keys.detach()).amax(-1)
        logw = torch.bmm(torch.cat([-shift[..., None].to(queries.dtype), queries[..., 1:]], -1), keys)  # log w - s
        if logw.device.type == "cpu":  # CPUs are ~4x slower on subnormal exp results, which weigh < 1e-30 anyway
            floor = math.log(torch.finfo(logw.dtype).tiny) + 8
            logw = logw.clamp(min=floor) if grad else logw.clamp_(min=floor)
        if not grad and (buffer is None or buffer.numel() < logw.numel()):
            buffer = torch.empty_like(logw).view(-1)
        values = values_of(keys).transpose(1, 2)
        part = torch.bmm(_exp(logw, buffer), values).double()
        if not bool((part[..., 0] < 1e30).all()):  # exp overflowed or nearly: lift those rows to the chunk max
            lift = logw.detach().amax(-1).clamp(min=0)
            part = torch.bmm(_exp(logw - lift[..., None], buffer), values).double()
            sums = None if sums is None else sums * (-lift).double().exp()[..., None]
            shift = shift + lift
        sums = part if sums is None else sums + part
        grow = part[..., 0].detach().log().clamp(min=0)  # keep the shift >= every log weight seen
        sums = sums * (-grow).exp()[..., None]
        shift = shift + grow.to(shift.dtype)
    return sums / sums[..., :1]


def _exp(logw: Tensor, buffer: Optional[Tensor]) -> Tensor:
    """exp(logw), written into a reused buffer when one is given (no autograd)."""
    if buffer is None:
        return logw.exp()
    return torch.exp(logw, out=buffer[: logw.numel()].view_as(logw))


def _candidates_per_step(G: int, rows: int, width: int, chunk_size: int) -> int:
    """How many candidates one step may take so no block (G x rows x M logits, G x width x M
    keys/values) exceeds chunk_size elements."""
    return max(1, chunk_size // (G * max(rows, width)))


def _gathered_keys(train_flat: Tensor, key_index: Tensor, step: int):
    """Yield candidate keys (G, D+2, M) = [1; P; |P|^2], M <= step, gathered from the flat
    padded training images for the window offsets key_index (G, L, D): every image, every
    position."""
    N = train_flat.shape[0]
    G, L, D = key_index.shape
    positions = min(step, L)
    images = max(1, step // L)
    for i in range(0, N, images):
        block = train_flat[i : i + images]
        for l in range(0, L, positions):
            P = block[:, key_index[:, l : l + positions]]  # (n, G, l, D)
            P = P.permute(1, 3, 0, 2).reshape(G, D, -1)
            yield torch.cat([torch.ones_like(P[:, :1]), P, P.square().sum(1, keepdim=True)], 1)


def _image_keys(train_flat: Tensor, step: int):
    """Yield whole-image keys (1, n+2, M) = [1; y; |y|^2], M <= step (the `is` machine)."""
    for i in range(0, len(train_flat), step):
        y = train_flat[i : i + step].T
        yield torch.cat([torch.ones_like(y[:1]), y, y.square().sum(0, keepdim=True)])[None]


def _sliced_keys(keys: Tensor, step: int):
    """Yield consecutive slices (G, D+2, <= step) of cached keys."""
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


class Machine:
    """One analytic score machine over a fixed training set: `.score`, `.eps`, `.jacobian`, `.field`."""

    def __init__(self, name, images, labels, patch_sizes, chunk_size, paper_circular, cache_bytes):
        self.name = name
        self.padding = "circular" if name == "els-circular" else "zeros"
        self.patch_sizes = patch_sizes  # None for `is`, else one size per scale entry
        self.chunk_size = chunk_size
        self.cache_bytes = cache_bytes
        self.paper_circular = paper_circular
        self.images = images
        self.labels = labels
        self._cache = {}  # padded training images and window indices
        self._keys = OrderedDict()  # candidate keys per (label, k, dtype, device), within cache_bytes
        self._last_score = None  # (x, t, k, label, score) of the last Jacobian: DDIM asks for that score next

    # -- settings ---------------------------------------------------------------------------

    def patch_size_at(self, t: float) -> Optional[int]:
        """The patch size used at time t (None for `is`, which uses the whole image)."""
        if self.patch_sizes is None:
            return None
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

    def _subsets(self, t: Tensor, label: Optional[Tensor]):
        """Split the batch into runs that share one patch size and one label: [(index, k, label)]."""
        ks = [self.patch_size_at(v) for v in t.tolist()]
        labs = [None] * len(ks) if label is None else label.tolist()
        runs = {}
        for b, key in enumerate(zip(ks, labs)):
            runs.setdefault(key, []).append(b)
        return [(torch.tensor(idx, device=t.device), k, lab) for (k, lab), idx in runs.items()]

    # -- cached training data ---------------------------------------------------------------

    def _train(self, label, k, x: Tensor) -> Tensor:
        """The training images with this label, padded for patch size k and flattened: (N, F)."""
        key = ("train", label, k, x.dtype, x.device)
        if key not in self._cache:
            images = self.images
            if label is not None:
                images = images[self.labels == label]
                if len(images) == 0:
                    raise ValueError(f"no training images have label {label}")
            images = images.to(device=x.device, dtype=x.dtype)
            r = 0 if k is None else k // 2
            self._cache[key] = pad_images(images, r, self.padding == "circular").flatten(1).contiguous()
        return self._cache[key]

    def _groups(self, k: int, x: Tensor) -> list:
        """The stacked candidate cells of this machine for patch size k, on x's device."""
        key = ("groups", k, x.device)
        if key not in self._cache:
            C, H, W = x.shape[1:]
            cells = candidate_cells(self.name, H, W, k, self.paper_circular)
            self._cache[key] = _stack_cells(cells, C, H, W, k, x.device)
        return self._cache[key]

    def _candidates(self, label, k, x: Tensor) -> list:
        """Per group, a function step -> chunks (G, D+2, <= step) of its candidate keys
        [1; P; |P|^2]: slices of the key cache when the whole set fits `cache_bytes` (the
        least recently used sets make room), else gathered from the padded images."""
        train = self._train(label, k, x)
        if k is None:  # `is`: one group, the whole images are the windows
            sources = [lambda step: _image_keys(train, step)]
            shapes = [(1, train.shape[1] + 2, len(train))]
        else:
            groups = self._groups(k, x)
            sources = [lambda step, idx=key_index: _gathered_keys(train, idx, step) for _, _, key_index in groups]
            shapes = [(idx.shape[0], idx.shape[2] + 2, len(train) * idx.shape[1]) for _, _, idx in groups]
        key = (label, k, x.dtype, x.device)
        if key not in self._keys:
            need = sum(math.prod(shape) for shape in shapes) * train.element_size()
            if need > self.cache_bytes:
                return sources
            while self._keys and need + sum(sum(t.nbytes for t in v) for v in self._keys.values()) > self.cache_bytes:
                self._keys.popitem(last=False)
            self._keys[key] = [_fill(train.new_empty(shape), source) for shape, source in zip(shapes, sources)]
        self._keys.move_to_end(key)
        return [lambda step, keys=keys: _sliced_keys(keys, step) for keys in self._keys[key]]

    # -- the engine, per run ----------------------------------------------------------------

    def _local_moments(self, x, a, b2, k, label, jacobian: bool) -> Tensor:
        """Posterior moments per pixel (B, H*W, V): V = [1, c] (score) or [1, c] x [1, P]
        flattened (jacobian), in float64."""
        B, C, H, W = x.shape
        D = C * k * k
        center = torch.arange(C, device=x.device) * k * k + (k // 2) * k + k // 2
        value_rows = torch.cat([center.new_zeros(1), 1 + center])  # rows [1; c] of the keys
        xflat = pad_images(x, k // 2, self.padding == "circular").flatten(1)
        scale = (a / b2).view(B, 1, 1, 1)
        bias = (-a * a / (2 * b2)).view(B, 1, 1, 1)

        def values_of(keys):  # keys (G, D+2, M) -> values (G, V, M)
            vc = keys[:, value_rows]
            if not jacobian:
                return vc
            return (vc[:, :, None] * keys[:, None, : D + 1]).flatten(1, 2)

        width = (1 + C) * (1 + D) if jacobian else D + 2
        pixels, pieces = [], []
        for (pix, query_index, _), source in zip(self._groups(k, x), self._candidates(label, k, x)):
            G, R, _ = query_index.shape
            q = xflat[:, query_index]  # (B, G, R, D)
            q = torch.cat([torch.zeros_like(q[..., :1]), q * scale, bias.expand(B, G, R, 1)], -1)
            q = q.transpose(0, 1).reshape(G, B * R, D + 2)
            step = _candidates_per_step(G, B * R, width, self.chunk_size)
            m = posterior_moments(q, source(step), values_of)
            pieces.append(m.view(G, B, R, -1).transpose(0, 1).reshape(B, G * R, -1))
            pixels.append(pix.reshape(-1))
        order = torch.argsort(torch.cat(pixels))
        return torch.cat(pieces, 1)[:, order]

    def _ideal_queries(self, x, a, b2) -> Tensor:
        """Rows [0, a x / b^2, -a^2 / (2 b^2)] (1, B, n+2) for whole-image candidates."""
        q = x.flatten(1) * (a / b2)[:, None]
        return torch.cat([torch.zeros_like(q[:, :1]), q, (-a * a / (2 * b2))[:, None]], -1)[None]

    def _ideal_mean(self, x, a, b2, label) -> Tensor:
        """E_w[y] (B, n) over whole training images y: the ideal (empirical) score's posterior."""
        n = x[0].numel()
        (source,) = self._candidates(label, None, x)
        step = _candidates_per_step(1, x.shape[0], n + 2, self.chunk_size)
        moments = posterior_moments(self._ideal_queries(x, a, b2), source(step), lambda keys: keys[:, : n + 1])
        return moments[0, :, 1:]

    def _remembered_score(self, x, t, k, label) -> Optional[Tensor]:
        """The score saved by the last _jacobian_run if it was for exactly these inputs, else None.
        Only outside autograd (DDIM's no_grad evaluation): a differentiated call always recomputes."""
        last = self._last_score
        if torch.is_grad_enabled() or last is None or last[2] != k or x.shape != last[0].shape or x.dtype != last[0].dtype:
            return None
        if isinstance(label, Tensor) or isinstance(last[3], Tensor):
            same_label = isinstance(label, Tensor) and isinstance(last[3], Tensor) and torch.equal(label, last[3])
        else:
            same_label = label == last[3]
        if same_label and torch.equal(t, last[1]) and torch.equal(x, last[0]):
            return last[4]
        return None

    def _score_run(self, x, t, k, label) -> Tensor:
        """The score for samples that share patch size k and label."""
        remembered = self._remembered_score(x, t, k, label)
        if remembered is not None:  # measured the Jacobian here a moment ago: same sums, no second pass
            return remembered
        a, b2 = self._coefficients(t, x)
        B, C, H, W = x.shape
        if k is None:
            mean = self._ideal_mean(x, a, b2, label).view_as(x)
        else:
            m = self._local_moments(x, a, b2, k, label, jacobian=False)  # (B, HW, 1 + C)
            mean = m[..., 1:].transpose(1, 2).reshape(B, C, H, W)
        ab = a.view(B, 1, 1, 1)
        return -(x - ab * mean.to(x.dtype)) / b2.view(B, 1, 1, 1)

    def _jacobian_run(self, x, t, k, label) -> Tensor:
        """The closed-form Jacobian for samples sharing k and label: band, or dense for `is`."""
        a, b2 = self._coefficients(t, x)
        B, C, H, W = x.shape
        if k is None:
            return self._ideal_jacobian(x, a, b2, label)
        D = C * k * k
        m = self._local_moments(x, a, b2, k, label, jacobian=True).view(B, H * W, 1 + C, 1 + D)
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
        self._last_score = (x.detach().clone(), t.detach().clone(), k,
                            label.detach().clone() if isinstance(label, Tensor) else label, score.detach())
        return band

    def _ideal_jacobian(self, x, a, b2, label) -> Tensor:
        """Dense (B, n, n) Jacobian of the ideal score: (a^2/b^4) Cov_w(y) - I/b^2; weights below
        eps^2 of the total are dropped (their share is below float precision)."""
        train = self._train(label, None, x)  # (N, n)
        B, n = x.shape[0], train.shape[1]
        (source,) = self._candidates(label, None, x)
        q = self._ideal_queries(x, a, b2)
        step = _candidates_per_step(1, B, n + 2, self.chunk_size)
        w = torch.softmax(torch.cat([torch.bmm(q, keys)[0] for keys in source(step)], -1).double(), -1)
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

    # -- public -----------------------------------------------------------------------------

    def score(self, t, x: Tensor, label=None) -> Tensor:
        """The machine's score s(t, x) (B, C, H, W); t a float or (B,), label None or (B,)."""
        self._check_x(x)
        t = self._times(t, x)
        label = self._labels(label, x.shape[0], x.device)
        runs = self._subsets(t, label)
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
        """The closed-form score Jacobian: band (B, C, H, W, C, k, k), entry [b, c, y, x, c', dy, dx]
        = d s_{c,y,x} / d x_{c', y+dy-k//2, x+dx-k//2} (0 at zero padding; circular positions wrap);
        for `is` the dense (B, n, n) matrix."""
        self._check_x(x)
        t = self._times(t, x)
        label = self._labels(label, x.shape[0], x.device)
        runs = self._subsets(t, label)
        if len({k for _, k, _ in runs}) > 1:
            raise ValueError("jacobian: all samples of a batch must use the same patch size; split the batch by t")
        idx = torch.cat([i for i, _, _ in runs])
        parts = [self._jacobian_run(x[i], t[i], k, lab) for i, k, lab in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(idx)]

    def analytic_ed(self, t, x: Tensor, label=None, curl_map: bool = False) -> dict:
        """Exact ed_fro, jac_fro (B,) and the curl map (B, H, W) or None, from the closed form."""
        C, H, W = x.shape[1:]
        if self.name == "is":  # one sample at a time: the dense Jacobian is n x n
            t = self._times(t, x)
            label = self._labels(label, x.shape[0], x.device)
            res = [
                dense_ed(self.jacobian(t[b : b + 1], x[b : b + 1], None if label is None else label[b : b + 1]), (C, H, W), curl_map)
                for b in range(x.shape[0])
            ]
            return {key: None if res[0][key] is None else torch.cat([r[key] for r in res]) for key in res[0]}
        return band_ed(self.jacobian(t, x, label), self.padding, curl_map)

    def field(self, t, label=None) -> "MachineField":
        """The score field x -> s(t, x) at one time, with its exact `analytic_ed`."""
        return MachineField(self, t, label)

    def __repr__(self):
        sizes = "whole image" if self.patch_sizes is None else self.patch_sizes
        return f"Machine({self.name!r}, {len(self.images)} images, patch sizes {sizes})"


class MachineField:
    """A machine's score field at a fixed time (and label): call it, or ask for its analytic ED.
    `edtool.ed.exterior_derivative` uses `analytic_ed` when a field has one."""

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
    the elements of each streamed block; cache_bytes the candidate windows kept between calls
    (beyond it they are gathered afresh at every call: slower, same numbers)."""
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
        sizes = [_check_patch_size(patch_size, "patch_size")]
    else:
        sizes = [_check_patch_size(k, f"scales[{j}]") for j, k in enumerate(scales)]
        if not sizes:
            raise ValueError("scales must list at least one patch size")
    if name == "els-circular" and paper_circular:
        H, W = images.shape[-2:]
        if max(sizes) > min(H, W):
            raise ValueError(f"the paper's circular machine needs patch sizes <= image size {H}x{W}, got {max(sizes)}")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
    return Machine(name, images, labels, sizes, chunk_size, paper_circular, cache_bytes)
