"""The pipeline end to end (SPEC 7-9): compute -> aggregate -> plot on tiny settings, the
numbers against an independent recomputation, resume after SIGKILL bit for bit, refusals (other
settings, a live lock, bad input) that leave the store untouched, NaN (never zeros) for a failing
model, the seed tool's `analyze` flags and folder layout, shared trajectories and `status`.

Networks are tiny random-weight checkpoints (tests/conftest.py; the plumbing is under test, not the
science); the `is` machine on mnist5k is cheap and exactly conservative.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.study import compute as pipeline
from edtool.errors import EdtoolError
from edtool.study.compute import compute
from edtool.store.layout import STEP_ARRAYS
from edtool.store.location import store_url
from edtool.store.locks import lock_holders, run_lock
from edtool.store.run import open_run
from helpers import (ARRAYS, assert_same_arrays, cli, config, dead_pid, PNG, REPO, save_tiny, snapshot, subprocess_env,
                     wait_for_done_cell)
from edtool.model import ScoreModel

pytestmark = pytest.mark.usefixtures("tiny_networks")


# ------------------------------------------------------------------ end to end


def test_compute_aggregate_plot_end_to_end(tmp_path, capsys, monkeypatch, tiny_checkpoints):
    import xarray as xr

    run = tmp_path / "e2e"
    n_real, nsteps = 3, 3
    code, out, err = cli(capsys, monkeypatch, "compute", "--models", "resnet,is", "--nsteps", nsteps,
                         "--realizations", n_real, "--seed", 7, "--probes", 2, "--maps", "--device", "cpu",
                         "--run-dir", run)
    assert code == 0, err
    assert "resnet" in out and "time: total" in out
    code, out, err = cli(capsys, monkeypatch, "aggregate", run)
    assert code == 0, err
    assert f"aggregated {n_real} of {n_real} realizations" in out
    code, out, err = cli(capsys, monkeypatch, "plot", run)
    assert code == 0, err

    # the store as SPEC 8 says: arrays, shapes, dimension names, dtypes, attributes
    store = open_run(run)
    g = store.group
    dims = {"time": ("step",), "seed": ("realization",), "label": ("realization",), "model": ("model",),
            **{q: ("realization", "model", "step") for q in STEP_ARRAYS}, "done": ("realization", "model"),
            "final": ("realization", "model", "channel", "y", "x"),
            "curl_map": ("realization", "model", "step", "y", "x")}
    shapes = {"time": (nsteps,), "seed": (n_real,), "label": (n_real,), "model": (2,),
              **{q: (n_real, 2, nsteps) for q in STEP_ARRAYS}, "done": (n_real, 2),
              "final": (n_real, 2, 1, 32, 32), "curl_map": (n_real, 2, nsteps, 32, 32)}
    for name, d in dims.items():
        assert tuple(g[name].metadata.dimension_names) == d, name
        assert g[name].shape == shapes[name], name
    for name in (*STEP_ARRAYS, "final", "curl_map"):
        assert g[name].dtype == np.float32, name
    assert g["done"].dtype == np.bool_
    assert g[STEP_ARRAYS[0]].chunks[0] == 1  # one realization per chunk
    np.testing.assert_allclose(store.time, (nsteps - np.arange(nsteps)) / nsteps)
    assert store.seeds.tolist() == [7, 8, 9] and store.labels.tolist() == [-1] * n_real
    attrs = g.attrs.asdict()
    assert attrs["models"] == ["resnet", "is"] and attrs["schema_version"] >= 1 and attrs["edtool_version"]
    cfg = attrs["config"]
    assert (cfg["dataset"], cfg["nsteps"], cfg["realizations"], cfg["seed"], cfg["probes"]) == \
        ("mnist5k", nsteps, n_real, 7, 2)
    resnet_file = tiny_checkpoints / "tiny_resnet.safetensors"
    assert cfg["models"]["resnet"]["sha256"] == checkpoints.file_hash(resnet_file)
    assert cfg["models"]["is"]["machine"] == "is"

    # xarray reads the run and its aggregate with named dimensions
    ds = xr.open_zarr(store_url(run))
    for name, d in dims.items():
        assert ds[name].dims == d, name
    np.testing.assert_array_equal(ds["ed_fro"].values, store.read("ed_fro"))
    agg = xr.open_zarr(store_url(run), group="aggregate")
    assert agg["ed_fro_mean"].dims == ("model", "step") and agg["ed_fro_mean_timeavg"].dims == ("model",)
    assert list(agg["model"].values) == ["resnet", "is"]

    # the numbers: all cells done, finite; the ideal score (`is`) is a gradient field, the ResNet is not
    assert store.done_mask().all()
    for name in (*STEP_ARRAYS, "final", "curl_map"):
        assert np.isfinite(store.read(name)).all(), name
    ed, asym = store.read("ed_fro"), store.read("asym")
    assert (ed[:, 0] > 0).all() and ((asym[:, 0] > 0) & (asym[:, 0] <= 1)).all()
    assert np.abs(asym[:, 1]).max() < 1e-5 and np.abs(store.read("curl_map", "is")).max() < 1e-3
    assert (store.read("curl_map", "resnet") >= 0).all() and (store.read("curl_map", "resnet") > 0).any()

    # aggregate/* equals numpy on the full arrays
    stats = {"mean": lambda x: x.mean(0), "std": lambda x: x.std(0, ddof=1), "median": lambda x: np.median(x, 0),
             "q05": lambda x: np.quantile(x, 0.05, 0), "q95": lambda x: np.quantile(x, 0.95, 0),
             "n": lambda x: np.full(x.shape[1:], x.shape[0])}
    for q in ("ed_fro", "asym", "jac_fro"):
        full = store.read(q).astype(np.float64)  # (realization, model, step)
        for suffix, values in (("", full), ("_timeavg", full.mean(axis=2))):
            for stat, fn in stats.items():
                np.testing.assert_allclose(agg[f"{q}_{stat}{suffix}"].values, fn(values), rtol=2e-6, atol=1e-12,
                                           err_msg=f"{q}_{stat}{suffix}")
            mean, std = values.mean(0), values.std(0, ddof=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cv = np.where(mean != 0, std / mean, np.nan)
            np.testing.assert_allclose(agg[f"{q}_cv{suffix}"].values, cv, rtol=2e-6, equal_nan=True)
    summary = json.loads((run / "summary_stats.json").read_text())
    for m, name in enumerate(store.models):
        values = ed[:, m].astype(np.float64)
        s = summary[name]
        assert s["num_realizations"] == n_real and s["num_failed"] == 0
        np.testing.assert_allclose([s["mean_ed_fro"], s["std_ed_fro"], s["max_ed_fro"]],
                                   [values.mean(), values.std(ddof=1), values.max()], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(s["mean_asym"], asym[:, m].astype(np.float64).mean(), rtol=1e-6, atol=1e-12)
    assert summary["realizations_used"] == n_real and summary["probes"] == 2

    # every figure is a real, non-trivial PNG
    for name in ("ed_analysis_single", "ed_analysis_aggregated", "asym_vs_time", "curl_maps"):
        data = (run / f"{name}.png").read_bytes()
        assert data[:8] == PNG and data[12:16] == b"IHDR", name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 400 and height >= 300 and len(data) > 20_000, (name, width, height, len(data))
    assert f"wrote {run / 'curl_maps.png'}" in out


def _beta(t):
    """SPEC 2, written out here on purpose (independent of edtool.diffusion)."""
    return 1 - np.cos((t / 1.008) * np.pi / 2) ** 2


def test_stored_numbers_are_the_score_jacobian_along_the_ddim_path(tmp_path, tiny_checkpoints):
    """Exact estimator vs a hand-written DDIM loop and torch.func.jacrev of s = -eps/sqrt(beta)."""
    from edtool.diffusion import initial_noise

    nsteps = 2
    summary = compute(config(tmp_path / "run", models=["resnet"], nsteps=nsteps, estimator="exact", seed=5))
    store = open_run(summary["location"])
    assert store.seeds.tolist() == [5, 6]
    net = checkpoints.load(tiny_checkpoints / "tiny_resnet.safetensors").to(dtype=torch.float64)
    for r, seed in enumerate([5, 6]):
        x = initial_noise(seed, (1, 1, 32, 32)).double()
        eds, jacs = [], []
        for i in range(nsteps, 0, -1):
            t, t_prev = i / nsteps, (i - 1) / nsteps
            tt = torch.full((1,), t, dtype=torch.float64)

            def score(v):
                return (-net.eps(tt, v.reshape(1, 1, 32, 32)) / np.sqrt(_beta(t))).reshape(-1)

            with torch.no_grad():  # torch.func still differentiates; no graph to the weights
                J = torch.func.jacrev(score)(x.reshape(-1))
            eds.append(float(torch.linalg.norm(J - J.T)))
            jacs.append(float(torch.linalg.norm(J)))
            a, a_prev = 1 - _beta(t), 1 - _beta(t_prev)
            ratio = np.sqrt(a_prev / a)
            with torch.no_grad():
                x = ratio * x + (np.sqrt(_beta(t_prev)) - ratio * np.sqrt(_beta(t))) * net.eps(tt, x)
        np.testing.assert_allclose(store.read("ed_fro", "resnet")[r], eds, rtol=2e-4)
        np.testing.assert_allclose(store.read("jac_fro", "resnet")[r], jacs, rtol=2e-4)
        np.testing.assert_allclose(store.read("asym", "resnet")[r], np.array(eds) / (2 * np.array(jacs)), rtol=3e-4)
        assert (store.read("ed_stderr", "resnet")[r] == 0).all()  # exact method
        np.testing.assert_allclose(store.read("final", "resnet")[r], x[0].numpy(), atol=2e-4)


# ------------------------------------------------------------------ interruption, resume, lock


def spawn_compute(run_dir):
    """A real `python -m edtool compute` process on a small run (4 realizations): its args and process."""
    args = ["compute", "--models", "resnet,is", "--nsteps", "3", "--realizations", "4", "--probes", "32",
            "--device", "cpu", "--quiet", "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "edtool", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    return args, proc


def _default_sigint():
    """In the child: Ctrl-C as in a terminal. A test run started in the background by a non-interactive
    shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, capsys, monkeypatch, computed_run):
    """A real process killed after its first finished cell; the live lock refuses a second process;
    the stale lock is then taken over and the same command finishes the run, equal to an uninterrupted one."""
    from edtool.store.status import run_status

    args, proc = spawn_compute(tmp_path / "killed")
    try:
        wait_for_done_cell(tmp_path / "killed", proc)
        # while it runs: status names it, a second process on the same run is refused and changes nothing
        assert run_status(str(tmp_path / "killed"))["state"].startswith(f"running: pid {proc.pid}")
        code, _, err = cli(capsys, monkeypatch, *args)
        assert code == 2 and f"pid {proc.pid}" in err and "Traceback" not in err, err
        assert proc.poll() is None, "the run finished before it could be killed: give it more work"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    interrupted = open_run(tmp_path / "killed").done_mask()
    assert 0 < interrupted.sum() < interrupted.size, interrupted
    holders = lock_holders(tmp_path / "killed")
    assert [(h["pid"], h["stale"]) for h in holders] == [(proc.pid, True)]
    assert run_status(str(tmp_path / "killed"))["state"] == "partial"

    code, out, err = cli(capsys, monkeypatch, *args)  # the same command resumes, saying so in one line
    assert code == 0, err
    assert err.startswith("edtool: warning: run ") and f"taking over the stale lock of pid {proc.pid}" in err
    assert lock_holders(tmp_path / "killed") == []
    straight = computed_run(models=["resnet", "is"], nsteps=3, realizations=4, probes=32)  # spawn_compute's run
    assert_same_arrays(tmp_path / "killed", straight)
    assert open_run(tmp_path / "killed").done_mask().all()


def test_live_lock_refuses_even_with_overwrite_and_leaves_the_run_alone(tmp_path, computed_copy):
    computed_copy(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with run_lock(tmp_path / "run"):  # held by this (live) process
        before_with_lock = snapshot(tmp_path / "run")
        for overwrite in (False, True):
            with pytest.raises(EdtoolError, match=f"being computed by pid {os.getpid()}"):
                compute(config(tmp_path / "run", nsteps=3, overwrite=overwrite))
            assert snapshot(tmp_path / "run") == before_with_lock
    assert snapshot(tmp_path / "run") == before


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, computed_run):
    straight = computed_run()
    (tmp_path / "run").mkdir()
    pid = dead_pid()
    (tmp_path / "run" / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "token": "x",
                                                       "started": "2020-01-01T00:00:00", "shard": None}))
    assert lock_holders(tmp_path / "run")[0]["stale"]
    with pytest.warns(UserWarning, match=f"stale lock of pid {pid}"):
        compute(config(tmp_path / "run"))
    assert not (tmp_path / "run" / "lock").exists()
    assert_same_arrays(tmp_path / "run", straight)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, computed_run):
    """SIGINT: exit 130, a one-line hint to resume, no traceback, the lock released, the rerun finishes."""
    args, proc = spawn_compute(tmp_path / "run")
    try:
        wait_for_done_cell(tmp_path / "run", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err and "Traceback" not in err, err
    assert lock_holders(tmp_path / "run") == []
    assert not open_run(tmp_path / "run").done_mask().all()
    compute(config(tmp_path / "run", nsteps=3, realizations=4, probes=32))
    assert_same_arrays(tmp_path / "run", computed_run(models=["resnet", "is"], nsteps=3, realizations=4, probes=32))


# ------------------------------------------------------------------ refusals and bad input


def test_other_settings_are_refused_naming_them_and_overwrite_starts_fresh(tmp_path, capsys, monkeypatch,
                                                                           tiny_checkpoints):
    resnet = tmp_path / "nets" / "resnet.safetensors"
    resnet.parent.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoints / f"tiny_resnet{suffix}", resnet.with_suffix(suffix))
    base = ["compute", "--models", "resnet,is", "--realizations", "2", "--probes", "2", "--device", "cpu",
            "--quiet", "--resnet", resnet, "--run-dir", tmp_path / "run"]
    assert cli(capsys, monkeypatch, *base, "--nsteps", "2")[0] == 0
    assert cli(capsys, monkeypatch, "aggregate", tmp_path / "run")[0] == 0
    before = snapshot(tmp_path / "run")
    assert "summary_stats.json" in before

    code, _, err = cli(capsys, monkeypatch, *base, "--nsteps", "3")
    assert code == 2 and "nsteps=2" in err and "nsteps=3" in err and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = cli(capsys, monkeypatch, *base, "--nsteps", "2", "--probes", "4")
    assert code == 2 and "probes=2" in err and "probes=4" in err and "nsteps" not in err, err
    save_tiny(resnet, "resnet", seed=99)  # same path, other weights: the recorded hash differs
    code, _, err = cli(capsys, monkeypatch, *base, "--nsteps", "2")
    assert code == 2 and "models.resnet.sha256=" in err, err
    assert snapshot(tmp_path / "run") == before

    code, _, err = cli(capsys, monkeypatch, *base, "--nsteps", "3", "--overwrite")
    assert code == 0, err
    store = open_run(tmp_path / "run")
    assert store.nsteps == 3 and store.done_mask().all() and store.config["nsteps"] == 3
    assert store.config["models"]["resnet"]["sha256"] == checkpoints.file_hash(resnet)
    assert not (tmp_path / "run" / "summary_stats.json").exists()  # derived from the old data: gone


@pytest.mark.parametrize("args, words", [
    (["--dataset", "mnist6k"], "unknown dataset 'mnist6k'"),
    (["--models", "resnet,bogus"], "unknown model 'bogus'"),
    (["--nsteps", "0"], "Invalid value for '--nsteps'"),
    (["--realizations", "0"], "Invalid value for '--realizations'"),
    (["--resnet", "/nonexistent/net.safetensors"], "does not exist"),
    (["--shard", "2/2"], "need 0 <= i < K"),
    (["--shard", "0/2", "--overwrite"], "--overwrite with --shard"),
    (["--estimator", "magic"], "unknown --estimator"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, capsys, monkeypatch, computed_copy, args,
                                                         words):
    computed_copy(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    code, out, err = cli(capsys, monkeypatch, "compute", "--models", "resnet,is", "--nsteps", "2",
                         "--realizations", "2", "--probes", "2", "--device", "cpu", "--run-dir", tmp_path / "run",
                         *args)
    assert code == 2, (out, err)
    assert err.startswith("edtool: error: ") and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_run_directory_is_one_line_exit_2(tmp_path, capsys, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    run_dir = blocker / "run" if where == "under_a_file" else blocker
    code, out, err = cli(capsys, monkeypatch, "compute", "--models", "is", "--nsteps", "1", "--device", "cpu",
                         "--run-dir", run_dir)
    assert code == 2, err
    assert err.startswith("edtool: error: ") and "--run" in err and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "not a directory"


# ------------------------------------------------------------------ failures are NaN, never zeros


class _Failing(ScoreModel):
    """Wraps a network: non-finite below t_bad (`nonfinite`), or an exception on every call (`raise`)."""

    def __init__(self, inner, mode, t_bad=0.7):
        self.inner, self.mode, self.t_bad = inner, mode, t_bad
        self.name, self.conditional, self.manifest = inner.name, inner.conditional, inner.manifest

    def _spoil(self, t, value):
        if self.mode == "raise":
            raise RuntimeError("boom: the model broke")
        bad = torch.as_tensor(t, dtype=value.dtype).reshape(-1)[0] < self.t_bad
        return value * float("inf") if bad else value

    def eps(self, t, x, label=None):
        return self._spoil(t, self.inner.eps(t, x, label))

    def score(self, t, x, label=None):
        return self._spoil(t, self.inner.score(t, x, label))


def test_a_failing_model_records_nan_with_a_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    real_prepare = pipeline.prepare

    def prepare(cfg):
        study = real_prepare(cfg)
        study.models["resnet"] = _Failing(study.models["resnet"], "nonfinite")
        study.models["unet"] = _Failing(study.models["unet"], "raise")
        return study

    monkeypatch.setattr(pipeline, "prepare", prepare)
    with pytest.warns(UserWarning) as caught:
        summary = compute(config(tmp_path / "run", models=["resnet", "unet", "is"], nsteps=3))
    messages = " ".join(str(w.message) for w in caught)
    assert "resnet: non-finite values" in messages and "unet failed" in messages and "boom" in messages
    assert len(summary["failures"]) == 4  # 2 models x 2 realizations
    store = open_run(tmp_path / "run")
    assert store.done_mask().all()  # the run went on and finished every cell
    for q in STEP_ARRAYS:
        values = store.read(q)
        assert np.isfinite(values[:, 0, 0]).all(), q  # t = 1: the resnet was still fine
        assert np.isnan(values[:, 0, 1:]).all(), q  # t < 0.7: non-finite -> NaN, not 0
        assert np.isnan(values[:, 1]).all(), q  # unet raised: the whole cell is NaN
        assert np.isfinite(values[:, 2]).all(), q  # `is` unaffected
    assert np.isnan(store.read("final", "unet")).all() and np.isnan(store.read("final", "resnet")).all()
    assert np.isfinite(store.read("final", "is")).all()
    assert (store.read("ed_fro")[:, :2] != 0).all()  # (NaN != 0): nothing failed was stored as zero

    from edtool.study.aggregate import aggregate_run

    agg = aggregate_run(tmp_path / "run")
    assert agg["resnet"]["num_failed"] == 2 and agg["unet"]["num_failed"] == 2 and agg["is"]["num_failed"] == 0
    np.testing.assert_allclose(agg["resnet"]["mean_ed_fro"], store.read("ed_fro", "resnet")[:, 0].mean(), rtol=1e-6)
    assert agg["unet"]["mean_ed_fro"] is None and agg["unet"]["mean_ed_magnitude"] is None


# ------------------------------------------------------------------ analyze, shared trajectories, status


def test_analyze_accepts_the_seed_flags_and_writes_its_layout(tmp_path, capsys, monkeypatch, tiny_checkpoints):
    nets = tmp_path / "elsewhere"
    nets.mkdir()
    for arch in ("unet", "resnet"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(tiny_checkpoints / f"tiny_{arch}{suffix}", nets / f"my_{arch}{suffix}")
    monkeypatch.setenv("EDTOOL_CHECKPOINTS", str(tmp_path / "empty"))  # nothing to discover: flags must work
    monkeypatch.chdir(tmp_path)
    out_dir = Path("results") / "study"  # relative, like the seed's default
    common = ["analyze", "--output_dir", out_dir, "--unet_path", nets / "my_unet.safetensors", "--resnet_path",
              nets / "my_resnet.safetensors", "--models", "unet,resnet", "--nsteps", "2", "--probes", "2",
              "--device", "cpu", "--quiet"]
    code, _, err = cli(capsys, monkeypatch, *common, "--single")
    assert code == 0, err
    single = out_dir / "mnist5k" / "single_realization"
    assert {"ed.zarr", "summary_stats.json", "ed_analysis_single.png", "asym_vs_time.png"} <= \
        {p.name for p in single.iterdir()}
    store = open_run(single)
    assert store.n_realizations == 1 and store.done_mask().all()
    assert store.config["models"]["unet"]["path"] == str(nets / "my_unet.safetensors")
    assert store.config["models"]["resnet"]["path"] == str(nets / "my_resnet.safetensors")
    summary = json.loads((single / "summary_stats.json").read_text())
    for name in ("unet", "resnet"):
        assert {"mean_ed_magnitude", "std_ed_magnitude", "max_ed_magnitude", "num_realizations"} <= set(summary[name])

    code, _, err = cli(capsys, monkeypatch, *common, "--multiple", "2")
    assert code == 0, err
    multiple = out_dir / "mnist5k" / "multiple_realizations"
    assert (multiple / "ed_analysis_aggregated.png").read_bytes()[:8] == PNG
    assert open_run(multiple).n_realizations == 2
    assert json.loads((multiple / "summary_stats.json").read_text())["resnet"]["num_realizations"] == 2

    code, _, err = cli(capsys, monkeypatch, *common, "--single", "--multiple", "2")
    assert code == 2 and "--single or --multiple" in err, err

    code, out, err = cli(capsys, monkeypatch, "status", "--json")  # status finds runs under ./results too
    assert code == 0, err
    listed = {Path(r["location"]).resolve(): r for r in json.loads(out)}
    assert listed[single.resolve()]["state"] == "complete" and listed[multiple.resolve()]["realizations"] == 2


def test_shared_trajectory_measures_every_model_on_the_reference_path(tmp_path, tiny_checkpoints):
    """`is` measured at the ResNet's DDIM points equals the machine evaluated there directly."""
    from edtool.data import load_dataset
    from edtool.diffusion import ddim_sample, initial_noise
    from edtool.jacobian.ed import exterior_derivative
    from edtool.els.factory import make_machine

    nsteps = 3
    compute(config(tmp_path / "shared", nsteps=nsteps, trajectory="shared", reference="resnet"))
    compute(config(tmp_path / "own", nsteps=nsteps))
    shared, own = open_run(tmp_path / "shared"), open_run(tmp_path / "own")
    assert shared.config["trajectory"] == "shared" and shared.config["reference"] == "resnet"
    # the reference model itself is unaffected by the sharing
    for name in (*STEP_ARRAYS, "final"):
        np.testing.assert_array_equal(shared.read(name, "resnet"), own.read(name, "resnet"), err_msg=name)
    np.testing.assert_array_equal(shared.read("final", "is"), shared.read("final", "resnet"))

    net = checkpoints.load(tiny_checkpoints / "tiny_resnet.safetensors")
    images, labels = load_dataset("mnist5k")
    machine = make_machine("is", images, labels)
    for r, seed in enumerate(shared.seeds):
        points = []
        ddim_sample(lambda t, x: net.eps(t, x), initial_noise(int(seed), (1, 1, 32, 32)), nsteps,
                    on_step=lambda j, t, x: points.append((t, x.clone())))
        jac = np.float32([exterior_derivative(machine.field(torch.full((1,), t, dtype=torch.float64), None), x).jac_fro[0]
                          for t, x in points])
        np.testing.assert_array_equal(shared.read("jac_fro", "is")[r], jac)  # the same computation, bit for bit
        assert not np.array_equal(own.read("jac_fro", "is")[r], jac)  # on its own path it sees other points

    # resume with the reference cell done but another not: the shared path is recomputed identically
    expected = {name: shared.read(name) for name in ARRAYS}
    writable = open_run(tmp_path / "shared", mode="r+")
    writable.group["done"][0, 1] = False
    writable.group["jac_fro"][0, 1] = np.zeros(nsteps, dtype=np.float32)
    compute(config(tmp_path / "shared", nsteps=nsteps, trajectory="shared", reference="resnet"))
    again = open_run(tmp_path / "shared")
    for name in ARRAYS:
        np.testing.assert_array_equal(again.read(name), expected[name], err_msg=name)


def test_status_lists_runs_completion_and_shards(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `status` also looks in ./results
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    name = "sharded"
    compute(config(None, run=name, realizations=3, shard=(0, 2)))
    (tmp_path / "cache" / "broken" / "ed.zarr").mkdir(parents=True)  # not a run: reported, not fatal
    code, out, err = cli(capsys, monkeypatch, "status", "--json")
    assert code == 0, err
    rows = {Path(r["location"]).name: r for r in json.loads(out)}
    assert set(rows) == {"sharded", "broken"} and rows["broken"]["state"].startswith("unreadable: ")
    row = rows[name]
    assert (row["done"], row["total"], row["per_model"], row["state"]) == (4, 6, {"resnet": 2, "is": 2}, "partial")
    assert row["shards"] == ["shard 0/2: complete (4/4 cells)", "shard 1/2: incomplete (0/2 cells)"]
    code, out, err = cli(capsys, monkeypatch, "status", name)
    assert code == 0 and "partial" in out and "shard 1/2: incomplete" in out, out

    compute(config(None, run=name, realizations=3, shard=(1, 2)))
    code, out, _ = cli(capsys, monkeypatch, "status", name, "--json")
    (row,) = json.loads(out)
    assert (row["done"], row["state"]) == (6, "complete") and "shard 1/2: complete (2/2 cells)" in row["shards"]
    code, _, err = cli(capsys, monkeypatch, "status", "no-such-run")
    assert code == 2 and "no run 'no-such-run'" in err
