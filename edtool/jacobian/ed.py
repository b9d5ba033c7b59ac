"""Exterior derivative of a score field (SPEC 3): size of the antisymmetric part of its Jacobian.

For a field f that maps a batch x (B, *S) to the same shape sample by sample, each sample has an
n x n Jacobian J (n = prod(S)). We report ed_fro = ||J - J^T||_F, jac_fro = ||J||_F,
asym = ed_fro / (2 jac_fro) and optionally the curl map r_p = sum_c ||(J - J^T)[(c, p), :]||_2.

Three estimators:
- exact: every row of J from vector-Jacobian products with basis vectors. Because the batched
  Jacobian is block diagonal, one basis vector sent to all B samples at once yields row k of every
  sample's J; a chunk of basis vectors is vmapped. When the B n x n Jacobians do not fit in memory,
  row k of J - J^T comes from J^T e_k - J e_k instead and only the row norms are kept.
- hutchinson: Rademacher probes v, u = J v (forward mode) and w = J^T v (reverse mode);
  E||u - w||^2 = ||J - J^T||_F^2 and E||u||^2 = E||w||^2 = ||J||_F^2. Cost independent of n.
- analytic: a field that knows its own Jacobian (an `edtool.model.ScoreField` whose `closed_form(x)` is
  not None: the ELS machines), or a closed-form `JacobianOperator` already built at x (`operator=`).
The autograd products they share (one linearization, rows of J, probe products, chunk sizes) live in
`edtool.jacobian.operators`, with the Jacobian operators that locality and alignment take.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from edtool.config import ESTIMATORS as METHODS, MIN_PROBES, PROBES
from edtool.jacobian.operators import (Field, JacobianOperator, basis_vectors, check_input, closed_form_operator,
                                       exact_jacobian, jacobian_rows_per_chunk, jvp_vjp_probes, linearize,
                                       per_sample_seeds, probes_per_chunk, products_per_chunk, rademacher_probes)
from edtool.memory import memory_budget
from edtool.model import ScoreField

# `auto` uses the exact Jacobian up to this many numbers per sample (n = prod(S)), per device type.
EXACT_MAX_N = {"cpu": 256, "cuda": 4096}


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


# ----------------------------------------------------------------------------- exact


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


class ExactMemoryError(MemoryError):
    """Not even one row of the exact Jacobians fits in the memory budget: use fewer samples, a larger
    budget, or Hutchinson."""


def _exact(f: Field, vjp_fn: Callable, x: Tensor, act_bytes: int, curl_map: bool, max_memory: int) -> tuple:
    """Exact ed_fro, jac_fro, curl map; standard error 0. From the whole Jacobians when they fit in
    max_memory, else streamed: row k of J - J^T is J^T e_k - J e_k (one reverse- and one forward-mode
    product), so a chunk of rows needs no n x n matrix and only their norms are kept."""
    chunk = jacobian_rows_per_chunk(x, act_bytes, max_memory)
    if chunk > 0:
        ed, jac, curl = _exact_stats(exact_jacobian(vjp_fn, x, chunk), x.shape[1:] if curl_map else None)
        return ed, jac, torch.zeros_like(ed), curl
    chunk = products_per_chunk(x, act_bytes, max_memory)
    if chunk == 0:
        raise ExactMemoryError(f"one row of the exact Jacobians of {x.shape[0]} samples with {x[0].numel()} numbers "
                               f"needs more than max_memory={max_memory / 2**30:.3g} GiB (EDTOOL_MAX_MEMORY); "
                               "pass fewer samples or use method='hutchinson'")
    B, n = x.shape[0], x[0].numel()
    ed_rows, jac_rows = x.new_empty(B, n), x.new_empty(B, n)  # squared norms of row k of J - J^T and of J
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        column, row = jvp_vjp_probes(f, vjp_fn, x, basis_vectors(x, start, stop))
        ed_rows[:, start:stop] = (row - column).flatten(2).square().sum(-1).T
        jac_rows[:, start:stop] = row.flatten(2).square().sum(-1).T
    ed, jac = ed_rows.sum(1).sqrt(), jac_rows.sum(1).sqrt()
    curl = ed_rows.sqrt().reshape(x.shape).sum(1) if curl_map else None
    return ed, jac, torch.zeros_like(ed), curl


# ----------------------------------------------------------------------------- hutchinson


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
            V = rademacher_probes(generators, min(chunk, round_size - start), x)
            sums.add(*jvp_vjp_probes(f, vjp_fn, x, V))
        ed, jac, ed_se, curl = sums.stats(curl_map)
        if rtol is None or sums.count >= max_probes or not bool((ed_se / ed > rtol).any()):
            return ed, jac, ed_se, curl, sums.count, None if rtol is None else ~(ed_se / ed > rtol)


# ----------------------------------------------------------------------------- analytic


def _closed_form_ed(f, x: Tensor, operator: Optional[JacobianOperator], curl_map: bool) -> Optional[dict]:
    """The exact numbers of the field's closed form at x: from `operator` when one was built, else from
    the field (a ScoreField's `closed_form(x)`); None when it has none."""
    if operator is None:
        closed = f.closed_form(x) if isinstance(f, ScoreField) else None
        operator = None if closed is None else closed_form_operator(closed, x.shape[1:])
    return None if operator is None else operator.closed_form_ed(curl_map)


def _analytic(out: dict, x: Tensor, curl_map: bool) -> tuple:
    """ed_fro, jac_fro, standard error 0 and the curl map from a closed form's numbers (SPEC 5.3)."""
    ed = torch.as_tensor(out["ed_fro"], device=x.device).to(x.dtype)
    jac = torch.as_tensor(out["jac_fro"], device=x.device).to(x.dtype)
    return ed, jac, torch.zeros_like(ed), out["curl_map"] if curl_map else None


# ----------------------------------------------------------------------------- entry point


def auto_method(n: int, device_type: str) -> str:
    """What `auto` means for a field without a closed form on n numbers per sample: exact up to
    EXACT_MAX_N for the device type, else Hutchinson (so a run records it, and CPU and CUDA differ)."""
    return "exact" if n <= EXACT_MAX_N.get(device_type, EXACT_MAX_N["cpu"]) else "hutchinson"


def _choose_method(method: str, x: Tensor, act_bytes: int, max_memory: int) -> str:
    """`auto` without a closed form: exact for small n when a row of J fits in memory, else Hutchinson."""
    if method != "auto":
        return method
    fits = products_per_chunk(x, act_bytes, max_memory) > 0
    return "exact" if auto_method(x[0].numel(), x.device.type) == "exact" and fits else "hutchinson"


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
    max_memory: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    operator: Optional[JacobianOperator] = None,
) -> EDResult:
    """ed_fro = ||J - J^T||_F, jac_fro = ||J||_F, asym, ed_stderr (and the curl map) of f at every sample of x.

    f maps x (B, *S) to the same shape sample by sample: any callable, or a model's field `model.field(t)`
    (an `edtool.model.ScoreField`); an ELS machine's field carries its closed form, which `auto` uses.
    `operator`: f's Jacobian operator at x when it is built already (`jacobian_operator(f, x)`): a closed
    form's is used as it is instead of being computed again. `method` is auto,
    exact, hutchinson or analytic; `seed` (one int, or one per sample) seeds each sample's probes; with
    `rtol`, Hutchinson adds rounds of `probes` probes until every relative standard error is below rtol (then the probe
    count, the same for the whole batch, depends on the batch); a sample still above it at `max_probes`
    gets a RuntimeWarning and False in `rtol_met`. `max_memory` bounds the bytes that vector products
    and Jacobians hold at once (default `edtool.memory.memory_budget` of x's device): exact Jacobians
    over it are streamed row by row, and ExactMemoryError says when not even one row fits. The
    computation runs in x's dtype unless `dtype` is given.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not callable(f):  # a score model is a score at every time: its field at one time is model.field(t)
        raise TypeError(f"f must be a field x -> s(x), called on a batch; got a {type(f).__name__} (a score model's "
                        "field at one time is model.field(t))")
    x = check_input(x, dtype)
    if curl_map and x.dim() != 4:
        raise ValueError(f"curl_map=True needs image-shaped samples (C, H, W), got {tuple(x.shape[1:])}")
    with torch.no_grad():  # torch.func transforms still differentiate; this only stops graphs to parameters
        closed = _closed_form_ed(f, x, operator, curl_map) if method in ("auto", "analytic") else None
        if closed is not None:
            all_finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            return _result(*_analytic(closed, x, curl_map), all_finite, "analytic", 0)
        if method == "analytic":
            raise ValueError("method='analytic' needs a field with a closed form (a ScoreField whose closed_form(x) "
                             f"is not None, such as an ELS machine's `machine.field(t)`); {type(f).__name__} has none "
                             "(use 'exact' or 'hutchinson')")
        vjp_fn, finite_out, act_bytes = linearize(f, x)
        max_memory = memory_budget(x.device) if max_memory is None else max_memory
        method = _choose_method(method, x, act_bytes, max_memory)
        if method == "exact":
            return _result(*_exact(f, vjp_fn, x, act_bytes, curl_map, max_memory), finite_out, "exact", 0)
        seeds = per_sample_seeds(seed, x.shape[0])
        chunk = probes_per_chunk(x, act_bytes, max_memory)
        *stats, used, met = _hutchinson(f, vjp_fn, x, seeds, probes, rtol, max_probes, chunk, curl_map)
        if met is not None and not bool(met.all()):
            missed = (~met).nonzero().flatten().tolist()
            worst = float((stats[2] / stats[0])[~met].max())
            warnings.warn(f"exterior_derivative: rtol {rtol} not reached for samples {missed} after the cap of {used} "
                          f"probes (relative standard error up to {worst:.3g}); raise max_probes or rtol",
                          RuntimeWarning, stacklevel=2)
        return _result(*stats, finite_out, "hutchinson", used, met)
