"""The ELS-family machines against independent truth: a plain per-pixel brute force written from
SPEC 5.1, the exact score of the empirical distribution (autograd), and torch.func.jacrev."""

import math

import pytest
import torch

from edtool.els.band import band_ed, dense_ed, dense_jacobian
from edtool.els.factory import make_machine, resolve_machine_name
from els_truth import brute_force, coefficients, data, ideal_truth, jacrev_dense, mnist_subset, noisy, rel

# (machine, paper_circular) pairs: every candidate rule, both paddings
RULES = [("ls", False), ("els-borders", False), ("els-circular", False), ("els-circular", True)]


# ------------------------------------------------------------------ scores


@pytest.mark.parametrize("rule,paper", RULES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_score_matches_brute_force(rule, paper, k):
    images, _ = data(n=10)
    x = noisy(images, 0.4)
    m = make_machine(rule, images, patch_size=k, paper_circular=paper, chunk_size=200)
    torch.testing.assert_close(m.score(0.4, x), brute_force(rule, images, x, 0.4, k, paper), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule,paper", [r for r in RULES if not r[1]])
def test_score_matches_brute_force_patch_larger_than_image(rule, paper):
    images, _ = data(n=8, shape=(1, 5, 5))
    x = noisy(images, 0.3)
    m = make_machine(rule, images, patch_size=7)
    torch.testing.assert_close(m.score(0.3, x), brute_force(rule, images, x, 0.3, 7), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule,paper", RULES)
def test_score_matches_brute_force_two_channels_non_square(rule, paper):
    images, _ = data(n=6, shape=(2, 5, 7))
    x = noisy(images, 0.6)
    m = make_machine(rule, images, patch_size=3, paper_circular=paper, chunk_size=50)
    torch.testing.assert_close(m.score(0.6, x), brute_force(rule, images, x, 0.6, 3, paper), rtol=1e-10, atol=1e-10)


def test_borders_machine_is_local_machine_when_patch_covers_image():
    images, _ = data(n=10, shape=(1, 5, 5))
    x = noisy(images, 0.5)
    for k in (5, 7, 9):
        ls = make_machine("ls", images, patch_size=k).score(0.5, x)
        torch.testing.assert_close(make_machine("els-borders", images, patch_size=k).score(0.5, x), ls)


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_ideal_score_is_exact_empirical_score(t):
    images, _ = data(n=15, shape=(2, 4, 4))
    x = noisy(images, t, b=3)
    m = make_machine("is", images, chunk_size=40)
    torch.testing.assert_close(m.score(t, x), ideal_truth(images, x, t), rtol=1e-9, atol=1e-9)


def test_ideal_score_agrees_with_local_machine_when_windows_cover_the_image():
    # a window of size 2H-1 at any pixel sees the whole image: ls then equals is
    images, _ = data(n=10, shape=(1, 4, 4))
    x = noisy(images, 0.5)
    torch.testing.assert_close(
        make_machine("ls", images, patch_size=7).score(0.5, x), make_machine("is", images).score(0.5, x)
    )


@pytest.mark.parametrize("rule,paper", RULES + [("is", False)])
def test_small_t_is_finite_and_the_nearest_patch_limit(rule, paper):
    images, _ = data(n=10)
    x = noisy(images, 0.01, seed=3, pure_noise=False)  # near the data: no near-ties between patches
    k = None if rule == "is" else 3
    m = make_machine(rule, images, patch_size=k, paper_circular=paper, chunk_size=64)
    s = m.score(0.01, x)
    assert torch.isfinite(s).all()
    if rule == "is":
        a, b2 = coefficients(0.01)
        d2 = ((x[:, None] - a * images[None]) ** 2).flatten(2).sum(-1)
        limit = -(x - a * images[d2.argmin(1)]) / b2
        clear = torch.ones_like(s, dtype=torch.bool)
    else:
        torch.testing.assert_close(s, brute_force(rule, images, x, 0.01, 3, paper), rtol=1e-9, atol=1e-9)
        gaps = torch.zeros_like(x[:, 0])
        limit = brute_force(rule, images, x, 0.01, 3, paper, nearest=True, gaps=gaps)
        clear = (gaps > 40)[:, None].expand_as(s)  # runner-up weight < e^-40: the limit is reached
        assert clear.float().mean() > 0.9
    torch.testing.assert_close(s[clear], limit[clear], rtol=1e-9, atol=1e-9 * limit.abs().max().item())
    # float32 gets there too, without overflow or 0/0
    s32 = make_machine(rule, images.float(), patch_size=k, paper_circular=paper).score(0.01, x.float())
    assert torch.isfinite(s32).all()
    torch.testing.assert_close(s32.double()[clear], limit[clear], rtol=1e-3, atol=1e-3 * limit.abs().max().item())


@pytest.mark.parametrize("rule,paper", RULES + [("is", False)])
@pytest.mark.parametrize("t", [0.01, 0.2])
def test_chunked_equals_unchunked_cached_equals_streamed(rule, paper, t):
    images, _ = data(n=12)
    x = noisy(images, t, b=3)
    k = None if rule == "is" else 3
    make = lambda **kw: make_machine(rule, images, patch_size=k, paper_circular=paper, **kw)
    huge = make(chunk_size=2**30).score(t, x)
    for kw in (dict(chunk_size=1), dict(chunk_size=7, cache_bytes=0), dict(chunk_size=2**30, cache_bytes=0)):
        torch.testing.assert_close(make(**kw).score(t, x), huge, rtol=1e-12, atol=1e-12 * huge.abs().max().item())
    with torch.no_grad():  # the in-place path gives the same numbers
        torch.testing.assert_close(make(chunk_size=5).score(t, x), huge, rtol=1e-12, atol=1e-12 * huge.abs().max().item())


def test_key_cache_respects_its_budget():
    images, _ = data(n=12)
    x = noisy(images, 0.3)
    one_set = 12 * 36 * (9 + 3) * 8  # bytes of the ls keys at k = 3, float64 (random windows: none merged)
    m = make_machine("ls", images, scales=[3, 5], cache_bytes=one_set)
    first = m.score(0.3, x)
    assert m._keys.nbytes() == one_set
    m.score(0.9, x)  # k = 5 does not fit: streamed, the k = 3 set stays
    assert list(m._keys.sets) == [(None, 3, torch.float64, x.device)]
    torch.testing.assert_close(m.score(0.3, x), first)


def test_per_sample_times():
    images, _ = data(n=10)
    x = noisy(images, 0.5, b=3)
    m = make_machine("els-borders", images, patch_size=3)
    t = torch.tensor([0.2, 0.5, 0.9])
    s = m.score(t, x)
    for b in range(3):
        torch.testing.assert_close(s[b : b + 1], m.score(t[b].item(), x[b : b + 1]))


def test_eps_is_minus_sqrt_beta_times_score():
    images, _ = data(n=10)
    x = noisy(images, 0.5)
    m = make_machine("ls", images, patch_size=3)
    torch.testing.assert_close(m.eps(0.5, x), -math.sqrt(coefficients(0.5)[1]) * m.score(0.5, x))


def test_scales_schedule_picks_patch_size_per_time():
    images, _ = data(n=8)
    x = noisy(images, 0.5)
    m = make_machine("els-borders", images, scales=[1, 3, 5, 7])
    picks = {0.01: 1, 0.25: 1, 0.26: 3, 0.5: 3, 0.51: 5, 0.75: 5, 0.76: 7, 1.0: 7}
    for t, k in picks.items():
        assert m.patch_size_at(t) == k
    for t in (0.25, 0.5, 1.0):
        fixed = make_machine("els-borders", images, patch_size=picks[t])
        torch.testing.assert_close(m.score(t, x), fixed.score(t, x))
    # a batch whose samples need different patch sizes is split and put back in order
    s = m.score(torch.tensor([0.2, 0.9]), x)
    torch.testing.assert_close(s[1:], make_machine("els-borders", images, patch_size=7).score(0.9, x[1:]))
    torch.testing.assert_close(s[:1], make_machine("els-borders", images, patch_size=1).score(0.2, x[:1]))


@pytest.mark.parametrize("rule", ["is", "ls", "els-borders", "els-circular"])
def test_class_conditional_uses_only_that_label(rule):
    images, labels = data(n=15)
    x = noisy(images, 0.4, b=3)
    k = None if rule == "is" else 3
    m = make_machine(rule, images, labels, patch_size=k)
    label = torch.tensor([2, 0, 2])
    s = m.score(0.4, x, label)
    for b in range(3):
        own = make_machine(rule, images[labels == label[b]], patch_size=k)
        torch.testing.assert_close(s[b : b + 1], own.score(0.4, x[b : b + 1]))
    assert not torch.allclose(s, m.score(0.4, x))  # unconditional differs
    torch.testing.assert_close(m.score(0.4, x, 1), m.score(0.4, x, torch.tensor([1, 1, 1])))


# ------------------------------------------------------------------ closed-form Jacobian


@pytest.mark.parametrize("rule,paper", RULES)
@pytest.mark.parametrize("k", [3, 5])
def test_closed_form_jacobian_equals_autograd(rule, paper, k):
    images, _ = data(n=10)
    x = noisy(images, 0.3)
    m = make_machine(rule, images, patch_size=k, paper_circular=paper, chunk_size=100)
    band = m.jacobian(0.3, x)
    assert band.shape == (2, 1, 6, 6, 1, k, k)
    torch.testing.assert_close(dense_jacobian(band, m.padding), jacrev_dense(m, 0.3, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule,paper", [r for r in RULES if not r[1]])
def test_closed_form_jacobian_patch_larger_than_image(rule, paper):
    # for circular padding a 7-window on a 5x5 image meets some pixels twice: contributions add
    images, _ = data(n=8, shape=(1, 5, 5))
    x = noisy(images, 0.3)
    m = make_machine(rule, images, patch_size=7)
    torch.testing.assert_close(dense_jacobian(m.jacobian(0.3, x), m.padding), jacrev_dense(m, 0.3, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule,paper", RULES)
def test_closed_form_jacobian_two_channels_conditional(rule, paper):
    images, labels = data(n=12, shape=(2, 5, 6))
    x = noisy(images, 0.5)
    label = torch.tensor([1, 2])
    m = make_machine(rule, images, labels, patch_size=3, paper_circular=paper)
    band = m.jacobian(0.5, x, label)
    assert band.shape == (2, 2, 5, 6, 2, 3, 3)
    dense = dense_jacobian(band, m.padding)
    torch.testing.assert_close(dense, jacrev_dense(m, 0.5, x, label), rtol=1e-9, atol=1e-9)


def test_ideal_jacobian_equals_autograd_and_is_symmetric():
    images, labels = data(n=12, shape=(2, 3, 3))
    x = noisy(images, 0.5)
    m = make_machine("is", images, labels)
    for label in (None, torch.tensor([0, 1])):
        J = m.jacobian(0.5, x, label)
        assert J.shape == (2, 18, 18)
        torch.testing.assert_close(J, jacrev_dense(m, 0.5, x, label), rtol=1e-9, atol=1e-9)
        res = dense_ed(J, (2, 3, 3))
        assert (res["ed_fro"] / (2 * res["jac_fro"]) < 1e-6).all()


@pytest.mark.parametrize("rule", ["ls", "els-borders"])
def test_local_jacobians_are_not_symmetric(rule):
    images, _ = data(n=10)
    x = noisy(images, 0.3)
    res = make_machine(rule, images, patch_size=3).analytic_ed(0.3, x)
    assert (res["ed_fro"] / (2 * res["jac_fro"]) > 1e-3).all()


@pytest.mark.parametrize("rule,paper,k", [r + (k,) for r in RULES for k in (3, 5)] + [("els-circular", False, 7)])
def test_analytic_ed_equals_dense_autograd(rule, paper, k):
    images, _ = data(n=10)
    x = noisy(images, 0.3)
    m = make_machine(rule, images, patch_size=k, paper_circular=paper)
    field = m.field(0.3)
    torch.testing.assert_close(field(x), m.score(0.3, x))
    res = m.analytic_ed(0.3, x, curl_map=True)
    truth = dense_ed(jacrev_dense(m, 0.3, x), (1, 6, 6), curl_map=True)
    for key in ("ed_fro", "jac_fro", "curl_map"):
        torch.testing.assert_close(res[key], truth[key], rtol=1e-9, atol=1e-9)
    assert m.analytic_ed(0.3, x)["curl_map"] is None


def test_analytic_ed_ideal_and_conditional():
    images, labels = data(n=12, shape=(1, 4, 4))
    x = noisy(images, 0.4)
    m = make_machine("is", images, labels)
    res = m.analytic_ed(0.4, x, label=1, curl_map=True)
    truth = dense_ed(jacrev_dense(m, 0.4, x, torch.tensor([1, 1])), (1, 4, 4), curl_map=True)
    torch.testing.assert_close(res["jac_fro"], truth["jac_fro"], rtol=1e-9, atol=1e-9)
    assert (res["ed_fro"] < 1e-9 * res["jac_fro"]).all()
    assert res["curl_map"].shape == (2, 4, 4)


def test_band_ed_counts_each_entry_once_on_a_hand_made_band():
    # J with a single off-diagonal entry J[p, q] = 2 (q right of p): ||J - J^T||_F = 2 sqrt(2)
    band = torch.zeros(1, 1, 4, 4, 1, 3, 3, dtype=torch.float64)
    band[0, 0, 1, 1, 0, 1, 2] = 2.0
    for padding in ("zeros", "circular"):
        res = band_ed(band, padding, curl_map=True)
        assert res["ed_fro"].item() == pytest.approx(2 * math.sqrt(2))
        assert res["jac_fro"].item() == pytest.approx(2)
        assert res["curl_map"][0, 1, 1].item() == pytest.approx(2) and res["curl_map"][0, 1, 2].item() == pytest.approx(2)
        assert res["curl_map"].sum().item() == pytest.approx(4)
    # at the image edge the zero-padded band entry points outside and must be ignored
    edge = torch.zeros(1, 1, 4, 4, 1, 3, 3, dtype=torch.float64)
    edge[0, 0, 1, 3, 0, 1, 2] = 2.0  # would wrap to column 0 for circular padding
    assert dense_jacobian(edge, "zeros").abs().sum() == 0
    assert dense_jacobian(edge, "circular")[0, 1 * 4 + 3, 1 * 4 + 0] == 2


def test_float32_jacobian_close_to_float64():
    images, _ = data(n=20)
    x = noisy(images, 0.2)
    m64 = make_machine("els-borders", images, patch_size=3)
    m32 = make_machine("els-borders", images.float(), patch_size=3)
    j64, j32 = m64.jacobian(0.2, x), m32.jacobian(0.2, x.float())
    assert j32.dtype == torch.float32
    assert (j32.double() - j64).abs().max() < 1e-4 * j64.abs().max()


# ------------------------------------------------------------------ settings and errors


def test_names_and_aliases():
    images, _ = data(n=4)
    assert make_machine("els", images, patch_size=3).name == "els-borders"
    assert resolve_machine_name("els", "circular") == "els-circular"
    assert resolve_machine_name("els", "zeros") == "els-borders"
    assert resolve_machine_name("ls", "circular") == "ls"
    assert make_machine("els-circular", images, patch_size=3).padding == "circular"
    with pytest.raises(ValueError, match="padding"):
        resolve_machine_name("els", "reflect")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="elsx", patch_size=3), "unknown machine"),
        (dict(name="ls", patch_size=4), "odd"),
        (dict(name="ls", patch_size=0), "odd"),
        (dict(name="ls", patch_size=-3), "odd"),
        (dict(name="ls", patch_size=True), "odd"),
        (dict(name="ls", patch_size=3.0), "odd"),
        (dict(name="ls"), "exactly one"),
        (dict(name="ls", patch_size=3, scales=[3]), "exactly one"),
        (dict(name="ls", scales=[3, 6]), r"scales\[1\]"),
        (dict(name="ls", scales=[]), "at least one"),
        (dict(name="is", patch_size=3), "whole image"),
        (dict(name="ls", patch_size=3, paper_circular=True), "paper_circular"),
        (dict(name="els-circular", patch_size=9, paper_circular=True), "image size"),
        (dict(name="ls", patch_size=3, chunk_size=0), "chunk_size"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    images, _ = data(n=4)
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_machine(name, images, **kwargs)


def test_bad_inputs_raise():
    images, labels = data(n=6)
    x = noisy(images, 0.5)
    with pytest.raises(ValueError, match="shape"):
        make_machine("ls", images[0], patch_size=3)
    with pytest.raises(ValueError, match="labels"):
        make_machine("ls", images, labels[:3], patch_size=3)
    m = make_machine("ls", images, labels, patch_size=3)
    with pytest.raises(ValueError, match="no training images have label 7"):
        m.score(0.5, x, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="without labels"):
        make_machine("ls", images, patch_size=3).score(0.5, x, 0)
    with pytest.raises(ValueError, match="shape"):
        m.score(0.5, x[:, :, :5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        m.score(0.0, x)
    with pytest.raises(ValueError, match="shape"):
        m.score(torch.tensor([0.5, 0.5, 0.5]), x)
    ms = make_machine("ls", images, scales=[3, 5])
    with pytest.raises(ValueError, match="same patch size"):
        ms.jacobian(torch.tensor([0.2, 0.9]), x)


# ------------------------------------------------------------------ through edtool.jacobian.ed


@pytest.mark.parametrize("rule,paper", RULES + [("is", False)])
def test_exterior_derivative_analytic_equals_exact(rule, paper):
    from edtool.jacobian.ed import exterior_derivative

    images, labels = data(n=10)
    x = noisy(images, 0.3)
    k = None if rule == "is" else 3
    field = make_machine(rule, images, labels, patch_size=k, paper_circular=paper).field(0.3, label=1)
    f64 = dict(curl_map=True, dtype=torch.float64)
    analytic = exterior_derivative(field, x, method="analytic", **f64)
    exact = exterior_derivative(lambda v: field(v), x, method="exact", **f64)  # autograd, no closed form
    assert analytic.method == "analytic" and exterior_derivative(field, x, **f64).method == "analytic"
    for key in ("ed_fro", "jac_fro", "curl_map"):
        torch.testing.assert_close(getattr(analytic, key), getattr(exact, key), rtol=1e-8, atol=1e-8)


def test_closed_form_brings_the_score_from_the_same_sums():
    """The closed form's score (what measure hands the DDIM step) equals a fresh evaluation to float
    precision, in the batch's order also where the batch splits into runs by label; the machine keeps no
    state between calls, so a differentiated call after a closed form has its own Jacobian."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(40, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    machine = make_machine("els-borders", images, torch.arange(40) % 2, patch_size=3)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t, label = torch.full((3,), 0.4, dtype=torch.float64), torch.tensor([1, 0, 1])
    with torch.no_grad():
        fresh = machine.score(t, x, label)
        closed = machine.field(t, label).closed_form(x)
        other = machine.score(t, x + 0.1, label)
    torch.testing.assert_close(closed.score, fresh, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(other, fresh) and closed.padding == "zeros"
    assert torch.equal(closed.jacobian, machine.jacobian(t, x, label))
    jac = torch.func.jacrev(lambda v: machine.score(t[:1], v.view(1, 1, 8, 8), label[:1]).flatten())(x[:1].flatten())
    torch.testing.assert_close(jac[2 * 8 + 2, 2 * 8 + 2], closed.jacobian[0, 0, 2, 2, 0, 1, 1])  # d s_p / d x_p


def test_autograd_probes_after_a_closed_form_see_the_field_itself():
    """Hutchinson's forward-mode probes run with grad mode off: after a closed form at the same point they must
    still differentiate the field (a score kept from the closed form would give J v = 0, asym = 1/sqrt(2))."""
    from edtool.jacobian.ed import exterior_derivative

    g = torch.Generator().manual_seed(5)
    images = torch.rand(30, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    field = make_machine("els-borders", images, patch_size=3).field(torch.full((2,), 0.4, dtype=torch.float64))
    before = exterior_derivative(field, x, method="hutchinson", probes=8, seed=0)
    closed = field.closed_form(x)
    after = exterior_derivative(field, x, method="hutchinson", probes=8, seed=0)
    assert torch.equal(before.ed_fro, after.ed_fro) and torch.equal(before.jac_fro, after.jac_fro)
    exact = band_ed(closed.jacobian, "zeros")
    assert ((after.asym - exact["ed_fro"] / (2 * exact["jac_fro"])).abs() < 0.2).all()  # 8 probes: near the truth
    assert ((after.asym - 2**-0.5).abs() > 0.3).all()


@pytest.mark.parametrize("nscales", [10, 20, 50, 1000])
def test_scale_index_exact_on_the_ddim_grid(nscales):
    """DDIM visits the grid times t = (j + 1) / N (diffusion.timesteps, float64); each gets schedule entry
    j, not its neighbour, also on the grid of a run with half as many steps; between grid points the
    entry above applies."""
    from edtool.diffusion import timesteps
    from edtool.els.schedule import scale_index

    grid = timesteps(nscales)[:-1].tolist()  # t_j = (N - j) / N: entry N - 1 - j
    assert [scale_index(t, nscales) for t in grid] == list(range(nscales - 1, -1, -1))
    coarse = timesteps(nscales // 2)[:-1].tolist()  # t = 2i / N: entry 2i - 1
    assert [scale_index(t, nscales) for t in coarse] == list(range(nscales - 1, 0, -2))
    between = [(j + 0.5) / nscales for j in range(nscales)]
    assert [scale_index(t, nscales) for t in between] == list(range(nscales))
    assert scale_index(0.0, nscales) == 0 and scale_index(1.5, nscales) == nscales - 1


# ------------------------------------------------------------------ merged identical windows


def test_merge_plan_counts_every_window_once():
    from edtool.els.merging import cell_windows, merge_plan
    from edtool.els.windows import window_index

    images, _ = mnist_subset(40)
    train = torch.nn.functional.pad(images, (1, 1, 1, 1)).flatten(1)
    cell = window_index(torch.arange(32 * 32), 1, 32, 32, 3)  # every position of the zero-padded images
    first, count = merge_plan(train, cell)
    assert bool((first[1:] > first[:-1]).all())  # in order of first occurrence
    windows = cell_windows(train, cell, first)
    every = train[:, cell].reshape(-1, 9)
    truth = {}
    for row in map(tuple, every.tolist()):
        truth[row] = truth.get(row, 0) + 1
    got = dict(zip(map(tuple, windows.tolist()), count.tolist()))
    assert got == truth and len(got) == len(windows) < 0.6 * len(every)


def test_merge_plan_stops_at_its_limit_before_copying_windows():
    from edtool.els.merging import merge_plan
    from edtool.els.windows import window_index

    images, _ = mnist_subset(40)
    train = torch.nn.functional.pad(images, (1, 1, 1, 1)).flatten(1)
    cell = window_index(torch.arange(32 * 32), 1, 32, 32, 3)
    first, count = merge_plan(train, cell)
    assert merge_plan(train, cell, limit=len(first) - 1) is None
    at_limit, count_at_limit = merge_plan(train, cell, limit=len(first))
    assert torch.equal(at_limit, first) and torch.equal(count_at_limit, count)


def test_distinct_windows_beyond_the_budget_are_never_merged(monkeypatch):
    """Full MNIST at k = 7 once copied every distinct window (killed at 21 GB) before finding they exceed
    the cache budget. With a budget between the distinct windows' size and a quarter of all windows',
    merging stops at the cell whose distinct windows overflow it, before copying them: nothing is
    cached and the score is the gathered one."""
    from edtool.els import machine as machines

    images, _ = mnist_subset(40)
    x = noisy(images[:2], 0.3)
    every = make_machine("els-borders", images, patch_size=3, cache_bytes=0).score(0.3, x)
    merged = make_machine("els-borders", images, patch_size=3)
    torch.testing.assert_close(merged.score(0.3, x), every, rtol=1e-5, atol=1e-5 * every.abs().max().item())
    need, all_windows = merged._keys.nbytes(), 40 * 32 * 32 * (9 + 3) * images.element_size()
    assert all_windows <= 4 * (need - 1)  # the budget below passes the cheap check on all windows

    plans = []
    real_plan = machines.merge_plan
    monkeypatch.setattr(machines, "merge_plan", lambda *a, **kw: plans.append(real_plan(*a, **kw)) or plans[-1])
    m = make_machine("els-borders", images, patch_size=3, cache_bytes=need - 1)
    torch.testing.assert_close(m.score(0.3, x), every, rtol=1e-5, atol=1e-5 * every.abs().max().item())
    assert plans[-1] is None  # counting stopped at the budget: the cell's windows were never copied
    assert m._keys.nbytes() == 0 and not m._keys.sets


def test_hash_collisions_never_merge_different_windows(monkeypatch):
    from edtool.els import merging

    images, _ = mnist_subset(12)
    x = noisy(images, 0.3)
    every = make_machine("els-borders", images, patch_size=3, cache_bytes=0).score(0.3, x)
    monkeypatch.setattr(merging, "_row_hash", lambda rows, out=None: torch.zeros(len(rows), dtype=torch.int64, out=out))
    m = make_machine("els-borders", images, patch_size=3)
    torch.testing.assert_close(m.score(0.3, x), every, rtol=1e-5, atol=1e-5 * every.abs().max().item())
    assert m._keys.nbytes() > 0  # the merged keys were built and used


slow = pytest.mark.slow
MNIST_CASES = [("els-borders", False, 3), ("els-circular", False, 3), pytest.param("ls", False, 3, marks=slow),
               pytest.param("els-borders", False, 5, marks=slow), pytest.param("els-circular", True, 5, marks=slow)]


@pytest.mark.parametrize("rule,paper,k", MNIST_CASES)
@pytest.mark.parametrize("t", [0.05, 0.9])
def test_merged_windows_equal_every_window_on_mnist(rule, paper, k, t):
    """Score, closed-form band and ED of the merged engine against the engine that scores every
    window (cache_bytes=0) on real digits: both paddings, edges and corners, small and large t,
    unconditional and class-conditional. In float64 they agree to rounding (1e-10); in float32,
    as used, both stay as close to the float64 truth as float32 allows
    (at t = 0.05 both are ~1e-5 off on the band: (a^2/b^4) Cov cancels digits), 1e-5 on the score."""
    from edtool.els.windows import candidate_cells

    images, labels = mnist_subset(30)
    x = noisy(images.double(), t, b=2, pure_noise=False)
    make = lambda imgs, **kw: make_machine(rule, imgs, labels, patch_size=k, paper_circular=paper, **kw)
    every64, merged64 = make(images.double(), cache_bytes=0), make(images.double())
    every32, merged32 = make(images, cache_bytes=0), make(images)
    with torch.no_grad():
        for lab in (None, labels[:2]):
            truth = every64.jacobian(t, x, lab)
            truth_ed = band_ed(truth, every64.padding, curl_map=True)
            fast = merged64.jacobian(t, x, lab)
            fast_ed = band_ed(fast, merged64.padding, curl_map=True)
            assert rel(merged64.score(t, x, lab), every64.score(t, x, lab)) < 1e-10
            assert rel(fast, truth) < 1e-10
            assert rel(fast_ed["jac_fro"], truth_ed["jac_fro"]) < 1e-10
            for name in ("ed_fro", "curl_map"):  # near 0 where J is nearly symmetric: relative to ||J||_F
                err = (fast_ed[name] - truth_ed[name]).norm() / truth_ed["jac_fro"].norm()
                assert err < 1e-10
            x32 = x.float()  # float32 rounding alone: both engines sit ~1e-5 off on the band at t = 0.05
            tol = 1e-4 if t < 0.1 else 1e-5
            assert rel(merged32.score(t, x32, lab), every64.score(t, x, lab)) < 1e-5
            fast32, dense32 = merged32.jacobian(t, x32, lab), every32.jacobian(t, x32, lab)
            assert rel(fast32, truth) < tol and rel(dense32, truth) < tol
            # (ed_fro of J - J^T cancels further: in float32 both engines are ~1e-4 off at t = 0.05)
            assert rel(band_ed(fast32, merged32.padding)["jac_fro"], truth_ed["jac_fro"]) < tol
    keys = merged32._keys.sets[(None, k, torch.float32, x.device)]
    columns = sum(int((K[:, -1] > -1e30).sum()) for K in keys)  # distinct windows (not the padding of short cells)
    every_column = sum(len(centers) for _, centers in candidate_cells(rule, 32, 32, k, paper)) * len(images)
    assert columns < 0.8 * every_column  # windows were merged, so the comparison tested something


def test_windows_are_merged_only_where_it_pays():
    """k <= 9 (grey): distinct windows kept between calls; k = 11: every window kept, unmerged (its
    windows rarely repeat and the merge costs more than it saves), the same numbers either way."""
    from edtool.els.merging import MERGE_MAX_ENTRIES

    images, _ = mnist_subset(8)
    x = noisy(images, 0.5, b=1, pure_noise=False)
    for k, merged in ((9, True), (11, False)):
        assert (k * k <= MERGE_MAX_ENTRIES) == merged
        m = make_machine("els-borders", images, patch_size=k)
        score = m.score(0.5, x)
        keys = m._keys.sets[(None, k, x.dtype, x.device)]
        windows = [len(images) * idx.shape[1] for _, _, idx in m._groups(k, x)]  # every window of each group's cells
        assert [K.shape[-1] < n for K, n in zip(keys, windows)] == [merged] * len(keys)
        every = make_machine("els-borders", images, patch_size=k, cache_bytes=0).score(0.5, x)
        assert rel(score, every) < 1e-6


@pytest.mark.parametrize("kind", ["els-borders", "is"])
def test_hutchinson_probes_run_through_the_machines(kind):
    """Forward-mode probes (torch.func.jvp) pass through the machines' score: the reused exp buffer and the
    fused kernel step aside for them, so --estimator hutchinson gives finite numbers within a few standard
    errors of the exact Jacobian's, never NaN (torch refuses forward AD through exp's out=)."""
    from edtool.jacobian.ed import exterior_derivative

    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    machine = make_machine(kind, images, **({} if kind == "is" else {"patch_size": 3}))
    x = torch.randn(1, 1, 8, 8, generator=g)
    field = lambda z: machine.score(torch.tensor(0.5), z)
    exact = exterior_derivative(field, x, method="exact")
    est = exterior_derivative(field, x, method="hutchinson", probes=64, seed=0)
    assert torch.isfinite(est.ed_fro).all() and torch.isfinite(est.jac_fro).all()
    assert abs(float(est.jac_fro[0]) - float(exact.jac_fro[0])) < 0.1 * float(exact.jac_fro[0])
    assert abs(float(est.ed_fro[0]) - float(exact.ed_fro[0])) <= 4 * float(est.ed_stderr[0]) + 1e-3 * float(exact.jac_fro[0])
