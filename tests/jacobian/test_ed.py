"""Exterior-derivative estimators (SPEC 3) against closed forms and against each other."""

import math
import os

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

from edtool.errors import EdtoolError
from edtool.jacobian.ed import EXACT_MAX_N, ExactMemoryError, exterior_derivative
from edtool.jacobian.operators import exact_jacobian, jacobian_rows_per_chunk, linearize, products_per_chunk
from edtool.memory import CPU_SHARE, CUDA_SHARE, MEMORY_ENV, memory_budget
from edtool.model import ClosedForm, ScoreField
from edtool.networks.models import MinimalResNet, Network

f64 = torch.float64


def linear_field(A):
    """f(x) = A x for every sample (any sample shape): its Jacobian is A."""
    return lambda x: (x.flatten(1) @ A.to(x).T).reshape(x.shape)


def random_matrix(n, seed=0):
    return torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=f64)


def curl_truth(M, shape):
    """Row norms of M summed over channels: the curl map of a field with J - J^T = M."""
    return torch.linalg.vector_norm(M, dim=1).reshape(shape).sum(0)


@pytest.fixture(scope="module")
def resnet_field():
    """An untrained small conv network on 1x8x8 images at t = 0.5, in float64."""
    torch.manual_seed(0)
    net = Network(MinimalResNet(emb_dim=16, num_layers=2)).to(dtype=f64)
    t = torch.tensor(0.5, dtype=f64)
    return lambda x: net.score(t, x)


@pytest.fixture(scope="module")
def resnet_x():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=f64)


@pytest.fixture(scope="module")
def resnet_exact(resnet_field, resnet_x):
    return exterior_derivative(resnet_field, resnet_x, method="exact", dtype=f64)


def test_a_float64_field_at_float64_points_needs_no_dtype(resnet_field, resnet_x, resnet_exact):
    """The input's dtype is the compute dtype: a float64 network at float64 x just works (no cast to
    float32 that would fail inside torch with a dtype mismatch)."""
    for method in ("exact", "hutchinson"):
        res = exterior_derivative(resnet_field, resnet_x, method=method, probes=4)
        assert res.ed_fro.dtype == f64
    torch.testing.assert_close(exterior_derivative(resnet_field, resnet_x, method="exact").ed_fro,
                               resnet_exact.ed_fro, rtol=0, atol=0)


# ----------------------------------------------------------------------------- linear fields


def test_exact_linear_flat():
    A = random_matrix(12)
    x = torch.randn(4, 12, dtype=f64)
    res = exterior_derivative(linear_field(A), x, method="exact", dtype=f64)
    assert res.method == "exact" and res.probes == 0
    torch.testing.assert_close(res.ed_fro, torch.linalg.matrix_norm(A - A.T).expand(4), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.jac_fro, torch.linalg.matrix_norm(A).expand(4), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.asym, res.ed_fro / (2 * res.jac_fro))
    assert torch.equal(res.ed_stderr, torch.zeros(4, dtype=f64))
    assert res.curl_map is None


def test_exact_linear_image_curl_map():
    S = (2, 3, 4)
    A = random_matrix(24, seed=1)
    x = torch.randn(2, *S, dtype=f64)
    res = exterior_derivative(linear_field(A), x, method="exact", curl_map=True, dtype=f64)
    assert res.curl_map.shape == (2, 3, 4)
    torch.testing.assert_close(res.curl_map[1], curl_truth(A - A.T, S), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.ed_fro[0], torch.linalg.matrix_norm(A - A.T), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_exact_jacobian_any_chunk_is_the_matrix(chunk):
    A = random_matrix(24, seed=2)
    x = torch.randn(3, 2, 3, 4, dtype=f64)
    J = exact_jacobian(vjp(linear_field(A), x)[1], x, chunk)
    torch.testing.assert_close(J, A.expand(3, 24, 24), rtol=0, atol=1e-14)


def test_hutchinson_linear_within_standard_errors():
    S = (2, 3, 4)
    A = random_matrix(24, seed=3)
    x = torch.randn(2, *S, dtype=f64)
    res = exterior_derivative(linear_field(A), x, method="hutchinson", probes=256, curl_map=True, dtype=f64)
    assert res.method == "hutchinson" and res.probes == 256
    truth = torch.linalg.matrix_norm(A - A.T)
    assert (res.ed_stderr > 0).all() and (res.ed_stderr < 0.1 * truth).all()
    assert ((res.ed_fro - truth).abs() < 4 * res.ed_stderr).all()
    torch.testing.assert_close(res.jac_fro, torch.linalg.matrix_norm(A).expand(2), rtol=0.05, atol=0)
    torch.testing.assert_close(res.curl_map[0], curl_truth(A - A.T, S), rtol=0.15, atol=0)


def test_rotation_field_has_asym_one():
    M = random_matrix(10, seed=4)
    A = M - M.T
    x = torch.randn(3, 10, dtype=f64)
    for method in ("exact", "hutchinson"):
        res = exterior_derivative(linear_field(A), x, method=method, dtype=f64)
        torch.testing.assert_close(res.asym, torch.ones(3, dtype=f64), rtol=1e-12, atol=0)


def test_gradient_field_is_conservative():
    g = torch.Generator().manual_seed(5)
    W1, b1, w2 = torch.randn(16, 20, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)

    def potential(x):  # one sample (4, 5) -> scalar
        return (torch.tanh(W1.to(x) @ x.flatten() + b1.to(x)) * w2.to(x)).sum() + 0.1 * (x**4).sum()

    f = vmap(grad(potential))
    x = torch.randn(3, 4, 5)
    exact = exterior_derivative(f, x, method="exact")
    assert exact.ed_fro.dtype == torch.float32
    assert (exact.jac_fro > 0.1).all() and (exact.asym < 1e-5).all()
    hutch = exterior_derivative(f, x.double(), method="hutchinson")  # float64 input stays float64
    assert hutch.ed_fro.dtype == f64 and (hutch.asym < 1e-12).all()
    assert (hutch.ed_fro < 1e-12 * hutch.jac_fro).all()


# ----------------------------------------------------------------------------- a conv network


def test_hutchinson_agrees_with_exact_on_a_conv_net(resnet_field, resnet_x, resnet_exact):
    assert (resnet_exact.asym > 0.01).all()  # a generic network is not conservative
    z = []
    for rep in range(5):
        seeds = [3 * rep, 3 * rep + 1, 3 * rep + 2]  # independent probes for every (rep, sample) pair
        h = exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=32, seed=seeds, dtype=f64)
        z.append((h.ed_fro - resnet_exact.ed_fro) / h.ed_stderr)
        torch.testing.assert_close(h.asym, resnet_exact.asym, rtol=0.1, atol=0)
    z = torch.cat(z)  # 15 (seed, sample) pairs: about 1% of |z| exceed 3 with 32 probes
    assert (z.abs() > 3).sum() <= 1 and (z.abs() < 4).all(), z


def test_reported_stderr_matches_spread_over_seeds(resnet_field, resnet_x, resnet_exact):
    n = 48
    x = resnet_x[:1].expand(n, -1, -1, -1)
    h = exterior_derivative(resnet_field, x, method="hutchinson", probes=16, seed=list(range(n)), dtype=f64)
    spread = h.ed_fro.std()
    ratio = spread / h.ed_stderr.mean()
    assert 0.7 < ratio < 1.45, ratio
    assert (h.ed_fro.mean() - resnet_exact.ed_fro[0]).abs() < 3 * spread / math.sqrt(n)


def test_batch_independence(resnet_field, resnet_x, resnet_exact):
    alone = exterior_derivative(resnet_field, resnet_x[:1], method="exact", curl_map=True, dtype=f64)
    torch.testing.assert_close(alone.ed_fro, resnet_exact.ed_fro[:1], rtol=1e-10, atol=0)
    torch.testing.assert_close(alone.jac_fro, resnet_exact.jac_fro[:1], rtol=1e-10, atol=0)
    h1 = exterior_derivative(resnet_field, resnet_x[:1], method="hutchinson", seed=[7], curl_map=True, dtype=f64)
    h3 = exterior_derivative(resnet_field, resnet_x, method="hutchinson", seed=[7, 8, 9], curl_map=True, dtype=f64)
    for name in ("ed_fro", "jac_fro", "ed_stderr", "curl_map"):
        torch.testing.assert_close(getattr(h1, name)[0], getattr(h3, name)[0], rtol=1e-10, atol=1e-12)
    # an int seed means the same probes for every sample, wherever it sits in the batch
    same = exterior_derivative(resnet_field, resnet_x[[0, 0]], method="hutchinson", seed=7, dtype=f64)
    torch.testing.assert_close(same.ed_fro, h1.ed_fro.expand(2), rtol=1e-10, atol=0)


def test_rerun_is_bit_identical(resnet_field, resnet_x):
    a = exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=8, seed=3, curl_map=True,
                            dtype=f64)
    b = exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=8, seed=3, curl_map=True,
                            dtype=f64)
    for name in ("ed_fro", "jac_fro", "asym", "ed_stderr", "curl_map"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=8, seed=4, dtype=f64)
    assert not torch.equal(a.ed_fro, c.ed_fro)


def test_rtol_adds_rounds_until_target(resnet_field, resnet_x, resnet_exact):
    res = exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=8, rtol=0.03, dtype=f64)
    assert res.probes > 8 and res.probes % 8 == 0 and res.probes < 1024
    assert (res.ed_stderr / res.ed_fro < 0.03).all()
    assert ((res.ed_fro - resnet_exact.ed_fro).abs() < 4 * res.ed_stderr).all()
    assert res.rtol_met.all()
    with pytest.warns(RuntimeWarning, match="rtol 1e-06 not reached for samples \\[0, 1.*cap of 20 probes"):
        capped = exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=8, rtol=1e-6, max_probes=20,
                                     dtype=f64)
    assert capped.probes == 20 and not capped.rtol_met.any()  # said, and recorded per sample
    assert exterior_derivative(resnet_field, resnet_x, method="hutchinson", probes=8, dtype=f64).rtol_met is None


def test_auto_picks_exact_for_small_and_hutchinson_for_large():
    A = random_matrix(6, seed=6)
    assert exterior_derivative(linear_field(A), torch.randn(2, 6), method="auto").method == "exact"
    n = EXACT_MAX_N["cpu"] + 1
    assert exterior_derivative(lambda x: 2 * x, torch.randn(2, n), probes=4).method == "hutchinson"
    # not even one row of J fits in the memory budget: auto falls back, explicit exact says so
    assert exterior_derivative(linear_field(A), torch.randn(2, 6), max_memory=100).method == "hutchinson"
    with pytest.raises(ExactMemoryError, match="max_memory"):
        exterior_derivative(linear_field(A), torch.randn(2, 6), method="exact", max_memory=100)


def _streaming_budget(f, x, rows: int) -> int:
    """A memory budget under which the whole Jacobians do not fit but `rows` rows streamed at once do."""
    _, _, act = linearize(f, x)
    B, n, size = x.shape[0], x[0].numel(), x.element_size()
    budget = act + rows * (act + 4 * B * n * size)
    assert jacobian_rows_per_chunk(x, act, budget) == 0 and products_per_chunk(x, act, budget) == rows
    return budget


@pytest.mark.parametrize("rows", [1, 3])
def test_exact_streamed_over_the_budget_equals_the_whole_jacobians(rows):
    """Over the memory budget the exact estimator streams rows of J - J^T (J^T e_k - J e_k): the same numbers as
    from the whole Jacobians and as the closed form of a linear field, curl map included."""
    A, x = random_matrix(128, seed=8), torch.randn(2, 2, 8, 8, dtype=f64)
    res = exterior_derivative(linear_field(A), x, method="exact", curl_map=True,
                              max_memory=_streaming_budget(linear_field(A), x, rows))
    assert res.method == "exact" and torch.equal(res.ed_stderr, torch.zeros(2, dtype=f64))
    torch.testing.assert_close(res.ed_fro, torch.linalg.matrix_norm(A - A.T).expand(2), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.jac_fro, torch.linalg.matrix_norm(A).expand(2), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.curl_map[1], curl_truth(A - A.T, (2, 8, 8)), rtol=1e-12, atol=0)
    # a nonlinear field: streamed as from its whole Jacobians and from torch.func.jacrev per sample
    W, V = random_matrix(128, seed=9)[:, :96], random_matrix(128, seed=10)[:, :96]
    f = lambda y: (torch.tanh(y.flatten(1) @ W) @ V.T).reshape(y.shape)  # noqa: E731
    whole = exterior_derivative(f, x, method="exact", curl_map=True)
    streamed = exterior_derivative(f, x, method="exact", curl_map=True, max_memory=_streaming_budget(f, x, rows))
    for k in ("ed_fro", "jac_fro", "asym", "curl_map"):
        torch.testing.assert_close(getattr(streamed, k), getattr(whole, k), rtol=1e-12, atol=0)
    J = torch.stack([jacrev(f)(xb[None]).reshape(128, 128) for xb in x])
    torch.testing.assert_close(streamed.ed_fro, torch.linalg.matrix_norm(J - J.transpose(1, 2)), rtol=1e-12, atol=0)


def test_memory_budget_follows_the_device_and_the_environment(monkeypatch):
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory_budget(torch.device("cpu")) == int(ram * CPU_SHARE)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * 2**30)
    assert memory_budget(torch.device("cuda", 1)) == int(14 * 2**30 * CUDA_SHARE)  # free + cached but unused
    for text, size in (("8GiB", 8 * 2**30), ("512 MiB", 2**29), ("1000", 1000), ("1.5GB", 1.5e9)):
        monkeypatch.setenv(MEMORY_ENV, text)
        assert memory_budget(torch.device("cpu")) == memory_budget(torch.device("cuda")) == size
    for bad in ("lots", "8 parsecs", "-1GiB", "0"):
        monkeypatch.setenv(MEMORY_ENV, bad)
        with pytest.raises(EdtoolError, match=f"{MEMORY_ENV}=.* is not a memory size"):
            memory_budget(torch.device("cpu"))


# ----------------------------------------------------------------------------- analytic dispatch


class FakeMachine(ScoreField):
    """A field that knows its own Jacobian in closed form (like the ELS machines): J_b = c_b I + s_b (e_0 e_1^T),
    so ||J_b - J_b^T||_F = sqrt(2) s_b and ||J_b||_F^2 = n c_b^2 + s_b^2, chosen as b + 1 and 4."""

    def __call__(self, x):
        raise AssertionError("the analytic method must not evaluate the field")

    def closed_form(self, x):
        B, n = x.shape[0], x[0].numel()
        s = torch.arange(1.0, B + 1, dtype=torch.float64) / math.sqrt(2)
        c = ((16 - s**2) / n).sqrt()
        J = c[:, None, None] * torch.eye(n, dtype=torch.float64)
        J[:, 0, 1] += s
        return ClosedForm(J.to(x.dtype), "zeros", None)


def test_analytic_dispatch():
    x = torch.randn(3, 1, 4, 4)
    res = exterior_derivative(FakeMachine(), x, curl_map=True)
    assert res.method == "analytic" and res.probes == 0
    torch.testing.assert_close(res.ed_fro, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(res.asym, torch.tensor([0.125, 0.25, 0.375]))
    assert torch.equal(res.ed_stderr, torch.zeros(3)) and res.curl_map.shape == (3, 4, 4)
    # the curl map: rows 0 and 1 of D (pixels 0 and 1) hold s_b each, the other rows nothing
    torch.testing.assert_close(res.curl_map.flatten(1)[:, :2], torch.tensor([1.0, 2.0, 3.0])[:, None].expand(3, 2)
                               / math.sqrt(2))
    assert torch.equal(res.curl_map.flatten(1)[:, 2:], torch.zeros(3, 14))
    with pytest.raises(ValueError, match=r"closed form.*machine\.field\(t\)"):
        exterior_derivative(lambda x: x, x, method="analytic")


def test_an_els_machine_is_measured_through_its_field():
    """machine.field(t), as docs/python-api.md shows it, gives the closed form (auto and method="analytic"),
    equal to autograd's exact Jacobian of the machine's score; the machine itself (no time) is refused
    with that advice, never a TypeError from deep inside."""
    from edtool.els.factory import make_machine

    g = torch.Generator().manual_seed(0)
    images = torch.rand(30, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    els = make_machine("els-borders", images, patch_size=3)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    exact = exterior_derivative(lambda y: els.score(0.4, y), x, method="exact")
    for method in ("auto", "analytic"):
        res = exterior_derivative(els.field(0.4), x, method=method)
        assert res.method == "analytic" and torch.equal(res.ed_stderr, torch.zeros(2))
        torch.testing.assert_close(res.ed_fro, exact.ed_fro)
        torch.testing.assert_close(res.asym, exact.asym)
    assert bool((exact.asym > 1e-3).all())  # not a gradient field: the comparison can fail
    with pytest.raises(TypeError, match=r"got a LocalMachine \(a score model's field at one time is model\.field\(t\)\)"):
        exterior_derivative(els, x)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="same shape"):
        exterior_derivative(lambda x: x[:, :3], x)
    with pytest.raises(ValueError, match="floating"):
        exterior_derivative(lambda x: x, torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating"):
        exterior_derivative(lambda x: x, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="image-shaped"):
        exterior_derivative(lambda x: x, x, curl_map=True)
    with pytest.raises(ValueError, match="unknown method"):
        exterior_derivative(lambda x: x, x, method="jacfwd")
    with pytest.raises(ValueError, match="one per sample"):
        exterior_derivative(lambda x: x, x, method="hutchinson", seed=[1, 2, 3])
    with pytest.raises(ValueError, match="probes"):
        exterior_derivative(lambda x: x, x, method="hutchinson", probes=1)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_non_finite_output_gives_nan_and_a_warning(method):
    A = random_matrix(8, seed=7).float()

    def f(x):
        y = linear_field(A)(x)
        return y * torch.tensor([1.0, float("nan"), 1.0])[:, None]

    with pytest.warns(RuntimeWarning, match=r"samples \[1\]"):
        res = exterior_derivative(f, torch.randn(3, 8), method=method)
    for name in ("ed_fro", "jac_fro", "asym", "ed_stderr"):
        v = getattr(res, name)
        assert torch.isnan(v[1]) and torch.isfinite(v[[0, 2]]).all(), name
    tol = 0.5 if method == "hutchinson" else 1e-5
    torch.testing.assert_close(res.jac_fro[0], torch.linalg.matrix_norm(A), rtol=tol, atol=0)


@pytest.mark.gpu
def test_cuda_sees_the_same_probes_as_cpu():
    A = random_matrix(16, seed=8)
    x = torch.randn(2, 16, dtype=f64)
    cpu = exterior_derivative(linear_field(A), x, method="hutchinson", seed=[1, 2], dtype=f64)
    gpu = exterior_derivative(linear_field(A.cuda()), x.cuda(), method="hutchinson", seed=[1, 2], dtype=f64)
    assert gpu.ed_fro.device.type == "cuda"
    torch.testing.assert_close(gpu.ed_fro.cpu(), cpu.ed_fro, rtol=1e-10, atol=0)
