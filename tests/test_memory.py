"""Out of memory with several realizations in a batch lowers the batch; it never becomes NaN or zeros."""

import numpy as np
import pytest
import torch

from edtool.errors import EdtoolError
from edtool.memory import is_out_of_memory
from edtool.model import ScoreModel
from edtool.study import compute as pipeline
from edtool.config import ComputeConfig
from edtool.study.compute import compute
from edtool.store.run import open_run
from helpers import assert_one_line_error, edtool_in_process

ARRAYS = ("ed_fro", "jac_fro", "asym", "ed_stderr", "final", "done", "seed", "label")


class _FitsOneAtATime(ScoreModel):
    """Wraps a network so that any batch of more than one realization runs 'out of memory'."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.conditional, self.manifest = inner.name, inner.conditional, inner.manifest

    def _check(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def eps(self, t, x, label=None):
        self._check(x)
        return self.inner.eps(t, x, label)

    def score(self, t, x, label=None):
        self._check(x)
        return self.inner.score(t, x, label)


def _run(tmp_path, name, batch, monkeypatch=None, wrap=False):
    cfg = ComputeConfig(models=["resnet", "is"], nsteps=2, realizations=3, batch=batch, estimator="auto",
                        probes=4, run_dir=str(tmp_path / name), device="cpu")
    if wrap:
        real_prepare = pipeline.prepare
        wrappers = {}

        def prepare(c):
            study = real_prepare(c)
            study.models["resnet"] = wrappers["resnet"] = _FitsOneAtATime(study.models["resnet"])
            return study

        monkeypatch.setattr(pipeline, "prepare", prepare)
        return compute(cfg), wrappers["resnet"]
    return compute(cfg), None


def test_out_of_memory_lowers_the_batch_and_matches_batch_one(tmp_path, monkeypatch):

    summary, wrapper = _run(tmp_path, "guarded", batch=3, monkeypatch=monkeypatch, wrap=True)
    assert summary["failures"] == []
    assert 3 in wrapper.calls and max(wrapper.calls[-4:]) == 1  # tried 3, finished one at a time
    reference, _ = _run(tmp_path, "plain", batch=1)
    guarded, plain = open_run(summary["location"]), open_run(reference["location"])
    assert guarded.done_mask().all()
    for name in ARRAYS:
        a, b = guarded.read(name), plain.read(name)
        assert np.isfinite(a).all() if a.dtype.kind == "f" else True
        np.testing.assert_array_equal(a, b, err_msg=name)


class _Broken(ScoreModel):
    """A model whose every evaluation fails (as a device error would)."""

    name, conditional = "broken", False
    manifest = {"arch": "broken", "image_shape": [1, 32, 32], "padding": "zeros", "num_classes": None}

    def eps(self, t, x, label=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    score = eps


def test_retry_failed_recomputes_only_the_nan_cells(tmp_path, monkeypatch):
    cfg = dict(models=["resnet", "is"], nsteps=2, realizations=2, probes=4, device="cpu")
    real_prepare = pipeline.prepare

    def broken_prepare(c):
        study = real_prepare(c)
        study.models["resnet"] = _Broken()
        return study

    monkeypatch.setattr(pipeline, "prepare", broken_prepare)
    with pytest.warns(UserWarning, match="stored as NaN"):
        first = compute(ComputeConfig(run_dir=str(tmp_path / "run"), **cfg))
    assert len(first["failures"]) == 2
    run = open_run(first["location"])
    assert run.done_mask().all() and np.isnan(run.read("ed_fro", "resnet")).all()
    is_before = run.read("ed_fro", "is").copy()

    monkeypatch.setattr(pipeline, "prepare", real_prepare)
    compute(ComputeConfig(run_dir=str(tmp_path / "run"), **cfg))  # a plain rerun keeps finished cells
    assert np.isnan(open_run(first["location"]).read("ed_fro", "resnet")).all()
    compute(ComputeConfig(run_dir=str(tmp_path / "run"), retry_failed=True, **cfg))
    clean = compute(ComputeConfig(run_dir=str(tmp_path / "clean"), **cfg))
    retried, reference = open_run(first["location"]), open_run(clean["location"])
    for name in ARRAYS:
        np.testing.assert_array_equal(retried.read(name), reference.read(name), err_msg=name)
    np.testing.assert_array_equal(retried.read("ed_fro", "is"), is_before)


# ------------------------------------------------------------------ memory: the exact estimator, other failures

CIFAR_MODULE = '''
import torch

M = torch.randn(3, 3, generator=torch.Generator().manual_seed(7)) / 3


class Conv:
    """s(x) = -x + M x(shifted a pixel right) on CIFAR-shaped images: J is the same matrix at every point and time."""
    image_shape = (3, 32, 32)

    def score(self, t, x, label=None):
        return -x + torch.einsum("cd,...dhw->...chw", M.to(x.dtype), torch.roll(x, 1, dims=-1))


def out_of_memory():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
'''


@pytest.fixture
def cifar_module(tmp_path, monkeypatch):
    import sys

    (tmp_path / "cifarmod.py").write_text(CIFAR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cifarmod", None)
    return tmp_path


def _conv_truth(module_dir) -> tuple:
    """||J - J^T||_F and ||J||_F of the CIFAR module's linear field, from its dense matrix (autograd)."""
    import importlib

    import torch

    model = importlib.import_module("cifarmod").Conv()
    J = torch.func.jacrev(lambda y: model.score(None, y))(torch.zeros(3, 32, 32, dtype=torch.float64)).reshape(3072, 3072)
    return float(torch.linalg.matrix_norm(J - J.T)), float(torch.linalg.matrix_norm(J))


def _exact_cifar_run(module_dir, tmp_path, realizations: int, budget: str):
    """`edtool compute` of the CIFAR-shaped module at --batch 32 --estimator exact: done, at the closed form's numbers."""

    proc = edtool_in_process("compute", "--models", "conv=py:cifarmod:Conv", "--nsteps", "1", "--realizations",
                             realizations, "--batch", "32", "--estimator", "exact", "--run-dir", tmp_path / "run",
                             "--device", "cpu", "--quiet", env={"EDTOOL_MAX_MEMORY": budget})
    assert proc.returncode == 0, proc.stderr
    run = open_run(tmp_path / "run")
    assert run.done_mask().all() and run.config["models"]["conv"]["estimator"] == "exact"
    ed, jac = _conv_truth(module_dir)
    np.testing.assert_allclose(run.read("ed_fro", "conv"), ed, rtol=1e-4)
    np.testing.assert_allclose(run.read("jac_fro", "conv"), jac, rtol=1e-4)
    assert (run.read("ed_stderr", "conv") == 0).all() and run.notes() == []


@pytest.mark.parametrize("realizations, budget", [(2, "48MiB"), pytest.param(32, "256MiB", marks=pytest.mark.slow)])
def test_cifar_shaped_exact_at_batch_32_completes(cifar_module, tmp_path, realizations, budget):
    """A 3x32x32 model at --batch 32 --estimator exact: Jacobians over the memory budget (2 realizations: 75 MB
    over 48 MiB; with -m slow, 32 realizations: 1.2 GiB over 256 MiB), so their rows are streamed rather than
    the whole compute stopping; the numbers are the closed form's."""
    _exact_cifar_run(cifar_module, tmp_path, realizations=realizations, budget=budget)


def test_exact_that_does_not_fit_lowers_the_batch_then_measures_with_hutchinson(cifar_module, tmp_path, monkeypatch):
    """Not even one row of the exact Jacobians fits: the batch halves, then at one realization Hutchinson measures
    the cell, said in a note the run keeps; its numbers agree with the closed form within their standard errors."""
    monkeypatch.setenv("EDTOOL_MAX_MEMORY", "64KiB")
    notes = []

    class Notes(pipeline.Reporter):
        def note(self, message):
            notes.append(message)

    cfg = ComputeConfig(models=["conv=py:cifarmod:Conv"], nsteps=1, realizations=2, batch=2, estimator="exact",
                        probes=8, run_dir=str(tmp_path / "run"), device="cpu")
    summary = compute(cfg, Notes())
    assert summary["failures"] == []
    assert any("lowering --batch to 1" in n for n in notes)
    run = open_run(summary["location"])
    assert run.done_mask().all() and len(run.notes()) == 1 and "Hutchinson with 8 probes" in run.notes()[0]
    assert run.notes()[0] in notes
    ed, stderr = run.read("ed_fro", "conv"), run.read("ed_stderr", "conv")
    assert (stderr > 0).all() and (np.abs(ed - _conv_truth(cifar_module)[0]) < 5 * stderr).all()


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"),
    torch.cuda.OutOfMemoryError("Tried to allocate 20.00 MiB"),
    MemoryError(),
])
def test_allocation_failures_count_as_out_of_memory(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
                                   ValueError("out of memory budget: a late input check"),
                                   FloatingPointError("overflow")])
def test_other_failures_are_not_out_of_memory(error):
    assert not is_out_of_memory(error)


def test_cublas_allocation_failure_lowers_the_batch_instead_of_nan(cifar_module, tmp_path, monkeypatch):
    """A cuBLAS allocation failure (no "out of memory" in its text) with several realizations lowers the batch;
    the numbers are those of a run at batch 1, none NaN."""

    def run(name, batch, failing):
        real_prepare = pipeline.prepare

        def prepare(c):
            study = real_prepare(c)
            inner = study.models["conv"]

            class FailsOverOne(ScoreModel):
                name, conditional, manifest = inner.name, inner.conditional, inner.manifest

                def eps(self, t, x, label=None):
                    if failing and x.shape[0] > 1:
                        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
                    return inner.eps(t, x, label)

                def score(self, t, x, label=None):
                    self.eps(t, x, label)
                    return inner.score(t, x, label)

            study.models["conv"] = FailsOverOne()
            return study

        monkeypatch.setattr(pipeline, "prepare", prepare)
        cfg = ComputeConfig(models=["conv=py:cifarmod:Conv"], nsteps=2, realizations=2, batch=batch,
                            estimator="hutchinson", probes=4, run_dir=str(tmp_path / name), device="cpu")
        summary = compute(cfg)
        monkeypatch.setattr(pipeline, "prepare", real_prepare)
        return summary

    guarded, plain = run("guarded", 2, True), run("plain", 1, False)
    assert guarded["failures"] == []
    a, b = open_run(guarded["location"]), open_run(plain["location"])
    for name in ARRAYS:
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
    assert np.isfinite(a.read("ed_fro")).all()


def test_out_of_memory_outside_the_per_cell_guard_lowers_the_batch_then_is_one_line(tmp_path, monkeypatch):
    """The initial noises do not fit: with several realizations the batch halves; with one, an EdtoolError line
    (the CLI prints it, exit 2) instead of a traceback; cells finished before it are kept."""
    real_noises, sizes = pipeline.initial_noises, []

    def noises(seeds, shape):
        sizes.append(len(seeds))
        if len(seeds) > 1 or seeds[0] == pipeline_seeds[1]:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED")
        return real_noises(seeds, shape)

    pipeline_seeds = [0, 1]  # realization r has seed 0 + r
    monkeypatch.setattr(pipeline, "initial_noises", noises)
    cfg = ComputeConfig(models=["is"], nsteps=1, realizations=2, batch=2, run_dir=str(tmp_path / "run"), device="cpu",
                        max_samples=20)
    with pytest.raises(EdtoolError, match=r"^out of memory while computing realization 1 on cpu \(RuntimeError: CUDA "
                                          r"error: CUBLAS_STATUS_ALLOC_FAILED\); lower --batch"):
        compute(cfg)
    assert sizes == [2, 1, 1]
    assert open_run(tmp_path / "run").done_mask()[:, 0].tolist() == [True, False]


def test_out_of_memory_while_loading_is_one_line_on_the_command_line(cifar_module, tmp_path):

    proc = edtool_in_process("compute", "--models", "big=py:cifarmod:out_of_memory", "--nsteps", "1", "--run-dir",
                             tmp_path / "run", "--device", "cpu")
    assert_one_line_error(proc, "out of memory while loading the models and data (OutOfMemoryError: CUDA out of memory")


@pytest.mark.parametrize("budget", ["lots", "-2GiB"])
def test_a_bad_memory_budget_is_one_line_before_anything_is_written(tmp_path, budget):

    proc = edtool_in_process("compute", "--models", "is", "--nsteps", "1", "--run-dir", tmp_path / "run", "--device",
                             "cpu", env={"EDTOOL_MAX_MEMORY": budget})
    assert_one_line_error(proc, f"EDTOOL_MAX_MEMORY={budget!r} is not a memory size", "8GiB")
    assert not (tmp_path / "run").exists()
