"""Exterior derivative of a score field (SPEC 3): size of the antisymmetric part of its Jacobian.

For a field f that maps a batch x (B, *S) to the same shape sample by sample, each sample has an
n x n Jacobian J (n = prod(S)). We report ed_fro = ||J - J^T||_F, jac_fro = ||J||_F,
asym = ed_fro / (2 jac_fro) and optionally the curl map r_p = sum_c ||(J - J^T)[(c, p), :]||_2.

Three estimators:
- exact: every row of J from vector-Jacobian products with basis vectors. Because the batched
  Jacobian is block diagonal, one basis vector sent to all B samples at once yields row k of every
  sample's J; a chunk of basis vectors is vmapped.
- hutchinson: Rademacher probes v, u = J v (forward mode) and w = J^T v (reverse mode);
  E||u - w||^2 = ||J - J^T||_F^2 and E||u||^2 = E||w||^2 = ||J||_F^2. Cost independent of n.
- analytic: a field object that knows its own Jacobian (`f.analytic_ed`, the ELS machines).
"""

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from edtool.config import MIN_PROBES, PROBES
from torch.func import jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Field = Callable[[Tensor], Tensor]

METHODS = ("auto", "exact", "hutchinson", "analytic")
# `auto` uses the exact Jacobian up to this many numbers per sample (n = prod(S)), per device type.
EXACT_MAX_N = {"cpu": 256, "cuda": 4096}
# At most this many vectors x samples go through one vmapped product: on CPU bigger batches only
# thrash the caches (shipped MNIST nets, 1 thread: UNet 1.3 s at 16-32 vectors, 1.7 s at 64, 2.2 s at 128;
# ResNet 3.3-3.7 s at 8-64, 4.8 s at 128).
MAX_VECTORS_PER_CHUNK = {"cpu": 32, "cuda": 8192}


def _vectors_per_chunk(x: Tensor, fixed_bytes: int, bytes_per_vector: int, max_memory: int) -> int:
    """How many vectors one vmapped product takes: what fits in max_memory next to fixed_bytes,
    capped by MAX_VECTORS_PER_CHUNK (counted over the batch); 0 when not even fixed_bytes fits."""
    if fixed_bytes + bytes_per_vector > max_memory:
        return 0
    cap = MAX_VECTORS_PER_CHUNK.get(x.device.type, MAX_VECTORS_PER_CHUNK["cpu"]) // x.shape[0]
    return max(1, min(cap, (max_memory - fixed_bytes) // bytes_per_vector))


@dataclass
class EDResult:
    """Per-sample exterior-derivative numbers (B,), the optional curl map (B, H, W), and how they were made."""

    ed_fro: Tensor
    jac_fro: Tensor
    asym: Tensor
    ed_stderr: Tensor
    curl_map: Optional[Tensor]
    method: str
    probes: int  # probes used; 0 for exact and analytic
    rtol_met: Optional[Tensor] = None  # with rtol: per sample, whether ed_stderr / ed_fro <= rtol was reached


# ----------------------------------------------------------------------------- input checks


def _check_input(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """A detached floating batch (B, *S) in the compute dtype: x's own unless `dtype` asks for another."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, *S), got shape {tuple(x.shape)}")
    return x.detach().to(dtype or x.dtype).contiguous()


def _per_sample_seeds(seed: Union[int, Sequence[int]], batch: int) -> list:
    """One probe seed per sample: an int is used for every sample, so no number depends on batch position."""
    if isinstance(seed, numbers.Integral) or (isinstance(seed, Tensor) and seed.dim() == 0):
        return [int(seed)] * batch
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} entries for a batch of {batch} samples; "
                         "pass one int or one per sample")
    return seeds


class _OutputBytes(TorchDispatchMode):
    """Adds up the storage bytes of every tensor the operations inside produce (each storage once)."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out


def _linearize(f: Field, x: Tensor) -> tuple:
    """One forward pass of f at x that serves everything: the VJP function, a check that f keeps the
    shape, which samples have a finite output, and the bytes the pass produced (roughly what each
    extra vector product costs)."""
    with _OutputBytes() as counter:
        out, vjp_fn = vjp(f, x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"f must map x of shape {tuple(x.shape)} to the same shape, got {shape}")
    finite = torch.isfinite(out).flatten(1).all(1)
    return vjp_fn, finite, sum(counter.storages.values())


# ----------------------------------------------------------------------------- exact


def _exact_chunk(x: Tensor, act_bytes: int, max_memory: int) -> int:
    """Basis vectors per VJP chunk so that J (B n^2 numbers plus one n^2 temporary), the forward
    graph and the chunk fit in max_memory; 0 when they cannot."""
    B, n, size = x.shape[0], x[0].numel(), x.element_size()
    fixed = (B + 1) * n * n * size + act_bytes
    per_vector = act_bytes + 2 * B * n * size  # backward intermediates, cotangent and row
    return min(n, _vectors_per_chunk(x, fixed, per_vector, max_memory))


def _exact_jacobian_rows(vjp_fn: Callable, x: Tensor, rows: Tensor) -> Tensor:
    """Rows `rows` (K,) of every sample's J, shape (B, K, n): basis vector e_k sent to all samples at once."""
    B, S, n = x.shape[0], x.shape[1:], x[0].numel()
    basis = torch.zeros(len(rows), n, dtype=x.dtype, device=x.device)
    basis[torch.arange(len(rows), device=x.device), rows] = 1
    cotangents = basis.reshape(len(rows), 1, *S).expand(len(rows), B, *S)
    return vmap(vjp_fn)(cotangents)[0].reshape(len(rows), B, n).transpose(0, 1)


def _exact_jacobian(vjp_fn: Callable, x: Tensor, chunk: int) -> Tensor:
    """Per-sample Jacobians J (B, n, n) at x from the VJP function of f there, `chunk` rows at a time."""
    B, n = x.shape[0], x[0].numel()
    J = x.new_empty(B, n, n)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=x.device)
        J[:, rows, :] = _exact_jacobian_rows(vjp_fn, x, rows)
    return J


def _exact_stats(J: Tensor, image_shape: Optional[tuple]) -> tuple:
    """ed_fro, jac_fro (B,) and the curl map (B, H, W) or None from the Jacobians, one sample at a time."""
    ed, curl = [], []
    for Jb in J:
        D = Jb - Jb.T
        ed.append(torch.linalg.matrix_norm(D))
        if image_shape is not None:
            C, H, W = image_shape
            curl.append(torch.linalg.vector_norm(D, dim=1).reshape(C, H, W).sum(0))
    jac = torch.linalg.matrix_norm(J)
    return torch.stack(ed), jac, torch.stack(curl) if image_shape is not None else None


def _exact(vjp_fn: Callable, x: Tensor, chunk: int, curl_map: bool, max_memory: int) -> tuple:
    """Exact ed_fro, jac_fro, curl map from the full Jacobians; standard error 0."""
    if chunk == 0:
        need = (x.shape[0] + 1) * x[0].numel() ** 2 * x.element_size() / 2**30
        raise ValueError(f"exact Jacobians of {x.shape[0]} samples with {x[0].numel()} numbers need {need:.2f} GiB, "
                         f"over max_memory={max_memory / 2**30:.2f} GiB; raise max_memory, pass fewer samples, "
                         "or use method='hutchinson'")
    ed, jac, curl = _exact_stats(_exact_jacobian(vjp_fn, x, chunk), x.shape[1:] if curl_map else None)
    return ed, jac, torch.zeros_like(ed), curl


# ----------------------------------------------------------------------------- hutchinson


def _rademacher_probes(generators: list, count: int, x: Tensor) -> Tensor:
    """`count` probes per sample, shape (count, B, *S): +-1 drawn on CPU from each sample's own generator,
    so CPU and CUDA see the same probes and a sample's probes do not depend on the batch."""
    draws = [torch.randint(0, 2, (count, *x.shape[1:]), generator=g, dtype=torch.int8) for g in generators]
    return (torch.stack(draws, dim=1).to(device=x.device, dtype=x.dtype) * 2 - 1)


def _jvp_vjp_probes(f: Field, vjp_fn: Callable, x: Tensor, V: Tensor) -> tuple:
    """u = J v by forward mode and w = J^T v by reverse mode, vmapped over the probes V (P, B, *S)."""
    u = vmap(lambda v: jvp(f, (x,), (v,))[1])(V)
    w = vmap(vjp_fn)(V)[0]
    return u, w


def _mean_stderr_sqrt(squares: Tensor) -> tuple:
    """sqrt of the mean of per-probe squares (P, B) and its standard error by the delta method."""
    mean = squares.mean(0)
    se_mean = squares.std(0) / math.sqrt(squares.shape[0])
    root = mean.sqrt()
    return root, torch.where(root > 0, se_mean / (2 * root), torch.zeros_like(root))


class _ProbeSums:
    """Running per-probe squares (for means and spread) and per-element sums of (u - w)^2 (for the curl map)."""

    def __init__(self):
        self.ed_sq, self.jac_sq, self.diff_sq_sum, self.count = [], [], 0, 0

    def add(self, u: Tensor, w: Tensor) -> None:
        d2 = (u - w).square()
        self.ed_sq.append(d2.flatten(2).sum(-1))
        self.jac_sq.append((u.square() + w.square()).flatten(2).sum(-1) / 2)
        self.diff_sq_sum = self.diff_sq_sum + d2.sum(0)
        self.count += u.shape[0]

    def stats(self, curl_map: bool) -> tuple:
        """ed_fro, jac_fro, ed_stderr (B,) and the curl map r_p = sum_c sqrt(mean (u - w)_{c,p}^2)."""
        ed, ed_se = _mean_stderr_sqrt(torch.cat(self.ed_sq))
        jac, _ = _mean_stderr_sqrt(torch.cat(self.jac_sq))
        curl = (self.diff_sq_sum / self.count).sqrt().sum(1) if curl_map else None
        return ed, jac, ed_se, curl


def _hutchinson_chunk(x: Tensor, act_bytes: int, max_memory: int) -> int:
    """Probes per vmapped chunk so that the forward graph and the chunk's tangents fit in max_memory
    (at least one probe, whatever the budget)."""
    B, n, size = x.shape[0], x[0].numel(), x.element_size()
    per_probe = act_bytes + 4 * B * n * size  # tangent intermediates, probe, u, w, difference
    return max(1, _vectors_per_chunk(x, act_bytes, per_probe, max_memory))


def _hutchinson(f, vjp_fn, x, seeds, probes, rtol, max_probes, chunk, curl_map) -> tuple:
    """Hutchinson estimates; with rtol, add rounds of `probes` probes until every sample's
    relative standard error of ed_fro is below rtol or max_probes are used."""
    if probes < MIN_PROBES:
        raise ValueError(f"probes must be >= {MIN_PROBES} (the standard error needs a spread), got {probes}")
    if rtol is not None and not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    max_probes = max(max_probes, probes)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    sums = _ProbeSums()
    while True:
        round_size = probes if rtol is None else min(probes, max_probes - sums.count)
        for start in range(0, round_size, chunk):
            V = _rademacher_probes(generators, min(chunk, round_size - start), x)
            sums.add(*_jvp_vjp_probes(f, vjp_fn, x, V))
        ed, jac, ed_se, curl = sums.stats(curl_map)
        if rtol is None or sums.count >= max_probes or not bool((ed_se / ed > rtol).any()):
            return ed, jac, ed_se, curl, sums.count, None if rtol is None else ~(ed_se / ed > rtol)


# ----------------------------------------------------------------------------- analytic


def _has_analytic(f) -> bool:
    return callable(getattr(f, "analytic_ed", None))


def _analytic(f, x: Tensor, curl_map: bool) -> tuple:
    """The field's own closed form (ELS machines, SPEC 5.3); standard error 0."""
    if not _has_analytic(f):
        raise ValueError("method='analytic' needs a field object with a callable `analytic_ed(x, curl_map)`; "
                         f"{type(f).__name__} has none (use 'exact' or 'hutchinson')")
    out = f.analytic_ed(x, curl_map=curl_map)
    ed = torch.as_tensor(out["ed_fro"], device=x.device).to(x.dtype)
    jac = torch.as_tensor(out["jac_fro"], device=x.device).to(x.dtype)
    curl = out.get("curl_map") if curl_map else None
    if curl_map and curl is None:
        raise ValueError("f.analytic_ed returned no curl map although curl_map=True was asked")
    return ed, jac, torch.zeros_like(ed), curl


# ----------------------------------------------------------------------------- entry point


def auto_method(n: int, device_type: str) -> str:
    """What `auto` means for a field without a closed form on n numbers per sample: exact up to
    EXACT_MAX_N for the device type, else Hutchinson (so a run records it, and CPU and CUDA differ)."""
    return "exact" if n <= EXACT_MAX_N.get(device_type, EXACT_MAX_N["cpu"]) else "hutchinson"


def _choose_method(method: str, x: Tensor, exact_chunk: int) -> str:
    """`auto` without a closed form: exact for small n that fits in memory, else Hutchinson."""
    if method != "auto":
        return method
    return "exact" if auto_method(x[0].numel(), x.device.type) == "exact" and exact_chunk > 0 else "hutchinson"


def _result(ed, jac, ed_se, curl, finite_out: Tensor, method: str, probes: int, rtol_met=None) -> EDResult:
    """The EDResult, with NaN for every sample whose output or result is not finite (and a warning naming them)."""
    asym = ed / (2 * jac)
    bad = ~finite_out.to(ed.device) | ~torch.isfinite(ed) | ~torch.isfinite(jac) | ~torch.isfinite(asym)
    if bool(bad.any()):
        warnings.warn(f"exterior_derivative: f gave non-finite values (or a zero Jacobian) for samples "
                      f"{bad.nonzero().flatten().tolist()}; their results are NaN", RuntimeWarning, stacklevel=3)
        nan = torch.tensor(float("nan"), dtype=ed.dtype, device=ed.device)
        ed, jac, asym, ed_se = (torch.where(bad, nan, v) for v in (ed, jac, asym, ed_se))
        if curl is not None:
            curl = torch.where(bad[:, None, None], nan, curl)
    return EDResult(ed_fro=ed, jac_fro=jac, asym=asym, ed_stderr=ed_se, curl_map=curl, method=method, probes=probes,
                    rtol_met=rtol_met)


def exterior_derivative(
    f: Field,
    x: Tensor,
    method: str = "auto",
    probes: int = PROBES,
    seed: Union[int, Sequence[int]] = 0,
    rtol: Optional[float] = None,
    max_probes: int = 1024,
    curl_map: bool = False,
    max_memory: int = 2**30,
    dtype: Optional[torch.dtype] = None,
) -> EDResult:
    """ed_fro = ||J - J^T||_F, jac_fro = ||J||_F, asym, ed_stderr (and the curl map) of f at every sample of x.

    f maps x (B, *S) to the same shape sample by sample. `method` is auto, exact, hutchinson or
    analytic; `seed` (one int, or one per sample) seeds each sample's probes; with `rtol`, Hutchinson
    adds rounds of `probes` probes until every relative standard error is below rtol (then the probe
    count, the same for the whole batch, depends on the batch); a sample still above it at `max_probes`
    gets a RuntimeWarning and False in `rtol_met`. `max_memory` bounds the bytes that vector products
    and Jacobians hold at once. The computation runs in x's dtype unless `dtype` is given.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    x = _check_input(x, dtype)
    if curl_map and x.dim() != 4:
        raise ValueError(f"curl_map=True needs image-shaped samples (C, H, W), got {tuple(x.shape[1:])}")
    with torch.no_grad():  # torch.func transforms still differentiate; this only stops graphs to parameters
        if method == "analytic" or (method == "auto" and _has_analytic(f)):
            all_finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            return _result(*_analytic(f, x, curl_map), all_finite, "analytic", 0)
        vjp_fn, finite_out, act_bytes = _linearize(f, x)
        exact_chunk = _exact_chunk(x, act_bytes, max_memory)
        method = _choose_method(method, x, exact_chunk)
        if method == "exact":
            return _result(*_exact(vjp_fn, x, exact_chunk, curl_map, max_memory), finite_out, "exact", 0)
        seeds = _per_sample_seeds(seed, x.shape[0])
        chunk = _hutchinson_chunk(x, act_bytes, max_memory)
        *stats, used, met = _hutchinson(f, vjp_fn, x, seeds, probes, rtol, max_probes, chunk, curl_map)
        if met is not None and not bool(met.all()):
            missed = (~met).nonzero().flatten().tolist()
            worst = float((stats[2] / stats[0])[~met].max())
            warnings.warn(f"exterior_derivative: rtol {rtol} not reached for samples {missed} after the cap of {used} "
                          f"probes (relative standard error up to {worst:.3g}); raise max_probes or rtol",
                          RuntimeWarning, stacklevel=2)
        return _result(*stats, finite_out, "hutchinson", used, met)
