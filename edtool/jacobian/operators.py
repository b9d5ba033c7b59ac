"""Linear operators for a score field's Jacobian, one per batch of samples, as in curvlinops: every one
is a `JacobianOperator` (products J v and J^T v, the dense matrix when it fits, the exact ED when it is in
closed form): a dense matrix (`DenseJacobian`), an ELS machine's closed-form band (`BandJacobian`) or a
field at a point by autograd (`FieldJacobian`). Below them, the autograd products every estimator
shares: one linearization of f at x, rows of J by vector-Jacobian products, probe products J v and
J^T v, and how many vectors fit in a memory budget.

    op = jacobian_operator(field, x)     # a field with a closed form gives it, anything else autograd
    u, w = op.products(V)                # J v and J^T v for probes V (P, B, *S)
"""

import math
import numbers
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edtool.els.band import band_ed, band_transpose, dense_ed_per_sample, dense_jacobian
from edtool.els.windows import pad_images
from edtool.model import ClosedForm, ScoreField

Field = Callable[[Tensor], Tensor]

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


# ----------------------------------------------------------------------------- autograd products


def check_input(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """A detached floating batch (B, *S) in the compute dtype: x's own unless `dtype` asks for another."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, *S), got shape {tuple(x.shape)}")
    return x.detach().to(dtype or x.dtype).contiguous()


def per_sample_seeds(seed: Union[int, Sequence[int]], batch: int) -> list:
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


def linearize(f: Field, x: Tensor) -> tuple:
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


def jacobian_rows_per_chunk(x: Tensor, act_bytes: int, max_memory: int) -> int:
    """Basis vectors per VJP chunk so that J (B n^2 numbers plus one n^2 temporary), the forward
    graph and the chunk fit in max_memory; 0 when they cannot."""
    B, n, size = x.shape[0], x[0].numel(), x.element_size()
    fixed = (B + 1) * n * n * size + act_bytes
    per_vector = act_bytes + 2 * B * n * size  # backward intermediates, cotangent and row
    return min(n, _vectors_per_chunk(x, fixed, per_vector, max_memory))


def exact_jacobian(vjp_fn: Callable, x: Tensor, chunk: int) -> Tensor:
    """Per-sample Jacobians J (B, n, n) at x from the VJP function of f there, `chunk` rows at a time: basis
    vector e_k sent to all samples at once gives row k of every sample's J."""
    B, n = x.shape[0], x[0].numel()
    J = x.new_empty(B, n, n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        J[:, start:stop, :] = vmap(vjp_fn)(basis_vectors(x, start, stop))[0].reshape(stop - start, B, n).transpose(0, 1)
    return J


def rademacher_probes(generators: list, count: int, x: Tensor) -> Tensor:
    """`count` probes per sample, shape (count, B, *S): +-1 drawn on CPU from each sample's own generator,
    so CPU and CUDA see the same probes and a sample's probes do not depend on the batch."""
    draws = [torch.randint(0, 2, (count, *x.shape[1:]), generator=g, dtype=torch.int8) for g in generators]
    return (torch.stack(draws, dim=1).to(device=x.device, dtype=x.dtype) * 2 - 1)


def jvp_vjp_probes(f: Field, vjp_fn: Callable, x: Tensor, V: Tensor) -> tuple:
    """u = J v by forward mode and w = J^T v by reverse mode, vmapped over the probes V (P, B, *S)."""
    u = vmap(lambda v: jvp(f, (x,), (v,))[1])(V)
    w = vmap(vjp_fn)(V)[0]
    return u, w


def products_per_chunk(x: Tensor, act_bytes: int, max_memory: int) -> int:
    """Vectors per vmapped chunk of J v and J^T v so that the forward graph and the chunk's tangents
    fit in max_memory; 0 when not even one does."""
    B, n, size = x.shape[0], x[0].numel(), x.element_size()
    per_vector = act_bytes + 4 * B * n * size  # tangent intermediates, vector, u, w, difference
    return _vectors_per_chunk(x, act_bytes, per_vector, max_memory)


def probes_per_chunk(x: Tensor, act_bytes: int, max_memory: int) -> int:
    """Probes per vmapped chunk within max_memory (at least one probe, whatever the budget)."""
    return max(1, products_per_chunk(x, act_bytes, max_memory))


def basis_vectors(x: Tensor, start: int, stop: int) -> Tensor:
    """Basis vectors e_start .. e_(stop-1), each sent to every sample: shape (stop - start, B, *S)."""
    B, S, n = x.shape[0], x.shape[1:], x[0].numel()
    basis = torch.zeros(stop - start, n, dtype=x.dtype, device=x.device)
    basis[torch.arange(stop - start, device=x.device), torch.arange(start, stop, device=x.device)] = 1
    return basis.reshape(stop - start, 1, *S).expand(stop - start, B, *S)


# ----------------------------------------------------------------------------- Jacobian operators


def band_matvec(band: Tensor, V: Tensor, padding: str) -> Tensor:
    """J v for a band (B, C, H, W, C, k, k) and vectors V (P, B, C, H, W), without forming J."""
    B, C, H, W, _, k, _ = band.shape
    r = k // 2
    P = V.shape[0]
    padded = pad_images(V.reshape(P * B, C, H, W), r, padding == "circular").view(P, B, C, H + 2 * r, W + 2 * r)
    out = V.new_zeros(P, B, C, H, W)
    for dy in range(k):
        for dx in range(k):
            shifted = padded[..., dy:dy + H, dx:dx + W]  # v at (y + dy - r, x + dx - r)
            out += torch.einsum("bcyxd,pbdyx->pbcyx", band[..., dy, dx].to(V.dtype), shifted)
    return out


class JacobianOperator(ABC):
    """The Jacobians J (n x n, n = C*H*W) of a score field at a batch of B points, as a linear operator.

    batch: B; shape: (C, H, W); circular: whether pixel distances wrap around (circular padding);
    device, dtype: where its products live; finite (B,): whether the field was finite at each point
    (a sample that is not has no numbers); score: the field's value at the points when the same
    computation gave it (an ELS machine's closed form), else None.
    """

    batch: int
    shape: tuple
    circular: bool
    score: Optional[Tensor] = None

    @abstractmethod
    def products(self, V: Tensor) -> tuple:
        """(J v, J^T v) for vectors V (P, B, C, H, W), each (P, B, C, H, W)."""

    @abstractmethod
    def dense(self, max_memory: int = 2**30) -> Optional[Tensor]:
        """The dense Jacobians (B, n, n), or None when they do not fit in max_memory bytes."""

    def closed_form_ed(self, curl_map: bool = False) -> Optional[dict]:
        """Exact ed_fro, jac_fro (B,) and the curl map (B, H, W) or None from the closed form, or None
        when the operator has none (the estimators of edtool.jacobian.ed then differentiate the field)."""
        return None

    def chunk(self, max_memory: int = 2**30) -> Optional[int]:
        """How many vectors one call of `products` may take within max_memory; None when memory does not
        bound them (a closed form holds no graph), and the caller chooses."""
        return None

    @property
    def finite(self) -> Tensor:
        return torch.ones(self.batch, dtype=torch.bool, device=self.device)

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...


class DenseJacobian(JacobianOperator):
    """Per-sample Jacobians J (B, n, n) of images `shape` (C, H, W); a closed form when `closed` (the `is`
    machine's), else a matrix like any other."""

    def __init__(self, J: Tensor, shape: Sequence[int], circular: bool = False, closed: bool = False,
                 score: Optional[Tensor] = None):
        self.J, self.shape, self.circular, self.closed, self.score = J, tuple(shape), circular, closed, score
        self.batch = J.shape[0]

    device = property(lambda self: self.J.device)
    dtype = property(lambda self: self.J.dtype)

    def dense(self, max_memory: int = 2**30) -> Tensor:
        return self.J

    def products(self, V: Tensor) -> tuple:
        flat = V.flatten(2).to(self.J.dtype)
        u = torch.einsum("bij,pbj->pbi", self.J, flat)
        w = torch.einsum("bji,pbj->pbi", self.J, flat)
        return u.view_as(V).to(V.dtype), w.view_as(V).to(V.dtype)

    def closed_form_ed(self, curl_map: bool = False) -> Optional[dict]:
        """One sample at a time, so that no sample's numbers depend on the batch it came in."""
        if not self.closed:
            return None
        return dense_ed_per_sample(self.J, self.shape, curl_map)


class BandJacobian(JacobianOperator):
    """The closed-form band (B, C, H, W, C, k, k) of an ELS machine (`Machine.jacobian`)."""

    def __init__(self, band: Tensor, padding: str, score: Optional[Tensor] = None):
        self.band, self.padding, self.score = band, padding, score
        self.circular = padding == "circular"
        self.batch, self.shape = band.shape[0], tuple(band.shape[1:4])
        self._dense = None

    device = property(lambda self: self.band.device)
    dtype = property(lambda self: self.band.dtype)

    def _dense_bytes(self) -> int:
        n = math.prod(self.shape)
        return self.batch * n * n * self.band.element_size()

    def dense(self, max_memory: int = 2**30) -> Optional[Tensor]:
        if self._dense is None and self._dense_bytes() <= max_memory:
            self._dense = dense_jacobian(self.band, self.padding)
        return self._dense

    def products(self, V: Tensor) -> tuple:
        return band_matvec(self.band, V, self.padding), band_matvec(band_transpose(self.band, self.circular), V,
                                                                   self.padding)

    def closed_form_ed(self, curl_map: bool = False) -> dict:
        return band_ed(self.band, self.padding, curl_map)


class FieldJacobian(JacobianOperator):
    """The Jacobian of a field f (x (B, C, H, W) -> same shape, sample by sample) at x, by autograd:
    products by forward (J v) and reverse mode (J^T v), the dense matrix from chunked VJPs (`exact_jacobian`)."""

    def __init__(self, f, x: Tensor, circular: bool = False):
        self.f, self.x, self.circular = f, check_input(x, None), circular
        self.batch, self.shape = x.shape[0], tuple(x.shape[1:])
        with torch.no_grad():
            self._vjp_fn, self._finite, self._act_bytes = linearize(f, self.x)
        self._dense = None

    device = property(lambda self: self.x.device)
    dtype = property(lambda self: self.x.dtype)
    finite = property(lambda self: self._finite)

    def dense(self, max_memory: int = 2**30) -> Optional[Tensor]:
        """The dense Jacobians (n VJPs, computed once), or None when they do not fit in max_memory."""
        if self._dense is None:
            chunk = jacobian_rows_per_chunk(self.x, self._act_bytes, max_memory)
            if chunk == 0:
                return None
            with torch.no_grad():
                self._dense = exact_jacobian(self._vjp_fn, self.x, chunk)
        return self._dense

    def chunk(self, max_memory: int = 2**30) -> int:
        """Vectors per vmapped product within max_memory."""
        return probes_per_chunk(self.x, self._act_bytes, max_memory)

    def products(self, V: Tensor) -> tuple:
        with torch.no_grad():
            return jvp_vjp_probes(self.f, self._vjp_fn, self.x, V.to(self.x.dtype))


def closed_form_operator(closed: ClosedForm, shape: Sequence[int], circular: Optional[bool] = None) -> JacobianOperator:
    """The operator of a field's closed form at points of image shape (C, H, W): its band, or its dense
    matrix (the `is` machine's). A dense matrix's `circular` (distances on the torus) defaults to the
    closed form's padding; a band's is its padding."""
    if closed.jacobian.dim() == 3:
        return DenseJacobian(closed.jacobian, shape, closed.padding == "circular" if circular is None else circular,
                             closed=True, score=closed.score)
    return BandJacobian(closed.jacobian, closed.padding, closed.score)


def jacobian_operator(field, x: Tensor, circular: Optional[bool] = None) -> JacobianOperator:
    """The Jacobian operator of a score field at x: its closed form where it has one (a `ScoreField`
    whose `closed_form(x)` is not None: an ELS machine's band, or the `is` machine's dense matrix),
    autograd for anything else (any callable x -> s(x)). `circular` (distances on the torus) defaults
    to the closed form's padding, and to False for other fields."""
    closed = field.closed_form(x) if isinstance(field, ScoreField) else None
    if closed is not None:
        return closed_form_operator(closed, x.shape[1:], circular)
    return FieldJacobian(field, x, bool(circular))
