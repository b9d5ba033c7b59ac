"""Locality profiles and alignment (SPEC 12) against independent truth: a brute-force loop over the
entries of small dense Jacobians, conv fields with a known band, the ELS machines' autograd Jacobian,
and exact values for the estimators (masked probes, Hutchinson)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edtool.jacobian.operators import BandJacobian, DenseJacobian, FieldJacobian, band_matvec, jacobian_operator
from edtool.jacobian.locality import alignment, default_radius, locality, locality_band, locality_dense, pixel_distances, r90
from edtool.els.band import dense_jacobian
from edtool.els.factory import make_machine
from edtool.els.band import band_valid
from edtool.networks.models import MinimalResNet, Network

f64 = torch.float64


def brute_profile(J, shape, R, circular=False):
    """loc_jac and loc_ed (R + 1,) of one dense J by looping over every entry (numpy, SPEC 12 verbatim)."""
    C, H, W = shape
    J = np.asarray(J, dtype=np.float64)
    D = J - J.T
    shells_j, shells_d = np.zeros(H + W + 2), np.zeros(H + W + 2)
    for i in range(C * H * W):
        c, y, x = np.unravel_index(i, shape)
        for j in range(C * H * W):
            c2, y2, x2 = np.unravel_index(j, shape)
            dy, dx = abs(y - y2), abs(x - x2)
            if circular:
                dy, dx = min(dy, H - dy), min(dx, W - dx)
            d = max(dy, dx)
            shells_j[d] += J[i, j] ** 2
            shells_d[d] += D[i, j] ** 2
    return np.cumsum(shells_j)[: R + 1] / shells_j.sum(), np.cumsum(shells_d)[: R + 1] / shells_d.sum()


def conv_field(k, C=1, seed=0, padding="zeros"):
    """f(x) = tanh(conv_k(x)) with random weights: its Jacobian row of pixel p is supported on the k x k
    window around p, with nonzero entries on the window's outer ring."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, C, k, k, generator=g, dtype=f64)
    mode = "constant" if padding == "zeros" else "circular"
    return lambda x: torch.tanh(F.conv2d(F.pad(x, (k // 2,) * 4, mode=mode), w))


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


# ----------------------------------------------------------------------------- geometry and profiles


@pytest.mark.parametrize("circular", [False, True])
def test_pixel_distances_are_chebyshev(circular):
    H, W = 4, 7
    d = pixel_distances(torch.arange(H * W), H, W, circular)
    for p in range(H * W):
        for q in range(H * W):
            dy, dx = abs(p // W - q // W), abs(p % W - q % W)
            if circular:
                dy, dx = min(dy, H - dy), min(dx, W - dx)
            assert d[p, q] == max(dy, dx)


@pytest.mark.parametrize("shape,circular", [((1, 5, 6), False), ((2, 4, 5), False), ((2, 5, 4), True)])
def test_dense_profile_equals_brute_force(shape, circular):
    n = math.prod(shape)
    J = rand(2, n, n)
    R = default_radius(shape)
    res = locality_dense(J, shape, R, circular, block=3)  # blocks smaller than the image
    for b in range(2):
        lj, le = brute_profile(J[b], shape, R, circular)
        np.testing.assert_allclose(res["loc_jac"][b].numpy(), lj, rtol=1e-12)
        np.testing.assert_allclose(res["loc_ed"][b].numpy(), le, rtol=1e-12)


def test_r90_smallest_radius_reaching_the_level_else_nan():
    loc = torch.tensor([[0.2, 0.89, 0.9, 1.0], [0.95, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.5],
                        [math.nan] * 4])
    out = r90(loc)
    assert out[:2].tolist() == [2.0, 0.0]
    assert math.isnan(out[2]) and math.isnan(out[3])  # beyond R, and no profile at all


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_conv_field_is_exactly_local_at_half_its_kernel(k, padding):
    """A conv with kernel k: loc = 1 from r = (k-1)/2 on, and less below (SPEC 12's band)."""
    x = rand(2, 2, 9, 9)
    op = FieldJacobian(conv_field(k, C=2, padding=padding), x, circular=padding == "circular")
    res = locality(op, radius=4, method="exact")
    assert res.method == "exact" and res.loc_jac.shape == (2, 5)
    h = (k - 1) // 2
    assert torch.equal(res.loc_jac[:, h:], torch.ones(2, 5 - h, dtype=f64))
    assert torch.equal(res.loc_ed[:, h:], torch.ones(2, 5 - h, dtype=f64))
    assert (res.loc_jac[:, :h] < 1 - 1e-3).all()
    assert (res.loc_ed[:, :h] < 1 - 1e-3).all()
    assert res.r90_jac.tolist() == res.r90_ed.tolist()
    assert (res.r90_jac <= h).all() and torch.equal(res.loc_jac_stderr, torch.zeros(2, 5, dtype=f64))
    assert torch.isnan(res.r90_ed).sum() == 0


# ----------------------------------------------------------------------------- the machines' band


@pytest.mark.parametrize("rule", ["els-borders", "els-circular", "ls"])
@pytest.mark.parametrize("k", [3, 5])
def test_machine_profile_from_band_equals_autograd_jacobian(rule, k):
    """The band's profile equals the profile of the machine's own autograd Jacobian, and is 1 from (k-1)/2."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 7, 7, generator=g, dtype=f64) * 2 - 1
    x = 0.8 * images[:2] + 0.6 * torch.randn(2, 1, 7, 7, generator=g, dtype=f64)
    m = make_machine(rule, images, patch_size=k)
    t = torch.full((2,), 0.4, dtype=f64)
    op = jacobian_operator(m.field(t), x)
    assert isinstance(op, BandJacobian)
    band = locality(op, radius=3)
    truth = locality(FieldJacobian(lambda v: m.score(t, v), x, circular=m.padding == "circular"), radius=3,
                     method="exact")
    torch.testing.assert_close(band.loc_jac, truth.loc_jac, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(band.loc_ed, truth.loc_ed, rtol=1e-9, atol=1e-12)
    h = (k - 1) // 2
    assert torch.equal(band.loc_jac[:, h:], torch.ones_like(band.loc_jac[:, h:]))
    assert (band.loc_jac[:, :h] < 1).all()


def test_band_larger_than_circular_image_folds_through_dense():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 1, 4, 4, generator=g, dtype=f64) * 2 - 1
    x = torch.randn(1, 1, 4, 4, generator=g, dtype=f64)
    m = make_machine("els-circular", images, patch_size=7)
    band = m.jacobian(0.5, x)
    res = locality_band(band, "circular", radius=2)
    lj, le = brute_profile(dense_jacobian(band, "circular")[0], (1, 4, 4), 2, circular=True)
    np.testing.assert_allclose(res["loc_jac"][0].numpy(), lj, rtol=1e-12)
    np.testing.assert_allclose(res["loc_ed"][0].numpy(), le, rtol=1e-12)


def test_ideal_machine_gives_a_dense_operator():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(5, 1, 4, 4, generator=g, dtype=f64) * 2 - 1
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=f64)
    m = make_machine("is", images)
    op = jacobian_operator(m.field(0.5), x)
    assert isinstance(op, DenseJacobian)
    lj, _ = brute_profile(op.J[1], (1, 4, 4), 2)
    np.testing.assert_allclose(locality(op, radius=2).loc_jac[1].numpy(), lj, rtol=1e-9)


@pytest.mark.parametrize("padding,k", [("zeros", 3), ("circular", 3), ("zeros", 5)])
def test_band_products_equal_dense_products(padding, k):
    band = rand(2, 2, 5, 6, 2, k, k, seed=4)
    if padding == "zeros":  # entries reaching outside the image are zero in a machine's band
        band = band * band_valid(5, 6, k, "cpu")[None, None, :, :, None]
    V = rand(3, 2, 2, 5, 6, seed=5)
    u, w = BandJacobian(band, padding).products(V)
    uu, ww = DenseJacobian(dense_jacobian(band, padding), (2, 5, 6)).products(V)
    torch.testing.assert_close(u, uu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, ww, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(band_matvec(band, V, padding), uu, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- masked probes


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = Network(MinimalResNet(emb_dim=16, num_layers=2)).to(dtype=f64)
    t = torch.tensor(0.5, dtype=f64)
    x = rand(2, 1, 8, 8, seed=6)
    return FieldJacobian(lambda v: net.score(t, v), x)


def test_probe_estimates_within_three_standard_errors_of_exact(resnet):
    exact = locality(resnet, radius=4, method="exact")
    est = locality(resnet, radius=4, method="probe", pixels=16, seed=[11, 12])
    assert est.method == "probe" and est.pixels == 16
    for name in ("loc_jac", "loc_ed"):
        e, se, truth = getattr(est, name), getattr(est, name + "_stderr"), getattr(exact, name)
        assert (se[:, :2] > 0).all()  # a real spread at small radii (this net reaches 1 at r = 3)
        assert ((e - truth).abs() <= 3 * se + 1e-12).all(), (name, e, truth, se)


def test_probe_error_bars_are_calibrated(resnet):
    """Over many seeds the estimates scatter around exact with about the spread their error bars claim."""
    exact = locality(resnet, radius=2, method="exact")
    z = []
    for s in range(40):  # loc_ed[0] is 0 for one channel (D has a zero diagonal): r = 1, 2 there
        est = locality(resnet, radius=2, method="probe", pixels=16, seed=s)
        z.append(torch.cat([((est.loc_jac - exact.loc_jac) / est.loc_jac_stderr)[0, :2],
                            ((est.loc_ed - exact.loc_ed) / est.loc_ed_stderr)[0, 1:]]))
    z = torch.stack(z)
    assert 0.5 < z.std().item() < 1.6 and z.mean().abs().item() < 0.5
    assert (z.abs() <= 3).float().mean() >= 0.95  # a t distribution with 15 degrees of freedom: 99 %


def test_probing_every_pixel_is_exact(resnet):
    exact = locality(resnet, radius=4, method="exact")
    every = locality(resnet, radius=4, method="probe", pixels=64, seed=0)
    torch.testing.assert_close(every.loc_jac, exact.loc_jac, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(every.loc_ed, exact.loc_ed, rtol=1e-12, atol=1e-12)
    assert torch.equal(every.loc_ed_stderr, torch.zeros_like(every.loc_ed_stderr))


def test_probes_on_several_channels():
    A = rand(2, 2 * 25, 2 * 25, seed=7)
    op = DenseJacobian(A, (2, 5, 5))
    exact = locality(op, radius=2)
    est = locality(op, radius=2, method="probe", pixels=10, seed=3)
    assert ((est.loc_jac - exact.loc_jac).abs() <= 3 * est.loc_jac_stderr + 1e-12).all()
    every = locality(op, radius=2, method="probe", pixels=25, seed=3)
    torch.testing.assert_close(every.loc_ed, exact.loc_ed, rtol=1e-12, atol=1e-12)


def test_probe_is_seeded_per_sample():
    A = rand(1, 36, 36, seed=8)
    one = locality(DenseJacobian(A, (1, 6, 6)), radius=2, method="probe", pixels=5, seed=4)
    two = locality(DenseJacobian(A.expand(2, 36, 36), (1, 6, 6)), radius=2, method="probe", pixels=5, seed=[9, 4])
    torch.testing.assert_close(two.loc_jac[1], one.loc_jac[0], rtol=0, atol=0)


def test_bad_arguments():
    op = DenseJacobian(rand(1, 16, 16), (1, 4, 4))
    with pytest.raises(ValueError, match="method"):
        locality(op, method="fast")
    with pytest.raises(ValueError, match="at least 2 pixels"):
        locality(op, method="probe", pixels=1)
    with pytest.raises(ValueError, match="radius"):
        locality(op, radius=-1)
    with pytest.raises(ValueError, match="differ"):
        alignment(op, DenseJacobian(rand(2, 16, 16), (1, 4, 4)))


def test_non_finite_score_gives_nan_profile():
    x = rand(2, 1, 4, 4)
    x[1, 0, 0, 0] = math.nan
    res = locality(FieldJacobian(lambda v: v * 2, x), radius=2)
    assert torch.isnan(res.loc_jac[1]).all() and torch.isnan(res.r90_jac[1])
    assert torch.equal(res.loc_jac[0], torch.ones(3, dtype=f64))  # 2 I: all on the diagonal


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_alignment_with_itself_is_one_and_with_its_negation_minus_one(resnet, method):
    f = resnet.f
    neg = FieldJacobian(lambda v: -f(v), resnet.x)
    same = alignment(resnet, resnet, method=method, probes=4)
    opposite = alignment(resnet, neg, method=method, probes=4)
    torch.testing.assert_close(same.align_jac, torch.ones(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(same.align_ed, torch.ones(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(opposite.align_jac, -torch.ones(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(opposite.align_ed, -torch.ones(2), rtol=0, atol=1e-6)
    assert same.method == method and same.reason is None


def test_exact_alignment_equals_the_frobenius_cosine():
    A, B = rand(2, 32, 32, seed=9), rand(2, 32, 32, seed=10)
    B[1] = 0.7 * A[1] + 0.3 * B[1]
    res = alignment(DenseJacobian(A, (2, 4, 4)), DenseJacobian(B, (2, 4, 4)))
    for b in range(2):
        a, c = A[b].numpy(), B[b].numpy()
        cos = lambda u, v: (u * v).sum() / np.sqrt((u * u).sum() * (v * v).sum())
        assert res.align_jac[b].item() == pytest.approx(cos(a, c), rel=1e-6)
        assert res.align_ed[b].item() == pytest.approx(cos(a - a.T, c - c.T), rel=1e-6)


def test_hutchinson_alignment_within_three_standard_errors(resnet):
    """The network against an ELS machine's band (products without a dense matrix) and a conv field."""
    conv = FieldJacobian(conv_field(3), resnet.x)
    exact = alignment(resnet, conv, method="exact")
    est = alignment(resnet, conv, method="hutchinson", probes=64, seed=[1, 2])
    assert est.method == "hutchinson" and est.probes == 64
    assert (est.align_jac_stderr > 0).all()
    assert ((est.align_jac - exact.align_jac).abs() <= 3 * est.align_jac_stderr).all()
    assert ((est.align_ed - exact.align_ed).abs() <= 3 * est.align_ed_stderr).all()


def test_alignment_against_a_machine_band_by_probes():
    g = torch.Generator().manual_seed(5)
    images = torch.rand(8, 1, 6, 6, generator=g, dtype=f64) * 2 - 1
    x = torch.randn(2, 1, 6, 6, generator=g, dtype=f64)
    m = make_machine("els-borders", images, patch_size=3)
    band = jacobian_operator(m.field(0.4), x)
    dense = DenseJacobian(band.dense(), (1, 6, 6))
    net = FieldJacobian(conv_field(3, seed=2), x)
    exact = alignment(net, dense, method="exact")
    est = alignment(net, band, method="hutchinson", probes=48, seed=3)
    assert ((est.align_jac - exact.align_jac).abs() <= 3 * est.align_jac_stderr).all()
    torch.testing.assert_close(alignment(net, band, method="exact").align_ed, exact.align_ed)


def test_symmetric_reference_leaves_ed_alignment_undefined():
    """A gradient field (symmetric J, here the ideal score machine) has no rotation to align: NaN, not 0."""
    g = torch.Generator().manual_seed(6)
    images = torch.rand(5, 1, 4, 4, generator=g, dtype=f64) * 2 - 1
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=f64)
    ideal = jacobian_operator(make_machine("is", images).field(0.5), x)
    other = FieldJacobian(conv_field(3), x)
    for method in ("exact", "hutchinson"):
        with pytest.warns(RuntimeWarning, match="symmetric"):
            res = alignment(other, ideal, method=method, probes=8)
        assert torch.isnan(res.align_ed).all() and torch.isnan(res.align_ed_stderr).all()
        assert torch.isfinite(res.align_jac).all()
        assert "reference's Jacobian is symmetric" in res.reason
