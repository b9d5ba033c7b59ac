"""The Jacobian seen whole (SPEC 12): how local a score field is, and how close two fields' Jacobians are.

For one sample with image shape (C, H, W) the score Jacobian J is n x n (n = C*H*W). Entry
J[(c, p), (c', q)] links output pixel p with input pixel q; their distance is the Chebyshev
distance d(p, q) = max(|p_y - q_y|, |p_x - q_x|) (on the torus for circular padding).

- Locality profile: `loc_jac[r]` = sum over d(p, q) <= r of J^2 / ||J||_F^2, r = 0..R, and `loc_ed[r]`
  the same for D = J - J^T. r90 = the smallest r with loc[r] >= 0.9.
- Alignment: `align_jac` = <J_a, J_b>_F / (||J_a||_F ||J_b||_F), `align_ed` the same for D_a, D_b.

Every measurement takes a *Jacobian operator* (`edtool.jacobian.operators.JacobianOperator`, one per batch):
a dense matrix (`DenseJacobian`), the ELS machines' closed-form band (`BandJacobian`) or a field at a
point (`FieldJacobian`, products by autograd, the dense matrix from chunked VJPs).
Exact numbers come from the dense matrix or the band; without them:
- locality by *masked probes*: for m output pixels p drawn without replacement, the probes e_(c,p)
  give row (c, p) of J (one VJP) and of J^T (one JVP); masking those rows by distance shell gives
  every shell's energy of row p at once. loc[r] is a ratio estimator over the drawn pixels, with a
  delta-method standard error (finite-population corrected: all pixels drawn = exact, error 0).
- alignment by Hutchinson: <A, B>_F = E[(A v) . (B v)] with Rademacher v, error by the delta method.

    op = jacobian_operator(model.field(t), x)        # edtool.jacobian.operators; or any x -> s(x) callable
    loc = locality(op, radius=16)                     # loc.loc_jac (B, 17), loc.r90_jac (B,)
    al = alignment(op, jacobian_operator(els_field, x))
"""

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from edtool.config import LOCALITY_METHODS, PROBES
from edtool.els.band import band_transpose, dense_jacobian
from edtool.jacobian.operators import BandJacobian, JacobianOperator, per_sample_seeds, rademacher_probes

LEVEL = 0.9  # r90: the radius holding this fraction of the squared Frobenius norm
# An antisymmetric part below this fraction of ||J||_F is float rounding of a symmetric J (float32 eps
# is 1.2e-7 per entry): its direction is noise, so an alignment with it is undefined (NaN), not 0.
SYMMETRIC_RTOL = 1e-5
ALIGNMENT_METHODS = ("auto", "exact", "hutchinson")


# ----------------------------------------------------------------------------- geometry


def default_radius(shape: Sequence[int]) -> int:
    """R = half the image size: radii 0..R are reported."""
    return max(shape[-2:]) // 2


def pixel_distances(pixels: Tensor, H: int, W: int, circular: bool = False) -> Tensor:
    """Chebyshev distance (K, H*W) from each flat pixel index in `pixels` (K,) to every pixel."""
    py, px = (pixels // W)[:, None], (pixels % W)[:, None]
    q = torch.arange(H * W, device=pixels.device)
    dy, dx = (q // W - py).abs(), (q % W - px).abs()
    if circular:
        dy, dx = torch.minimum(dy, H - dy), torch.minimum(dx, W - dx)
    return torch.maximum(dy, dx)


def _shells_per_row(energy: Tensor, dist: Tensor, radius: int) -> Tensor:
    """Sum each row of `energy` (..., HW) into distance shells 0..radius plus one bin for d > radius,
    by the distances `dist` (broadcast to energy): (..., radius + 2)."""
    idx = dist.clamp(max=radius + 1).expand_as(energy)
    return energy.new_zeros(*energy.shape[:-1], radius + 2).scatter_add_(-1, idx, energy)


def _shells(energy: Tensor, dist: Tensor, radius: int) -> Tensor:
    """Shell sums (..., radius + 2) of rows (..., K, HW) added over the K rows."""
    return _shells_per_row(energy, dist, radius).sum(-2)


def profile(shells: Tensor) -> Tensor:
    """loc[r] (..., R + 1) from shell energies (..., R + 2) whose last bin is everything beyond R.
    The total is the last cumulative sum, so a profile whose energy ends at shell r is exactly 1 from r.
    NaN where the total is zero or not finite."""
    cum = shells.cumsum(-1)
    total = cum[..., -1:]
    loc = cum[..., :-1] / total
    return torch.where((total > 0) & torch.isfinite(total), loc, torch.full_like(loc, math.nan))


def r90(loc: Tensor, level: float = LEVEL) -> Tensor:
    """The smallest radius r with loc[r] >= level, as float (...,); NaN when the profile is NaN or never
    reaches the level within the radii given (then the effective radius is beyond R)."""
    reached = loc >= level
    first = reached.to(torch.uint8).argmax(-1).to(loc.dtype)
    return torch.where(reached.any(-1), first, torch.full_like(first, math.nan))


# ----------------------------------------------------------------------------- exact profiles


def locality_dense(J: Tensor, shape: Sequence[int], radius: Optional[int] = None, circular: bool = False,
                   block: int = 256) -> dict:
    """Exact loc_jac, loc_ed (B, R + 1) of dense Jacobians J (B, n, n) of images `shape` (C, H, W),
    accumulated `block` output pixels at a time in float64."""
    C, H, W = shape
    R = default_radius(shape) if radius is None else int(radius)
    B, n = J.shape[0], C * H * W
    if J.shape != (B, n, n):
        raise ValueError(f"J must be (B, {n}, {n}) for images {tuple(shape)}, got {tuple(J.shape)}")
    Jv = J.view(B, C, H * W, C, H * W)
    e_jac = J.new_zeros(B, R + 2, dtype=torch.float64)
    e_ed = torch.zeros_like(e_jac)
    for p0 in range(0, H * W, block):
        pix = torch.arange(p0, min(p0 + block, H * W), device=J.device)
        dist = pixel_distances(pix, H, W, circular)
        rows = Jv[:, :, pix].double()  # (B, C, K, C, HW): rows of J at these output pixels
        cols = Jv[:, :, :, :, pix].double().permute(0, 3, 4, 1, 2)  # J^T rows: J[q, p] as [b, c, p, c', q]
        e_jac += _shells(rows.square().sum((1, 3)), dist, R)
        e_ed += _shells((rows - cols).square().sum((1, 3)), dist, R)
    return {"loc_jac": profile(e_jac), "loc_ed": profile(e_ed)}


def _band_offsets(k: int, device) -> Tensor:
    """Chebyshev length (k, k) of each window offset (dy - k//2, dx - k//2)."""
    o = (torch.arange(k, device=device) - k // 2).abs()
    return torch.maximum(o[:, None], o[None, :])


def locality_band(band: Tensor, padding: str, radius: Optional[int] = None) -> dict:
    """Exact loc_jac, loc_ed (B, R + 1) of a closed-form band (B, C, H, W, C, k, k) (SPEC 5.3): each
    window offset has one distance, so the profile is 1 from r = (k - 1)/2 on by construction."""
    B, C, H, W, _, k, _ = band.shape
    R = default_radius((H, W)) if radius is None else int(radius)
    circular = padding == "circular"
    if circular and k > min(H, W):  # a window meets a pixel twice: its distances fold, go through dense J
        return locality_dense(dense_jacobian(band, padding), (C, H, W), R, circular=True)
    dist = _band_offsets(k, band.device).flatten()[None]  # (1, k*k)
    asym = band - band_transpose(band, circular)
    e_jac = _shells(band.double().square().sum((1, 2, 3, 4)).flatten(1)[:, None], dist, R)
    e_ed = _shells(asym.double().square().sum((1, 2, 3, 4)).flatten(1)[:, None], dist, R)
    return {"loc_jac": profile(e_jac), "loc_ed": profile(e_ed)}


def exact_profiles(op: JacobianOperator, radius: int, max_memory: int = 2**30) -> Optional[dict]:
    """Exact loc_jac, loc_ed of an operator: from its band, or from its dense Jacobians when they fit in
    max_memory bytes (None when they do not)."""
    if isinstance(op, BandJacobian):
        return locality_band(op.band, op.padding, radius)
    J = op.dense(max_memory)
    return None if J is None else locality_dense(J, op.shape, radius, op.circular)


# ----------------------------------------------------------------------------- locality


@dataclass
class LocalityResult:
    """Per-sample profiles (B, R + 1) with standard errors (0 when exact), r90 (B,) and how they were made."""

    loc_jac: Tensor
    loc_ed: Tensor
    loc_jac_stderr: Tensor
    loc_ed_stderr: Tensor
    r90_jac: Tensor
    r90_ed: Tensor
    method: str
    pixels: int  # output pixels probed; all of them for exact


def _ratio(a: Tensor, t: Tensor, population: int) -> tuple:
    """Ratio estimator sum(a)/sum(t) over m drawn units (dim 0) and its delta-method standard error,
    finite-population corrected for m of `population` drawn without replacement."""
    m = a.shape[0]
    est = a.sum(0) / t.sum(0)
    resid = a - est * t
    fpc = 1 - m / population
    var = fpc * resid.square().sum(0) / (m * (m - 1)) / t.mean(0).square()
    return est, var.clamp(min=0).sqrt()


def locality_probes(op: JacobianOperator, radius: int, pixels: int = 64, seed=0, max_memory: int = 2**30) -> tuple:
    """Masked-probe estimates of loc_jac, loc_ed (B, R + 1) and their standard errors.

    For each sample, `pixels` output pixels p are drawn without replacement (seeded per sample); the
    probes e_(c, p) give row (c, p) of J (J^T e) and of J^T (J e); each row's squares are binned by
    the distance of their input pixel to p, so all radius shells come from the same 2 C products.
    """
    C, H, W = op.shape
    B, N = op.batch, H * W
    m = min(int(pixels), N)
    if m < 2:
        raise ValueError(f"the probe estimator needs at least 2 pixels (for an error bar), got {pixels}")
    gens = [torch.Generator().manual_seed(s) for s in per_sample_seeds(seed, B)]
    drawn = torch.stack([torch.randperm(N, generator=g)[:m] for g in gens], 1)  # (m, B) flat pixel indices
    dev, dtype = op.device, op.dtype
    chunk = max(1, (op.chunk(max_memory) or 64) // C)
    e_jac, e_ed = [], []
    for i0 in range(0, m, chunk):
        pix = drawn[i0:i0 + chunk].to(dev)  # (K, B)
        K = pix.shape[0]
        V = torch.zeros(K, C, B, C, N, dtype=dtype, device=dev)  # probe (i, c): e_(c, pix[i, b]) in sample b
        for c in range(C):
            V[:, c, :, c, :] = F.one_hot(pix, N).to(dtype)
        V = V.view(K * C, B, C, H, W)
        u, w = op.products(V)  # u = J e = row of J^T, w = J^T e = row of J
        rows = w.double().view(K, C, B, C, N)
        cols = u.double().view(K, C, B, C, N)
        dist = pixel_distances(pix.flatten(), H, W, op.circular).view(K, B, N)
        e_jac.append(_shells_per_row(rows.square().sum((1, 3)), dist, radius))
        e_ed.append(_shells_per_row((rows - cols).square().sum((1, 3)), dist, radius))
    out = []
    for e in (torch.cat(e_jac), torch.cat(e_ed)):  # (m, B, R + 2)
        cum = e.cumsum(-1)
        est, se = _ratio(cum[..., :-1], cum[..., -1:], N)
        bad = ~(cum[..., -1].sum(0) > 0)
        out += [torch.where(bad[:, None], math.nan, est), torch.where(bad[:, None], math.nan, se)]
    return tuple(out)


def locality(op: JacobianOperator, radius: Optional[int] = None, method: str = "auto", pixels: int = 64, seed=0,
             max_memory: int = 2**30) -> LocalityResult:
    """Locality profiles of the Jacobians in `op` (SPEC 12).

    method: `exact` (the band, or the dense Jacobian), `probe` (masked probes on `pixels` output
    pixels, seeded by `seed`, one int or one per sample) or `auto` (exact when the dense Jacobian fits
    in max_memory bytes, or the operator is a band; else probe).
    """
    if method not in LOCALITY_METHODS:
        raise ValueError(f"unknown locality method {method!r}; choose one of {LOCALITY_METHODS}")
    R = default_radius(op.shape) if radius is None else int(radius)
    if R < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    res = None
    if method in ("auto", "exact"):
        res = exact_profiles(op, R, max_memory)
        if res is None and method == "exact":
            n = math.prod(op.shape)
            raise ValueError(f"the exact Jacobians of {op.batch} samples with {n} numbers do not fit in "
                             f"max_memory={max_memory / 2**30:.2f} GiB; raise it or use method='probe'")
    if res is not None:
        zero = torch.zeros_like(res["loc_jac"])
        lj, le, sj, se, used, how = res["loc_jac"], res["loc_ed"], zero, zero.clone(), op.shape[1] * op.shape[2], "exact"
    else:
        lj, sj, le, se = locality_probes(op, R, pixels, seed, max_memory)
        used, how = min(int(pixels), op.shape[1] * op.shape[2]), "probe"
    bad = ~op.finite.to(lj.device)[:, None]  # a sample whose score is not finite has no profile
    lj, le, sj, se = (torch.where(bad, math.nan, v) for v in (lj, le, sj, se))
    return LocalityResult(lj, le, sj, se, r90(lj), r90(le), how, used)


# ----------------------------------------------------------------------------- alignment


@dataclass
class AlignmentResult:
    """Per-sample alignments (B,) with standard errors (0 when exact); `reason` says why a value is NaN."""

    align_jac: Tensor
    align_ed: Tensor
    align_jac_stderr: Tensor
    align_ed_stderr: Tensor
    method: str
    probes: int
    reason: Optional[str]


def _cosine(dot: Tensor, na: Tensor, nb: Tensor) -> Tensor:
    """dot / sqrt(na nb), NaN where a norm is zero or not finite."""
    out = dot / (na * nb).sqrt()
    ok = (na > 0) & (nb > 0) & torch.isfinite(out)
    return torch.where(ok, out, torch.full_like(out, math.nan))


def _undefined_ed(na: Tensor, nb: Tensor, ja: Tensor, jb: Tensor) -> Tensor:
    """Samples where either antisymmetric part is float rounding of a symmetric J: (B,) bool."""
    tol = SYMMETRIC_RTOL**2
    return (na <= tol * ja) | (nb <= tol * jb)


def _alignment_dense(Ja: Tensor, Jb: Tensor) -> tuple:
    """<., .>_F and squared norms of J and of D = J - J^T for both: 6 tensors (B,) in float64."""
    Ja, Jb = Ja.double(), Jb.double()
    Da, Db = Ja - Ja.transpose(1, 2), Jb - Jb.transpose(1, 2)
    return ((Ja * Jb).sum((1, 2)), Ja.square().sum((1, 2)), Jb.square().sum((1, 2)),
            (Da * Db).sum((1, 2)), Da.square().sum((1, 2)), Db.square().sum((1, 2)))


def _cosine_stderr(dot: Tensor, na: Tensor, nb: Tensor) -> tuple:
    """Hutchinson cosine from per-probe terms (P, B) and its delta-method standard error (B,)."""
    P = dot.shape[0]
    md, ma, mb = dot.mean(0), na.mean(0), nb.mean(0)
    est = _cosine(md, ma, mb)
    z = dot / (ma * mb).sqrt() - 0.5 * est * (na / ma + nb / mb)
    return est, z.std(0) / math.sqrt(P)


def alignment(op_a: JacobianOperator, op_b: JacobianOperator, method: str = "auto", probes: int = PROBES, seed=0,
              max_memory: int = 2**30) -> AlignmentResult:
    """align_jac and align_ed of the Jacobians of op_a against op_b at the same points (SPEC 12).

    `exact` uses both dense Jacobians, `hutchinson` Rademacher probes (`probes` per sample, seeded by
    `seed`, one int or one per sample), `auto` exact when both dense Jacobians fit in max_memory.
    align_ed is NaN, with `reason` and a warning, where an antisymmetric part is zero (a symmetric J:
    a gradient field has no rotation to align).
    """
    if method not in ALIGNMENT_METHODS:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {ALIGNMENT_METHODS}")
    if op_a.batch != op_b.batch or op_a.shape != op_b.shape:
        raise ValueError(f"the two operators differ: batch {op_a.batch} vs {op_b.batch}, "
                         f"shape {op_a.shape} vs {op_b.shape}")
    Ja = Jb = None
    if method in ("auto", "exact"):
        Ja = op_a.dense(max_memory // 2)
        Jb = op_b.dense(max_memory // 2) if Ja is not None else None
        if (Ja is None or Jb is None) and method == "exact":
            raise ValueError("exact alignment needs both dense Jacobians within max_memory; raise it or use "
                             "method='hutchinson'")
    if Ja is not None and Jb is not None:
        dj, ja, jb, dd, da, db = _alignment_dense(Ja, Jb)
        align_jac, align_ed = _cosine(dj, ja, jb), _cosine(dd, da, db)
        se_jac, se_ed = torch.zeros_like(align_jac), torch.zeros_like(align_ed)
        how, used = "exact", 0
    else:
        if probes < 2:
            raise ValueError(f"probes must be >= 2 (the standard error needs a spread), got {probes}")
        x = torch.zeros(op_a.batch, *op_a.shape, dtype=op_a.dtype, device=op_a.device)
        gens = [torch.Generator().manual_seed(s) for s in per_sample_seeds(seed, op_a.batch)]
        chunk = min(probes, *(c for c in (op_a.chunk(max_memory), op_b.chunk(max_memory)) if c is not None))
        terms = []
        for start in range(0, probes, chunk):
            V = rademacher_probes(gens, min(chunk, probes - start), x)
            (ua, wa), (ub, wb) = op_a.products(V), op_b.products(V.to(op_b.dtype))
            ub, wb = ub.to(ua), wb.to(ua)
            va, vb = (ua - wa).flatten(2).double(), (ub - wb).flatten(2).double()
            ua, ub = ua.flatten(2).double(), ub.flatten(2).double()
            terms.append(torch.stack([(ua * ub).sum(-1), ua.square().sum(-1), ub.square().sum(-1),
                                      (va * vb).sum(-1), va.square().sum(-1), vb.square().sum(-1)]))
        T = torch.cat(terms, 1)  # (6, P, B)
        align_jac, se_jac = _cosine_stderr(T[0], T[1], T[2])
        align_ed, se_ed = _cosine_stderr(T[3], T[4], T[5])
        ja, jb, da, db = T[1].mean(0), T[2].mean(0), T[4].mean(0), T[5].mean(0)
        how, used = "hutchinson", probes
    reason = None
    undefined = _undefined_ed(da, db, ja, jb)
    if bool(undefined.any()):
        nan = torch.tensor(math.nan, dtype=align_ed.dtype, device=align_ed.device)
        align_ed, se_ed = torch.where(undefined, nan, align_ed), torch.where(undefined, nan, se_ed)
        which = "the reference's" if bool((db <= SYMMETRIC_RTOL**2 * jb)[undefined].all()) else "a"
        reason = (f"align_ed undefined for samples {undefined.nonzero().flatten().tolist()}: {which} Jacobian is "
                  f"symmetric (||J - J^T||_F <= {SYMMETRIC_RTOL:g} ||J||_F), so its antisymmetric part has no "
                  "direction -> NaN")
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    bad = ~(op_a.finite & op_b.finite.to(op_a.finite.device)).to(align_jac.device)  # a non-finite score: no number
    align_jac, align_ed, se_jac, se_ed = (torch.where(bad, math.nan, v) for v in (align_jac, align_ed, se_jac, se_ed))
    return AlignmentResult(align_jac.float(), align_ed.float(), se_jac.float(), se_ed.float(), how, used, reason)
