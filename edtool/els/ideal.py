"""The ideal score machine `is` (SPEC 5): the exact score of the empirical distribution of the training
images. Its candidates are whole training images, so every pixel shares one candidate set; the score
streams through the same engine as the local machines (`els.engine.streamed_moments`) and the
Jacobian is dense (n x n) and symmetric, its ED read with `els.band.dense_ed_per_sample`.

    m = make_machine("is", images, labels)  # edtool.els.factory
    s = m.score(0.5, x)
"""

import math

import torch
from torch import Tensor

from edtool.els.band import dense_ed_per_sample
from edtool.els.engine import candidates_per_step, fill_from, image_keys, sliced_keys, streamed_moments
from edtool.els.machine import Machine
from edtool.model import ClosedForm


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
        make = lambda: [fill_from(train.new_empty(shape), lambda step: image_keys(train, step))]
        cached = self._keys.get((label, None, x.dtype, x.device), lambda: (math.prod(shape) * train.element_size(), make))
        if cached is None:
            return lambda step: image_keys(train, step)
        return lambda step: sliced_keys(cached[0], step)

    def _queries(self, x, a, b2) -> Tensor:
        """Rows [0, a x / b^2, -a^2 / (2 b^2)] (1, B, n+2) for whole-image candidates."""
        q = x.flatten(1) * (a / b2)[:, None]
        return torch.cat([torch.zeros_like(q[:, :1]), q, (-a * a / (2 * b2))[:, None]], -1)[None]

    def _score_run(self, x, t, k, label) -> Tensor:
        """-(x - a E_w[y]) / b^2 over whole training images y, for samples sharing a label."""
        a, b2 = self._coefficients(t, x)
        n = x[0].numel()
        step = candidates_per_step(1, x.shape[0], n + 2, self.chunk_size)
        moments = streamed_moments(self._queries(x, a, b2), self._source(label, x), step, lambda keys: keys[:, : n + 1])
        mean = moments[0, :, 1:].view_as(x)
        ab = a.view(-1, 1, 1, 1)
        return -(x - ab * mean.to(x.dtype)) / b2.view(-1, 1, 1, 1)

    def _jacobian_run(self, x, t, k, label) -> tuple:
        """Dense (B, n, n) Jacobian of the ideal score: (a^2/b^4) Cov_w(y) - I/b^2; weights below
        eps^2 of the total are dropped (their share is below float precision). No score comes with it."""
        a, b2 = self._coefficients(t, x)
        train = self._train(label, 0, x)  # (N, n)
        B, n = x.shape[0], train.shape[1]
        q = self._queries(x, a, b2)
        step = candidates_per_step(1, B, n + 2, self.chunk_size)
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
        return torch.stack(out), None

    def jacobian(self, t, x: Tensor, label=None) -> Tensor:
        """The dense (B, n, n) Jacobian d s / d x of the ideal score."""
        return super().jacobian(t, x, label)

    def closed_form(self, t, x: Tensor, label=None) -> ClosedForm:
        """The dense Jacobians (B, n, n), one sample at a time, so that no sample's numbers depend on the
        batch it came in; no score."""
        t = self._times(t, x)
        label = self._labels(label, x.shape[0], x.device)
        J = [super(IdealMachine, self).closed_form(t[b:b + 1], x[b:b + 1], None if label is None else label[b:b + 1])
             .jacobian for b in range(x.shape[0])]
        return ClosedForm(torch.cat(J), self.padding, None)

    def analytic_ed(self, t, x: Tensor, label=None, curl_map: bool = False) -> dict:
        """Exact ed_fro, jac_fro (B,) and the curl map (B, H, W) or None, one sample at a time
        (the dense Jacobian is n x n)."""
        return dense_ed_per_sample(self.closed_form(t, x, label).jacobian, x.shape[1:], curl_map)
