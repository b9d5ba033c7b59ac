"""Every JacobianOperator (dense matrix, closed-form band, a field by autograd) against the dense matrix it stands
for: the products J v and J^T v, the dense form, the closed-form ED (from the matrix by hand), and the interface
the estimators read (batch, shape, device, dtype, finite, score)."""

import pytest
import torch

from edtool.els.band import band_valid, dense_jacobian
from edtool.els.factory import make_machine
from edtool.jacobian.operators import (BandJacobian, DenseJacobian, FieldJacobian, JacobianOperator,
                                       closed_form_operator, jacobian_operator)
from edtool.model import ClosedForm

f64 = torch.float64
SHAPE = (2, 4, 5)  # C, H, W
N = 2 * 4 * 5


def _band(padding):
    """A random band (B=2, C, H, W, C, 3, 3), zero where a zero-padded window leaves the image."""
    band = torch.randn(2, *SHAPE, SHAPE[0], 3, 3, generator=torch.Generator().manual_seed(1), dtype=f64)
    if padding == "zeros":
        band = band * band_valid(SHAPE[1], SHAPE[2], 3, "cpu")[None, None, :, :, None]
    return band


def dense(padding):
    J = dense_jacobian(_band(padding), padding)
    return DenseJacobian(J, SHAPE, circular=padding == "circular", closed=True), J


def band(padding):
    b = _band(padding)
    return BandJacobian(b, padding), dense_jacobian(b, padding)


def field(padding):
    J = dense_jacobian(_band(padding), padding)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=f64)
    linear = lambda v: torch.einsum("bij,bj->bi", J, v.flatten(1)).view_as(v)  # J at every point
    return FieldJacobian(linear, x, circular=padding == "circular"), J


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("make", [dense, band, field], ids=["dense", "band", "field"])
def test_operator_equals_its_dense_matrix(make, padding):
    op, J = make(padding)
    assert isinstance(op, JacobianOperator)
    assert op.batch == 2 and op.shape == SHAPE and op.circular == (padding == "circular")
    assert op.device == J.device and op.dtype == f64 and bool(op.finite.all()) and op.score is None
    V = torch.randn(3, 2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=f64)
    u, w = op.products(V)
    flat = V.flatten(2)
    torch.testing.assert_close(u.flatten(2), torch.einsum("bij,pbj->pbi", J, flat), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.flatten(2), torch.einsum("bji,pbj->pbi", J, flat), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.dense(), J, rtol=1e-12, atol=1e-12)
    ed = op.closed_form_ed(curl_map=True)
    if isinstance(op, FieldJacobian):  # autograd has no closed form: the estimators differentiate the field
        assert ed is None and op.chunk(2**30) >= 1
        return
    D = J - J.transpose(1, 2)
    torch.testing.assert_close(ed["ed_fro"], D.square().sum((1, 2)).sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ed["jac_fro"], J.square().sum((1, 2)).sqrt(), rtol=1e-12, atol=1e-12)
    rows = D.square().sum(2).sqrt().view(2, *SHAPE).sum(1)  # r_p = sum_c ||row (c, p) of D||
    torch.testing.assert_close(ed["curl_map"], rows, rtol=1e-12, atol=1e-12)
    assert op.chunk() is None  # a closed form holds no graph: the caller chooses its chunks


def test_a_dense_matrix_that_is_no_closed_form_has_no_exact_ed():
    op, _ = dense("zeros")
    assert DenseJacobian(op.J, SHAPE).closed_form_ed() is None


def test_a_dense_operator_too_large_for_the_budget_is_none_and_a_field_marks_non_finite_samples():
    op, _ = band("zeros")
    assert op.dense(max_memory=100) is None
    x = torch.ones(2, *SHAPE, dtype=f64)
    nan_second = FieldJacobian(lambda v: v * torch.tensor([1.0, float("nan")], dtype=f64).view(2, 1, 1, 1), x)
    assert nan_second.finite.tolist() == [True, False]


def test_jacobian_operator_takes_a_closed_form_and_differentiates_anything_else():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(20, 1, 6, 6, generator=g, dtype=f64) * 2 - 1
    x = torch.randn(2, 1, 6, 6, generator=g, dtype=f64)
    els, ideal = make_machine("els-circular", images, patch_size=3), make_machine("is", images)
    op = jacobian_operator(els.field(0.5), x)
    assert isinstance(op, BandJacobian) and op.circular and op.score is not None
    torch.testing.assert_close(op.score, els.score(0.5, x), rtol=1e-10, atol=1e-10)
    op = jacobian_operator(ideal.field(0.5), x)
    assert isinstance(op, DenseJacobian) and not op.circular and op.score is None
    torch.testing.assert_close(op.dense(), jacobian_operator(lambda v: ideal.score(0.5, v), x).dense(),
                               rtol=1e-8, atol=1e-8)  # a plain callable: autograd, the same matrix
    closed = ClosedForm(op.J, "zeros", None)
    assert closed_form_operator(closed, (1, 6, 6), circular=True).circular  # a caller's distances win for J
