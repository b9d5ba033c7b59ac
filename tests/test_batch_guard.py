"""Out of memory with several realizations in a batch lowers the batch; it never becomes NaN or zeros."""

import numpy as np
import pytest

from edtool.study import compute as pipeline
from edtool.study.compute import ComputeConfig, compute
from edtool.store.run import open_run

ARRAYS = ("ed_fro", "jac_fro", "asym", "ed_stderr", "final", "done", "seed", "label")


class _FitsOneAtATime:
    """Wraps a field so that any batch of more than one realization runs 'out of memory'."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

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


class _Broken:
    """A field whose every evaluation fails (as a device error would)."""

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
