"""The ELS machines' torch path, the one a GPU runs: block sizes chosen per device, one host sync per call
instead of one per block, a key cache sized for CIFAR-10, and the same numbers as the float64 reference."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edtool.els import windows
from edtool.els.engine import CPU_CHUNK_SIZE, CUDA_CHUNK_SIZE, chunk_size_for, posterior_moments, streamed_moments
from edtool.els.factory import DEFAULT_CACHE_BYTES, key_cache_bytes, make_machine
from els_truth import data, noisy

GiB = 2**30


class _Syncs(TorchDispatchMode):
    """Counts host syncs: tensors read as Python numbers (bool(), float(), .item())."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_block_size_follows_the_device():
    """Cache-sized on a CPU whatever its memory; on CUDA large, bounded by the free memory."""
    assert chunk_size_for("cpu", 512 * GiB) == chunk_size_for("cpu", GiB) == CPU_CHUNK_SIZE == 2**20
    assert chunk_size_for("cuda", 79 * GiB) == CUDA_CHUNK_SIZE == 2**27  # an H100: 512 MiB blocks in float32
    assert chunk_size_for("cuda", GiB, 4) == 2**24 and chunk_size_for("cuda", GiB, 8) == 2**23  # 16 blocks fit
    assert chunk_size_for("cuda", 2**20) == CPU_CHUNK_SIZE  # never smaller than a CPU's


def _chunks(G=2, R=12, D=4, M=40, count=6, scale=1.0, exact_last=False):
    """Queries (G, R, D+2) [0, s x, -s / 2] and `count` key chunks (G, D+2, M) [1; P; |P|^2]: logits
    -s ||x - P||^2 / 2 up to a per-row constant (s = a^2 / b^2 of the machines, large at small t). With
    `exact_last`, the last chunk holds row 0's own x, far better than any earlier candidate."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(G, R, D, generator=g)
    q = torch.cat([torch.zeros(G, R, 1), scale * x, torch.full((G, R, 1), -scale / 2)], -1)
    keys = []
    for _ in range(count):
        P = torch.randn(G, D, M, generator=g)
        if exact_last and len(keys) == count - 1:
            P[:, :, 0] = x[:, 0]
        keys.append(torch.cat([torch.ones(G, 1, M), P, P.square().sum(1, keepdim=True)], 1))
    return q, keys


def test_streamed_moments_read_the_device_once_per_call_and_equal_the_checked_path():
    q, keys = _chunks()
    values = lambda k: k[:, :3]  # noqa: E731
    with torch.no_grad():
        with _Syncs() as checked_syncs:
            checked = posterior_moments(q, iter(keys), values)
        with _Syncs() as streamed_syncs:
            streamed = streamed_moments(q, lambda step: iter(keys), 40, values)
    assert checked_syncs.count == len(keys) and streamed_syncs.count == 1
    assert torch.equal(streamed, checked)


def test_a_block_that_overflows_is_redone_checked():
    """A candidate far better than all before it overflows the unchecked sums (inf, NaN); the one check at the end
    finds it and the call is redone checked: finite, and the checked path's numbers."""
    q, keys = _chunks(scale=100.0, exact_last=True)
    values = lambda k: k[:, :3]  # noqa: E731
    with torch.no_grad():
        unchecked = posterior_moments(q, iter(keys), values, checked=False)
        checked = posterior_moments(q, iter(keys), values)
        streamed = streamed_moments(q, lambda step: iter(keys), 40, values)
    assert not torch.isfinite(unchecked).all() and torch.isfinite(checked).all()
    assert torch.equal(streamed, checked)


@pytest.mark.parametrize("rule", ["els-borders", "els-circular", "is"])
def test_gpu_sized_blocks_give_the_float64_numbers(rule, monkeypatch):
    """The float32 torch path with the blocks a GPU gets equals the float64 machine (score, and the closed-form
    Jacobian where it is a band) within float32's tolerance, as the CPU's blocks do."""
    monkeypatch.setenv("EDTOOL_ELS_KERNEL", "torch")
    images, _ = data(n=20)
    x = noisy(images, 0.2)
    k = None if rule == "is" else 3
    m64 = make_machine(rule, images, patch_size=k)
    gpu = make_machine(rule, images.float(), patch_size=k, chunk_size=chunk_size_for("cuda", 79 * GiB))
    cpu = make_machine(rule, images.float(), patch_size=k)
    assert gpu.chunk_size == 2**27 and cpu.chunk_size == 2**20
    with torch.no_grad():
        s64, j64 = m64.score(0.2, x), m64.jacobian(0.2, x)
        for m in (gpu, cpu):
            s32, j32 = m.score(0.2, x.float()), m.jacobian(0.2, x.float())
            assert (s32.double() - s64).abs().max() < 1e-5 * s64.abs().max()
            assert (j32.double() - j64).abs().max() < 1e-4 * j64.abs().max()


def _cifar10_keys(k: int = 3) -> int:
    """Bytes of every els-borders candidate key on CIFAR-10 (50,000 x 3 x 32 x 32, float32), none merged."""
    cells = windows.candidate_cells("els-borders", 32, 32, k, False)
    groups = windows.stack_cells(cells, 3, 32, 32, k, "cpu")
    return sum(idx.shape[0] * (idx.shape[2] + 3) * idx.shape[1] for _, _, idx in groups) * 50_000 * 4


def test_key_cache_follows_the_device_and_holds_cifar10_on_a_gpu(monkeypatch):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert key_cache_bytes(torch.device("cpu")) == max(DEFAULT_CACHE_BYTES, ram // 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (79 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    gpu = key_cache_bytes(torch.device("cuda"))
    assert gpu == int(79 * GiB / 4)
    need = _cifar10_keys()
    assert DEFAULT_CACHE_BYTES < need < gpu  # over the CPU default: on a GPU the keys are cached, not gathered every call
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (23 * GiB, 24 * GiB))
    assert need < key_cache_bytes(torch.device("cuda"))  # a 24 GB card holds them too
