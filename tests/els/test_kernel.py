"""The fused ELS kernels (edtool/els/kernel.py) and the pure-torch fallback, both against the dense
float64 truth: score, Jacobian band and ED to 1e-5 in float32; and the fallback chosen, with one
warning, when the kernel cannot be built."""

import functools
import math
import warnings

import pytest
import torch

from edtool.els import kernel as els_kernels
from edtool.els.band import band_ed, dense_ed, dense_jacobian
from edtool.els.engine import posterior_moments
from edtool.els.factory import make_machine
from els_truth import brute_force, data, mnist_subset, noisy, rel

PATHS = ["fused", "torch"]


@pytest.fixture
def path(request, monkeypatch):
    """Run the test on the fused kernels or on the pure-torch engine (EDTOOL_ELS_KERNEL=torch)."""
    if request.param == "fused":
        monkeypatch.delenv(els_kernels.ENV, raising=False)
        if els_kernels.kernels() is None:
            pytest.skip("the fused kernel cannot be built here (no g++?)")
    else:
        monkeypatch.setenv(els_kernels.ENV, "torch")
    return request.param


def count_calls(monkeypatch, name):
    """Count calls of els_kernels.<name> (so a test knows which path ran)."""
    calls = []
    original = getattr(els_kernels, name)
    monkeypatch.setattr(els_kernels, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("rule,paper", [("ls", False), ("els-borders", False), ("els-circular", True)])
@pytest.mark.parametrize("k,t", [(3, 0.05), (3, 0.5), (5, 0.5)])
def test_float32_score_matches_float64_brute_force(path, rule, paper, k, t, monkeypatch):
    calls = count_calls(monkeypatch, "score_moments")
    images, _ = data(n=10)
    x = noisy(images, t)
    m = make_machine(rule, images.float(), patch_size=k, paper_circular=paper, chunk_size=300)
    with torch.no_grad():
        score = m.score(t, x.float())
    assert rel(score, brute_force(rule, images, x, t, k, paper)) < 1e-5
    assert bool(calls) == (path == "fused")


@functools.lru_cache(maxsize=None)
def _mnist_truth(k, t):
    """The float64 truth for test_mnist_score_band_and_ed_match_float64, computed once for both paths: float64
    queries never take the fused kernels (els_kernels.usable), so it is the same computation on either."""
    images, _ = mnist_subset(30)
    x = noisy(images.double(), t, b=2, pure_noise=False)
    truth = make_machine("els-borders", images.double(), patch_size=k, cache_bytes=0)
    with torch.no_grad():
        band64 = truth.jacobian(t, x)
        return images, x, truth.score(t, x), band64, band_ed(band64, "zeros", curl_map=True)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("k,t", [(3, 0.5), pytest.param(3, 0.9, marks=pytest.mark.slow),
                                 pytest.param(5, 0.5, marks=pytest.mark.slow), (11, 0.9)])
def test_mnist_score_band_and_ed_match_float64(path, k, t):
    """Real digits (merged windows at k <= 5, every window cached at k = 11), B = 2, against the
    float64 engine that scores every window (itself checked against brute force and autograd). The
    default run takes one merged and the cached case on each path; -m slow adds t = 0.9 and k = 5."""
    images, x, score64, band64, ed64 = _mnist_truth(k, t)
    m = make_machine("els-borders", images, patch_size=k)
    with torch.no_grad():
        assert rel(m.score(t, x.float()), score64) < 1e-5
        band = m.jacobian(t, x.float())
        ed = band_ed(band, "zeros", curl_map=True)
    assert rel(band, band64) < 1e-5
    assert rel(ed["jac_fro"], ed64["jac_fro"]) < 1e-5
    assert (ed["ed_fro"] - ed64["ed_fro"]).norm() / ed64["jac_fro"].norm() < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk,block", [(1700, None), (5000, 64)])
def test_score_kernel_streams_overflow_and_slices_like_the_engine(threads, chunk, block):
    """The kernel against posterior_moments in float64 on data built to exercise every branch: many
    chunks and slices merged, and a later candidate far better than all before (the lift)."""
    lib = els_kernels.kernels()
    if lib is None:
        pytest.skip("the fused kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    G, R, E, M = 3, 13, 7, 5000
    q = torch.randn(G, R, E, generator=g)
    q[..., 0], q[..., -1] = 0, 1  # the shift's slot; the log-count column
    keys = torch.randn(G, E, M, generator=g)
    keys[:, 0] = 1
    keys[:, -1, 4000:] += 100  # a far better block late in the stream: exp overflows there, rows are lifted
    rows = torch.tensor([0, 2, 5])
    chunks = lambda K: [K[..., m : m + chunk] for m in range(0, M, chunk)]
    truth = posterior_moments(q.double(), iter(chunks(keys.double())), lambda K: K[:, rows])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            floor = math.log(torch.finfo(torch.float32).tiny) + 8
            fused = els_kernels.score_moments(lib, q, iter(chunks(keys)), rows, floor, block)
    finally:
        torch.set_num_threads(old)
    assert fused.shape == (G, R, 3)
    assert (fused - truth).abs().max() < 1e-5 * truth.abs().max()


@pytest.mark.parametrize("rule,paper", [("ls", False), ("els-borders", False), ("els-circular", False),
                                        ("els-circular", True)])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_jacobian_band_and_ed_fused_torch_and_dense_float64_agree(rule, paper, k, monkeypatch):
    """The fused Jacobian kernel and the pure-torch engine (float32) against the float64 engine's band
    (itself checked against autograd in tests/els/test_machine.py) and against the ED of the dense float64
    Jacobian, on random images (every window distinct) and both paddings, at k = 3, 5, 7."""
    if els_kernels.kernels() is None:
        pytest.skip("the fused kernel cannot be built here (no g++?)")
    calls = count_calls(monkeypatch, "jacobian_moments")
    images, _ = data(n=10, shape=(1, 8, 8))
    t = 0.4
    x = noisy(images, t)
    padding = "circular" if rule == "els-circular" else "zeros"
    with torch.no_grad():
        band64 = make_machine(rule, images, patch_size=k, paper_circular=paper, cache_bytes=0).jacobian(t, x)
        dense = dense_ed(dense_jacobian(band64, padding), x.shape[1:], curl_map=True)
        bands = {}
        for path in ("fused", "torch"):
            if path == "torch":
                monkeypatch.setenv(els_kernels.ENV, "torch")
            else:
                monkeypatch.delenv(els_kernels.ENV, raising=False)
            m = make_machine(rule, images.float(), patch_size=k, paper_circular=paper, chunk_size=500)
            bands[path] = m.jacobian(t, x.float())
            assert bool(calls) == (path == "fused")
            calls.clear()
    for path, band in bands.items():
        ed = band_ed(band, padding, curl_map=True)
        assert rel(band, band64) < 1e-5, path
        assert rel(ed["jac_fro"], dense["jac_fro"]) < 1e-5, path
        assert (ed["ed_fro"] - dense["ed_fro"]).norm() / dense["jac_fro"].norm() < 1e-5, path
        assert rel(ed["curl_map"], dense["curl_map"]) < 1e-4, path
    assert rel(bands["fused"], bands["torch"]) < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C1,J,block", [(2, 10, None), (4, 28, 64), (3, 5, 48)])
def test_jacobian_kernel_streams_overflow_and_slices_like_the_engine(threads, C1, J, block):
    """jacobian_moments against posterior_moments in float64 with the outer-product values [1, c] x [1, P]:
    several chunks and slices, a partial last vector, and a late candidate far better than all before."""
    lib = els_kernels.kernels()
    if lib is None:
        pytest.skip("the fused kernel cannot be built here")
    g = torch.Generator().manual_seed(1)
    G, R, E, M = 2, 9, J + 2, 3001
    # multiples of 1/8 and 1/4: float32 logits are exact, so the test sees the kernel's sums, not rounded inputs
    q = (torch.randn(G, R, E, generator=g) * 4).round() / 8
    q[..., 0], q[..., -1] = 0, 1
    keys = (torch.randn(G, E, M, generator=g) * 4).round() / 4
    keys[:, 0] = 1
    keys[:, -1, 2500:] += 100  # the lift
    rows = torch.tensor([0, 3, 1, 4][:C1])
    chunks = lambda K: [K[..., m : m + 1100] for m in range(0, M, 1100)]
    values = lambda K: (K[:, rows][:, :, None] * K[:, None, :J]).flatten(1, 2)
    truth = posterior_moments(q.double(), iter(chunks(keys.double())), values)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            floor = math.log(torch.finfo(torch.float32).tiny) + 8
            fused = els_kernels.jacobian_moments(lib, q, iter(chunks(keys)), rows, J, floor, block)
    finally:
        torch.set_num_threads(old)
    assert fused.shape == (G, R, C1 * J)
    assert (fused - truth).abs().max() < 1e-5 * truth.abs().max()


@pytest.mark.parametrize("arch", ["-mavx512f", "-mavx2", "-mno-avx"])
def test_the_kernel_source_builds_for_every_vector_width(arch, tmp_path):
    """kernel.cpp picks its vector width and tiles by the CPU's registers (#ifdef __AVX512F__): each
    branch compiles, not only the one this machine's -march=native takes."""
    import platform
    import shutil
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which(els_kernels.CXX) is None:
        pytest.skip("needs g++ on x86-64")
    # -O0: the compile is the check (an intrinsic outside its -m target fails to inline at every -O level)
    run = subprocess.run([els_kernels.CXX, "-O0", "-std=c++17", "-fPIC", "-c", arch, str(els_kernels.SOURCE),
                          "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_fallback_when_the_kernel_cannot_be_built(monkeypatch, tmp_path):
    """No compiler: one warning naming the way out, then the pure-torch engine, same numbers."""
    monkeypatch.delenv(els_kernels.ENV, raising=False)
    monkeypatch.setenv("EDTOOL_KERNEL_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(els_kernels, "CXX", "no-such-compiler-xyz")
    els_kernels._load.cache_clear()
    try:
        images, _ = data(n=10)
        x = noisy(images, 0.5).float()
        m = make_machine("els-borders", images.float(), patch_size=3)
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="pure-torch engine") as caught:
            first = m.score(0.5, x)
        assert len([w for w in caught if "fused ELS kernel" in str(w.message)]) == 1
        assert "g++" in str(caught[0].message) and els_kernels.ENV in str(caught[0].message)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # one note per process, not one per call
            again = make_machine("els-borders", images.float(), patch_size=5).score(0.5, x)
        assert els_kernels.kernels() is None
        assert rel(first, brute_force("els-borders", images, noisy(images, 0.5), 0.5, 3)) < 1e-5
        assert rel(again, brute_force("els-borders", images, noisy(images, 0.5), 0.5, 5)) < 1e-5
    finally:
        els_kernels._load.cache_clear()  # later tests load the real kernel again


# each case is a file with no checksum beside it, so each takes the same path (not verified: rebuilt); the
# default run keeps "stale", a library the loader would take, and test_kernel_cache.py's
# test_a_damaged_cached_kernel_is_built_again_and_gives_the_same_numbers[truncate 4000] and [flip a byte]
# cover a file that does not match its checksum; the empty and garbage files run with -m slow
@pytest.mark.parametrize("damage", [pytest.param(b"", marks=pytest.mark.slow),
                                    pytest.param(b"not a shared library", marks=pytest.mark.slow), "stale"])
def test_a_damaged_or_stale_cached_kernel_is_built_again(damage, monkeypatch, tmp_path):
    """A file under the kernel's cache name that does not load (truncated, garbage) or lacks a kernel (a
    build of other source) is rebuilt once, silently, and then gives the engine's numbers."""
    import shutil

    if shutil.which(els_kernels.CXX) is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.delenv(els_kernels.ENV, raising=False)
    monkeypatch.setenv("EDTOOL_KERNEL_DIR", str(tmp_path))
    target = tmp_path / f"els_{els_kernels._cpu_tag()}.so"
    if damage == "stale":  # a real library without this source's kernels
        stale = tmp_path / "stale.cpp"
        stale.write_text('extern "C" void something_else() {}\n')
        import subprocess

        subprocess.run([els_kernels.CXX, "-shared", "-fPIC", str(stale), "-o", str(target)], check=True)
    else:
        target.write_bytes(damage)
    els_kernels._load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # rebuilt without a warning
            lib = els_kernels.kernels()
        assert lib is not None and hasattr(lib, "score_chunk") and hasattr(lib, "moments_chunk")
        images, _ = data(n=10)
        with torch.no_grad():
            got = make_machine("els-borders", images.float(), patch_size=3).score(0.5, noisy(images, 0.5).float())
        assert rel(got, brute_force("els-borders", images, noisy(images, 0.5), 0.5, 3)) < 1e-5
    finally:
        els_kernels._load.cache_clear()


def test_env_var_forces_the_torch_path(monkeypatch):
    monkeypatch.setenv(els_kernels.ENV, "torch")
    calls = count_calls(monkeypatch, "score_moments")
    images, _ = data(n=10)
    with torch.no_grad():
        make_machine("els-borders", images.float(), patch_size=3).score(0.5, noisy(images, 0.5).float())
    assert els_kernels.kernels() is None and not calls


def _cells(images, k, rule="els-borders"):
    """Zero-padded flat images and the stacked candidate cells of `rule` at patch size k."""
    from edtool.els.windows import candidate_cells, pad_images, stack_cells

    train = pad_images(images, k // 2, False).flatten(1).contiguous()
    return train, stack_cells(candidate_cells(rule, 32, 32, k), 1, 32, 32, k, train.device)


@pytest.mark.parametrize("k", [3, 5])
def test_compiled_merge_equals_the_torch_merge_and_counts_every_window(k):
    """merge_windows (one pass, hash table) = merge_plan_torch (hash, sort, compare) for every cell:
    same first occurrences, same counts; also when every hash collides (hash_bits=0: only the entry
    by entry comparison tells windows apart) and at the limit."""
    from edtool.els.merging import merge_plan_torch

    lib = els_kernels.kernels()
    if lib is None:
        pytest.skip("the fused kernel cannot be built here (no g++?)")
    images, _ = mnist_subset(12)
    train, groups = _cells(images, k)
    for _, _, idx in groups:
        for cell in idx:
            first, count = els_kernels.merge_windows(lib, train, cell, None)
            want_first, want_count = merge_plan_torch(train, cell)
            assert torch.equal(first, want_first) and torch.equal(count, want_count)
            assert int(count.sum()) == len(train) * cell.shape[0]
    cell = groups[0][2][0] if groups[0][2].shape[1] > 100 else max((i for _, _, g in groups for i in g), key=len)
    first, count = els_kernels.merge_windows(lib, train, cell, None)
    collided = els_kernels.merge_windows(lib, train, cell, None, hash_bits=0)
    assert torch.equal(collided[0], first) and torch.equal(collided[1], count)
    assert els_kernels.merge_windows(lib, train, cell, len(first) - 1) is None
    at_limit = els_kernels.merge_windows(lib, train, cell, len(first))
    assert torch.equal(at_limit[0], first) and torch.equal(at_limit[1], count)


def test_compiled_window_keys_equal_the_gathered_keys(monkeypatch):
    """window_keys (every window, and chosen ones) = the torch path's gathered keys [1; P; |P|^2]:
    P exactly, |P|^2 to float32 rounding; every_window_keys on both paths alike."""
    from edtool.els.engine import gathered_keys
    from edtool.els.merging import every_window_keys

    lib = els_kernels.kernels()
    if lib is None:
        pytest.skip("the fused kernel cannot be built here (no g++?)")
    images, _ = mnist_subset(7)
    train, groups = _cells(images, 5)
    _, _, idx = max(groups, key=lambda g: g[2].shape[1])
    want = torch.cat(list(gathered_keys(train, idx[:1], 10**9)), -1)[0]  # (D + 3, N * L)
    got = els_kernels.window_keys(lib, train, idx[0], torch.full_like(want, 7.0))
    assert torch.equal(got[: 26], want[: 26]) and bool((got[-1] == 7).all())  # row D + 2 untouched
    torch.testing.assert_close(got[26], want[26], rtol=1e-6, atol=1e-6)
    pick = torch.tensor([5, 0, len(want[0]) - 1, 17])
    some = els_kernels.window_keys(lib, train, idx[0], torch.zeros(28, 4), pick)
    assert torch.equal(some[:26], want[:26, pick])
    fused = every_window_keys(train, idx)
    monkeypatch.setenv(els_kernels.ENV, "torch")
    plain = every_window_keys(train, idx)
    assert torch.equal(fused[:, :26], plain[:, :26]) and bool((fused[:, 27] == 0).all())
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the score from box sums


@pytest.mark.parametrize("rule,paper", [("els-borders", False), ("els-circular", False), ("els-circular", True)])
@pytest.mark.parametrize("k,t,shape", [(3, 0.05, (1, 6, 6)), (3, 0.5, (2, 7, 5)), (5, 0.3, (1, 6, 9)), (7, 0.9, (1, 9, 10))])
def test_box_score_matches_float64_brute_force(rule, paper, k, t, shape, monkeypatch):
    """Every candidate rule's cells (interior, border bands scored on transposed images, corners, the whole
    circular image) from box sums, forced at small k, against the per-pixel brute force of SPEC 5.1."""
    from edtool.els import machine

    if els_kernels.kernels() is None:
        pytest.skip("the fused kernel cannot be built here (no g++?)")
    monkeypatch.setattr(machine, "BOX_FROM_K", 3)
    calls = count_calls(monkeypatch, "box_score")
    images, _ = data(n=10, shape=shape)
    x = noisy(images, t)
    m = make_machine(rule, images.float(), patch_size=k, paper_circular=paper)
    with torch.no_grad():
        score = m.score(t, x.float())
    assert calls
    assert rel(score, brute_force(rule, images, x, t, k, paper)) < 1e-5


@pytest.mark.parametrize("k", [9, 11, 19])
def test_box_score_on_mnist_is_exact_and_no_less_accurate_than_direct_products(k, monkeypatch):
    """Real digits, B = 2, at t near 0 (cancellation is worst), 0.5 and near 1: the score from box sums
    within 1e-5 of the float64 engine, and within 1.25x the error of the direct float32 products (the
    merged or cached keys; k = 19 exceeds them and runs the torch path) on the same inputs."""
    from edtool.els import machine

    if els_kernels.kernels() is None:
        pytest.skip("the fused kernel cannot be built here (no g++?)")
    calls = count_calls(monkeypatch, "box_score")
    images, _ = mnist_subset(10)
    m = make_machine("els-borders", images, patch_size=k)
    truth = make_machine("els-borders", images.double(), patch_size=k, cache_bytes=0)
    for t in (0.02, 0.5, 0.98):
        x = noisy(images.double(), t, b=2, pure_noise=False)
        with torch.no_grad():
            s64 = truth.score(t, x)
            box = rel(m.score(t, x.float()), s64)
            assert calls
            calls.clear()
            monkeypatch.setattr(machine, "BOX_FROM_K", 99)
            direct = rel(m.score(t, x.float()), s64)
            monkeypatch.setattr(machine, "BOX_FROM_K", 9)
            assert not calls
        assert box < 1e-5, t
        assert box <= 1.25 * direct + 1e-8, (t, box, direct)


def test_box_score_at_k3_near_t0_keeps_its_running_sums_short(monkeypatch):
    """At k = 3 near t = 0 (30 pixel rows per row offset) box sums slid row after row in float32 drift: on these
    inputs 1.2e-5 from the float64 engine at t = 0.02, 4.3x the direct products' error. Summed afresh every 8
    rows: 8.2e-6, 3.0x. (Never sliding still leaves 1.3-1.7x: the logit's terms are rounded in another order.
    The box path starts at BOX_FROM_K = 9, where its error equals the direct one.)"""
    from edtool.els import machine

    if els_kernels.kernels() is None:
        pytest.skip("the fused kernel cannot be built here (no g++?)")
    images, _ = mnist_subset(10)
    m = make_machine("els-borders", images, patch_size=3)
    truth = make_machine("els-borders", images.double(), patch_size=3, cache_bytes=0)
    for t in (0.02, 0.05):
        x = noisy(images.double(), t, b=2, pure_noise=False)
        with torch.no_grad():
            s64 = truth.score(t, x)
            monkeypatch.setattr(machine, "BOX_FROM_K", 3)
            box = rel(m.score(t, x.float()), s64)
            monkeypatch.setattr(machine, "BOX_FROM_K", 99)
            direct = rel(m.score(t, x.float()), s64)
        assert box < 1e-5, (t, box)
        assert box <= 3.5 * direct, (t, box, direct)


def test_the_cache_key_changes_with_every_byte_of_the_source(tmp_path, monkeypatch):
    """A library built from an older kernel.cpp is never loaded for a changed one: the build's file name
    (els_<tag>.so) hashes the source, so one changed byte gives another name, and the same bytes the same."""
    source = els_kernels.SOURCE.read_bytes()
    key = els_kernels._cpu_tag()
    copy = tmp_path / "kernel.cpp"
    copy.write_bytes(source)
    monkeypatch.setattr(els_kernels, "SOURCE", copy)
    assert els_kernels._cpu_tag() == key
    copy.write_bytes(source.replace(b"constexpr int BL = 8;", b"constexpr int BL = 8; "))
    assert copy.read_bytes() != source
    assert els_kernels._cpu_tag() != key
