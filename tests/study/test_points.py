"""Point sources (SPEC 13): forward-noised held-out images equal the closed form for their seed."""

import math

import numpy as np
import pytest
import torch

from edtool.diffusion import initial_noise
from edtool.errors import EdtoolError
from edtool.study.points import default_held_out, held_out_indices, noised_points


def test_noised_points_are_the_forward_process_at_uniform_t():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.cat([initial_noise(s, (1, 1, 4, 4)) for s in (7, 8)])
    pts = noised_points(x0, eps, nsteps=5)
    assert len(pts) == 5
    for j, x in enumerate(pts):
        t = (5 - j) / 5
        b = 1 - math.cos(t / 1.008 * math.pi / 2) ** 2  # SPEC 2, by hand
        expected = math.sqrt(1 - b) * x0.double() + math.sqrt(b) * eps.double()
        np.testing.assert_allclose(x.double().numpy(), expected.numpy(), atol=2e-6)
    dist = [float((x - x0).norm()) for x in pts]
    assert dist == sorted(dist, reverse=True)  # from noise (t = 1) towards the data (t = 1/5)


def test_held_out_indices_distinct_seeded_and_a_prefix():
    a = held_out_indices(100, seed=4, realizations=10)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert held_out_indices(100, seed=4, realizations=3) == a[:3]  # more realizations extend, never reshuffle
    assert held_out_indices(100, seed=5, realizations=10) != a
    with pytest.raises(EdtoolError, match="held-out"):
        held_out_indices(5, seed=0, realizations=6)


def test_default_held_out_is_a_test_split():
    assert default_held_out("mnist5k") == ("mnist", "test")  # mnist5k's digits come from MNIST's training set
    assert default_held_out("cifar10") == ("cifar10", "test")
