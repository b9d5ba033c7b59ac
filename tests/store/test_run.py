"""The run store: layout, resume/refuse rules, write safety, sharding and locks (SPEC 8, 10)."""

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
import warnings

import numpy as np
import pytest
import zarr

import edtool
from edtool.errors import EdtoolError
from edtool.store.location import store_url
from edtool.store.locks import lock_holders, run_lock, shard_realizations
from edtool.store.ownership import write_summary
from edtool.store.run import create_run, open_run
from edtool.store.runstore import RunStore

MODELS = ["unet", "els"]
CONFIG = {"estimator": "exact", "nsteps": 5, "dataset": "mnist5k"}


def make(location, maps=False, **changes):
    """A 3-realization, 2-model, 5-step run of 1x4x4 images (keyword changes override settings)."""
    kw = dict(config=CONFIG, models=MODELS, seeds=[10, 11, 12], labels=[-1, 3, -1], nsteps=5,
              image_shape=(1, 4, 4), maps=maps)
    kw.update(changes)
    return create_run(location, **kw)


def cell_values(rng, n=5, shape=(1, 4, 4), maps=False):
    vals = dict(ed_fro=rng.random(n), jac_fro=rng.random(n) + 1, asym=rng.random(n) / 2, ed_stderr=rng.random(n) / 10,
                final=rng.uniform(-1, 1, shape))
    if maps:
        vals["curl_map"] = rng.random((n, shape[1], shape[2]))
    return vals


def snapshot(path):
    """Every file under path with its bytes: to check that a refusal changed nothing on disk."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = fh.read()
    return out


def test_fresh_store_layout(tmp_path):
    run = make(tmp_path / "r", maps=True)
    g = zarr.open_group(str(tmp_path / "r" / "ed.zarr"), mode="r")
    assert g.attrs["config"] == CONFIG and g.attrs["models"] == MODELS
    assert g.attrs["schema_version"] == 1 and g.attrs["edtool_version"] == edtool.__version__
    np.testing.assert_allclose(g["time"][:], [1.0, 0.8, 0.6, 0.4, 0.2])
    assert g["seed"][:].tolist() == [10, 11, 12] and g["label"][:].tolist() == [-1, 3, -1]
    expected = {"ed_fro": (3, 2, 5), "jac_fro": (3, 2, 5), "asym": (3, 2, 5), "ed_stderr": (3, 2, 5),
                "done": (3, 2), "final": (3, 2, 1, 4, 4), "curl_map": (3, 2, 5, 4, 4)}
    for name, shape in expected.items():
        assert g[name].shape == shape
        assert g[name].chunks[0] == 1  # one realization per chunk: processes fill disjoint chunks
        assert g[name].metadata.dimension_names[0] == "realization"
    assert g["ed_fro"].dtype == np.float32 and np.isnan(g["ed_fro"][:]).all()
    assert np.isnan(g["final"][:]).all() and not g["done"][:].any()
    assert run.pending() == [(r, m) for r in range(3) for m in range(2)]
    assert "curl_map" not in zarr.open_group(store_url(make(tmp_path / "nomaps").location), mode="r")


@pytest.mark.parametrize("maps", [False, True])
def test_xarray_reads_every_array_with_its_dimensions(tmp_path, maps):
    xr = pytest.importorskip("xarray")
    run = make(tmp_path / "r", maps=maps)
    run.write_cell(1, "els", **cell_values(np.random.default_rng(0), maps=maps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opening must be quiet (consolidated metadata present)
        ds = xr.open_zarr(str(tmp_path / "r" / "ed.zarr"))
    assert ds["ed_fro"].dims == ("realization", "model", "step")
    assert ds["done"].dims == ("realization", "model")
    assert ds["final"].dims == ("realization", "model", "channel", "y", "x")
    assert ds["time"].dims == ("step",) and ds["seed"].dims == ("realization",)
    assert list(ds["model"].values) == MODELS
    assert ("curl_map" in ds) == maps
    if maps:
        assert ds["curl_map"].dims == ("realization", "model", "step", "y", "x")
    np.testing.assert_array_equal(ds["ed_fro"].sel(model="els").values[1], run.read("ed_fro", model=1)[1])


def test_write_cell_roundtrip_pending_progress(tmp_path):
    run = make(tmp_path / "r", maps=True)
    rng = np.random.default_rng(1)
    vals = cell_values(rng, maps=True)
    vals["ed_fro"][2] = np.inf  # not finite -> stored as NaN
    vals["asym"][0] = 1e300  # overflows float32 -> NaN, not inf
    run.write_cell(2, 1, **vals)
    run.write_cell(0, "unet", **cell_values(rng, maps=True))
    again = open_run(tmp_path / "r")
    ed = again.read("ed_fro")
    expect = vals["ed_fro"].astype(np.float32)
    expect[2] = np.nan
    np.testing.assert_array_equal(ed[2, 1], expect)
    assert np.isnan(again.read("asym")[2, 1, 0])
    np.testing.assert_array_equal(again.read("final", model="els")[2], vals["final"].astype(np.float32))
    np.testing.assert_array_equal(again.read("curl_map")[2, 1], vals["curl_map"].astype(np.float32))
    assert np.isnan(ed[1]).all()  # untouched cells stay NaN
    assert again.done_mask().tolist() == [[True, False], [False, False], [False, True]]
    assert again.pending() == [(0, 1), (1, 0), (1, 1), (2, 0)]
    assert again.pending(realizations=[2, 0]) == [(2, 0), (0, 1)]
    assert again.progress() == {"done": 2, "total": 6, "per_model": {"unet": 1, "els": 1},
                                "realizations_complete": 0, "realizations_total": 3}
    np.testing.assert_array_equal(again.read("ed_fro", model=1, realizations=[2, 0]), ed[[2, 0], 1])


def test_write_cell_rejects_wrong_shapes_and_maps(tmp_path):
    run = make(tmp_path / "r")
    vals = cell_values(np.random.default_rng(2))
    with pytest.raises(ValueError, match="ed_fro has shape"):
        run.write_cell(0, 0, **{**vals, "ed_fro": np.zeros(4)})
    with pytest.raises(ValueError, match="final has shape"):
        run.write_cell(0, 0, **{**vals, "final": np.zeros((3, 4, 4))})
    with pytest.raises(ValueError, match="without maps"):
        run.write_cell(0, 0, **vals, curl_map=np.zeros((5, 4, 4)))
    with pytest.raises(ValueError, match="not in this run"):
        run.write_cell(0, "resnet", **vals)
    with pytest.raises(ValueError, match="out of range"):
        run.write_cell(3, 0, **vals)
    with pytest.raises(ValueError, match="needs curl_map"):
        make(tmp_path / "m", maps=True).write_cell(0, 0, **vals)
    assert not run.done_mask().any()


def test_write_cell_on_read_only_run_is_refused(tmp_path):
    make(tmp_path / "r")
    with pytest.raises(ValueError, match="read-only"):
        open_run(tmp_path / "r").write_cell(0, 0, **cell_values(np.random.default_rng(2)))


def test_write_cell_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    run = make(tmp_path / "r")
    vals = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in cell_values(np.random.default_rng(3)).items()}
    run.write_cell(0, 0, **vals)
    np.testing.assert_allclose(run.read("ed_fro")[0, 0], vals["ed_fro"].numpy(), rtol=1e-6)


def test_crash_before_done_flag_leaves_cell_pending(tmp_path, monkeypatch):
    run = make(tmp_path / "r", maps=True)
    rng = np.random.default_rng(4)

    def crash(self, r, m):
        raise KeyboardInterrupt("killed between the data writes and the done flag")

    monkeypatch.setattr(RunStore, "_set_done", crash)
    vals = cell_values(rng, maps=True)
    with pytest.raises(KeyboardInterrupt):
        run.write_cell(1, 0, **vals)
    monkeypatch.undo()
    after = open_run(tmp_path / "r", mode="r+")
    assert not np.isnan(after.read("ed_fro")[1, 0]).any()  # the data did land...
    assert not after.done_mask()[1, 0] and (1, 0) in after.pending()  # ...but does not read as done
    after.write_cell(1, 0, **vals)  # the rerun completes the cell
    assert open_run(tmp_path / "r").done_mask()[1, 0]


def test_crash_midway_through_data_leaves_cell_pending(tmp_path, monkeypatch):
    run = make(tmp_path / "r")
    real_setitem = zarr.Array.__setitem__

    def failing_setitem(self, key, value):
        if self.path == "final":
            raise OSError("disk full while writing the final image")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    with pytest.raises(OSError):
        run.write_cell(0, 1, **cell_values(np.random.default_rng(5)))
    monkeypatch.undo()
    assert (0, 1) in open_run(tmp_path / "r").pending()


def test_resume_same_settings_keeps_data(tmp_path):
    make(tmp_path / "r").write_cell(2, 0, **cell_values(np.random.default_rng(6)))
    again = make(tmp_path / "r")
    assert again.done_mask()[2, 0] and len(again.pending()) == 5


def test_different_settings_refused_with_names_and_disk_untouched(tmp_path):
    make(tmp_path / "r").write_cell(0, 0, **cell_values(np.random.default_rng(7)))
    before = snapshot(tmp_path / "r")
    with pytest.raises(EdtoolError) as err:
        make(tmp_path / "r", config={**CONFIG, "estimator": "hutchinson", "nsteps": 10}, nsteps=10)
    msg = str(err.value)
    assert "was made with estimator=exact, nsteps=5" in msg
    assert "you asked for estimator=hutchinson, nsteps=10" in msg
    assert "--overwrite" in msg and "dataset" not in msg  # only the differing settings are named
    for change in ({"models": ["unet"]}, {"seeds": [1, 2, 3]}, {"image_shape": (1, 8, 8)}, {"maps": True},
                   {"labels": [0, 0, 0]}):
        with pytest.raises(EdtoolError, match=next(iter(change))):
            make(tmp_path / "r", **change)
    assert snapshot(tmp_path / "r") == before


def test_overwrite_starts_fresh_and_deletes_only_what_edtool_wrote(tmp_path):
    make(tmp_path / "r").write_cell(0, 0, **cell_values(np.random.default_rng(8)))
    write_summary(tmp_path / "r", {"cells_done": 1})  # what aggregate writes: edtool's own
    fresh = make(tmp_path / "r", nsteps=3, overwrite=True)
    assert fresh.nsteps == 3 and not fresh.done_mask().any()
    assert not (tmp_path / "r" / "summary_stats.json").exists()
    # a summary edtool did not write (the seed tool's, or ours edited by hand) is kept, with a warning
    for text in ('{"unet": {"mean_ed_magnitude": 1.0}}\n', None):
        if text is None:
            (tmp_path / "r" / "summary_stats.json").unlink()
            write_summary(tmp_path / "r", {"cells_done": 0})
            text = (tmp_path / "r" / "summary_stats.json").read_text().replace("0", "7")
        (tmp_path / "r" / "summary_stats.json").write_text(text)
        with pytest.warns(UserWarning, match="kept .*summary_stats.json"):
            make(tmp_path / "r", overwrite=True)
        assert (tmp_path / "r" / "summary_stats.json").read_text() == text
        with pytest.raises(EdtoolError, match="not written by edtool"):  # nor does aggregate replace it
            write_summary(tmp_path / "r", {"cells_done": 0})
        assert (tmp_path / "r" / "summary_stats.json").read_text() == text


def test_overwrite_refuses_a_symlinked_or_foreign_store(tmp_path):
    theirs = tmp_path / "theirs.zarr"
    make(tmp_path / "elsewhere")
    os.rename(tmp_path / "elsewhere" / "ed.zarr", theirs)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ed.zarr").symlink_to(theirs)
    before = snapshot(theirs)
    with pytest.raises(EdtoolError, match="symbolic link"):
        make(tmp_path / "r", nsteps=3, overwrite=True)
    assert snapshot(theirs) == before and (tmp_path / "r" / "ed.zarr").is_symlink()
    foreign = tmp_path / "f" / "ed.zarr"
    foreign.mkdir(parents=True)
    (foreign / "data.bin").write_bytes(b"theirs")
    with pytest.raises(EdtoolError, match="not written by edtool"):
        make(tmp_path / "f", overwrite=True)
    assert (foreign / "data.bin").read_bytes() == b"theirs"


def test_other_schema_or_foreign_store_refused_untouched(tmp_path):
    make(tmp_path / "old")
    zarr.open_group(str(tmp_path / "old" / "ed.zarr"), mode="r+").attrs["schema_version"] = 0
    foreign = zarr.open_group(str(tmp_path / "foreign" / "ed.zarr"), mode="w")
    foreign.create_array("x", shape=(2,), dtype="f4")
    (tmp_path / "junk" / "ed.zarr").mkdir(parents=True)
    (tmp_path / "junk" / "ed.zarr" / "notes.txt").write_text("mine")
    for name, pattern in (("old", "schema 0"), ("foreign", "did not write"), ("junk", "not an edtool run")):
        before = snapshot(tmp_path / name)
        with pytest.raises(EdtoolError, match=pattern):
            make(tmp_path / name)
        with pytest.raises(EdtoolError, match=pattern):
            open_run(tmp_path / name)
        if name != "old":
            with pytest.raises(EdtoolError, match="not written by edtool"):
                make(tmp_path / name, overwrite=True)  # never delete what edtool did not write
        assert snapshot(tmp_path / name) == before


def test_open_missing_run_and_store_path(tmp_path):
    with pytest.raises(EdtoolError, match="no edtool run"):
        open_run(tmp_path / "nothing")
    make(tmp_path / "r")
    assert open_run(tmp_path / "r" / "ed.zarr").location == str(tmp_path / "r")
    assert open_run(f"file://{tmp_path / 'r'}").models == MODELS


def test_fsspec_memory_url(tmp_path):
    url = f"memory://edtool-test-{uuid.uuid4().hex}/run"
    make(url).write_cell(1, 1, **cell_values(np.random.default_rng(9)))
    again = make(url)  # same settings: continue
    assert again.done_mask()[1, 1] and open_run(url).progress()["done"] == 1
    with pytest.raises(EdtoolError, match="nsteps=5"):
        make(url, nsteps=6)
    assert make(url, nsteps=6, overwrite=True).nsteps == 6
    with pytest.warns(UserWarning, match="no lock"):
        with run_lock(url) as lock:
            assert lock is None


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # catch_warnings is per process, not per thread
def test_concurrent_creation_yields_one_store(tmp_path):
    results, errors = [], []

    def create():
        try:
            results.append(make(tmp_path / "r"))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert sorted(os.listdir(tmp_path / "r")) == [".edtool-written.json", "ed.zarr"]  # no partial stores left behind


def test_shard_realizations():
    assert shard_realizations(7) == list(range(7))
    assert shard_realizations(7, (0, 3)) == [0, 3, 6] and shard_realizations(7, (2, 3)) == [2, 5]
    assert sorted(sum((shard_realizations(7, (i, 3)) for i in range(3)), [])) == list(range(7))
    with pytest.raises(EdtoolError, match="0 <= i < K"):
        shard_realizations(7, (3, 3))


SHARD_WORKER = """
import sys, numpy as np
from edtool.store.locks import run_lock, shard_realizations
from edtool.store.run import open_run
run_dir, i, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with run_lock(run_dir, (i, k)):
    run = open_run(run_dir, mode="r+")
    for r, m in run.pending(shard_realizations(run.n_realizations, (i, k))):
        v = np.full(5, 100.0 * r + m)
        run.write_cell(r, m, v, v + 1, v * 0, v * 0, np.full((1, 4, 4), r / 10))
"""


def test_two_processes_fill_disjoint_shards(tmp_path):
    run = make(tmp_path / "r", seeds=list(range(6)), labels=[-1] * 6)
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_WORKER, str(tmp_path / "r"), str(i), "2"],
                              stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    done = open_run(tmp_path / "r")
    assert done.done_mask().all()
    ed = done.read("ed_fro")
    for r in range(6):
        for m in range(2):
            np.testing.assert_array_equal(ed[r, m], np.full(5, 100.0 * r + m, dtype=np.float32))
    np.testing.assert_allclose(done.read("final")[:, :, 0, 0, 0], np.repeat(np.arange(6)[:, None] / 10, 2, 1))
    assert not any(n.startswith("lock") for n in os.listdir(run.location))  # released


def test_lock_excludes_second_holder_and_records_itself(tmp_path):
    with run_lock(tmp_path / "r") as path:
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        with pytest.raises(EdtoolError, match=f"being computed by pid {os.getpid()} on host"):
            with run_lock(tmp_path / "r"):
                pass
    assert not path.exists()
    with run_lock(tmp_path / "r"):  # free again
        pass


def test_shard_locks(tmp_path):
    with run_lock(tmp_path / "r", (0, 2)) as a, run_lock(tmp_path / "r", (1, 2)) as b:
        assert a.name == "lock.shard-0-of-2" and b.name == "lock.shard-1-of-2"
        assert [(h["shard"], h["pid"], h["stale"]) for h in lock_holders(tmp_path / "r")] == [
            ("0/2", os.getpid(), False), ("1/2", os.getpid(), False)]
        with pytest.raises(EdtoolError, match="shard 0/2"):
            with run_lock(tmp_path / "r", (0, 2)):
                pass
        with pytest.raises(EdtoolError, match="being computed"):
            with run_lock(tmp_path / "r"):  # all realizations overlap every shard
                pass
        with pytest.raises(EdtoolError, match="being computed"):
            with run_lock(tmp_path / "r", (0, 3)):  # another split overlaps
                pass
    with run_lock(tmp_path / "r"):
        with pytest.raises(EdtoolError, match="being computed"):
            with run_lock(tmp_path / "r", (1, 2)):
                pass
    assert not list((tmp_path / "r").glob("lock*"))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_taken_over_with_warning(tmp_path):
    (tmp_path / "r").mkdir()
    pid = dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00", "token": "x"}
    (tmp_path / "r" / "lock").write_text(json.dumps(stale))
    assert [(h["pid"], h["stale"]) for h in lock_holders(tmp_path / "r")] == [(pid, True)]
    with pytest.warns(UserWarning, match=f"stale lock of pid {pid}"):
        with run_lock(tmp_path / "r") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_lock_of_other_host_is_not_taken_over(tmp_path):
    (tmp_path / "r").mkdir()
    other = {"pid": dead_pid(), "host": "some-other-node", "started": "2026-01-01T00:00:00", "token": "y"}
    (tmp_path / "r" / "lock").write_text(json.dumps(other))
    with pytest.raises(EdtoolError, match="on host some-other-node since 2026-01-01"):
        with run_lock(tmp_path / "r"):
            pass
    assert json.loads((tmp_path / "r" / "lock").read_text()) == other

