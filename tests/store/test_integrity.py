"""Nothing lost, nothing silently wrong in the run store: damaged told from unfinished
(checksummed chunks; every per-cell array checked), `verify`, repair by rerunning compute,
aggregate/plot refusing damaged runs, readers and writers under the run's access lock, broken
group attributes that never hide other runs, `--overwrite` deleting only what edtool wrote,
memory:// refused on the command line, absurd realization counts refused, per-batch cost
independent of the run size.

The truth each test checks against is an undamaged copy of the same run, or the store's own
contents before the damage.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from edtool.study.aggregate import aggregate_run
from edtool.errors import EdtoolError
from edtool.study.compute import compute
from edtool.study.plots import plot_run
from edtool.store.layout import BrokenRunError
from edtool.store.location import store_url
from edtool.store.locks import access_lock
from edtool.store.run import create_run, open_run
from edtool.store.runstore import RunStore
from edtool.store.status import run_status, verify_run
from helpers import (assert_same_arrays, cli, config, filled, MODELS, one_line, REPO, snapshot,
                     subprocess_env, wait_for_done_cell)

pytestmark = pytest.mark.usefixtures("tiny_networks")


def chunk_file(location, name, r) -> Path:
    run = open_run(location)
    return Path(store_url(location)) / run._chunk_key(name, r)


def damage(path: Path, how: str):
    """Damage one chunk file on disk the way a disk, a copy or a hand does."""
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # one bit in the middle of the compressed payload
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))


# ------------------------------------------------------------------ checksums and damage


def test_every_array_edtool_creates_is_checksummed(tmp_path):
    filled(tmp_path / "r", maps=True)
    aggregate_run(tmp_path / "r")
    group = zarr.open_group(store_url(tmp_path / "r"), mode="r")
    names = [name for name, _ in group.arrays()] + [f"aggregate/{name}" for name, _ in group["aggregate"].arrays()]
    assert {"done", "final", "curl_map", "model", "aggregate/ed_fro_mean"} <= set(names)
    for name in names:
        assert any(type(c).__name__ == "Crc32cCodec" for c in group[name].metadata.codecs), name


@pytest.fixture(scope="module")
def filled_runs(tmp_path_factory):
    """filled_runs(maps) -> (a filled run never aggregated, an identical run as the truth, its aggregate),
    written once per module for each `maps`; a test copies the first before damaging it and only reads the
    truth."""
    made = {}

    def get(maps):
        if maps not in made:
            base = tmp_path_factory.mktemp(f"filled-maps{int(maps)}")
            filled(base / "pristine", maps=maps)
            filled(base / "truth", maps=maps)
            made[maps] = (base / "pristine", base / "truth", aggregate_run(base / "truth"))
        return made[maps]
    return get


@pytest.fixture
def filled_copy(filled_runs):
    """filled_copy(dest) -> dest holding what `filled(dest)` writes, copied from the module's filled run."""
    def copy(dest):
        return shutil.copytree(filled_runs(False)[0], dest)
    return copy


@pytest.mark.parametrize("how, name, maps", [("delete", "asym", False), ("truncate", "ed_fro", False),
                                             ("flip", "final", False), ("flip", "jac_fro", False),
                                             ("truncate", "ed_stderr", False), ("delete", "curl_map", True),
                                             ("flip", "done", False)])
def test_damaged_chunk_is_named_refused_and_repaired(tmp_path, filled_runs, how, name, maps):
    """Any per-cell array's chunk deleted, truncated or bit-flipped: the realization's done cells are
    named damaged; aggregate and plot refuse; reset + rewrite gives what an undamaged run gives."""
    pristine, truth_dir, truth = filled_runs(maps)
    shutil.copytree(pristine, tmp_path / "r")
    damage(chunk_file(tmp_path / "r", name, 2), how)
    run = open_run(tmp_path / "r")
    cells = run.damaged()
    assert sorted(cells) == [(2, 0), (2, 1)], cells
    expected = "missing" if how == "delete" else "unreadable (checksum mismatch)"
    assert all(f"{name} chunk {expected}" in why for why in cells.values()), cells
    assert run.damaged(realizations=[0, 1, 3]) == {}  # the other realizations are whole
    report = verify_run(str(tmp_path / "r"))
    assert [(c["realization"], c["model"]) for c in report["damaged"]] == [(2, "unet"), (2, "els")]
    assert report["unchecksummed"] == []
    for refuse in (lambda: aggregate_run(tmp_path / "r"), lambda: plot_run(tmp_path / "r")):
        with pytest.raises(EdtoolError, match=r"has 2 damaged cell\(s\): realization 2 unet"):
            refuse()
    assert not (tmp_path / "r" / "summary_stats.json").exists()

    run = open_run(tmp_path / "r", mode="r+")
    assert sorted(run.reset_damaged()) == [(2, 0), (2, 1)]
    assert run.pending() == [(2, 0), (2, 1)] and run.damaged() == {}
    again = filled(tmp_path / "r", maps=maps)  # the same numbers again: what compute's rerun does
    assert again.damaged() == {} and again.done_mask().all()
    assert aggregate_run(tmp_path / "r")["unet"] == truth["unet"]
    repaired, undamaged = open_run(tmp_path / "r"), open_run(truth_dir)
    names = ["done", *repaired.cell_arrays]
    assert len(names) == 6 + maps
    for n in names:
        np.testing.assert_array_equal(repaired.read(n), undamaged.read(n))


def test_unfinished_is_not_damaged_and_all_nan_cells_are_stored(tmp_path):
    """A realization never started has no chunks: unfinished, not damaged. A failed cell (all NaN,
    equal to the fill value) is still written, so its chunk is there."""
    run = filled(tmp_path / "r", skip={(3, 0), (3, 1), (1, 1)})
    nan = np.full(3, np.nan)
    run.write_cell(3, 0, nan, nan, nan, nan, np.full((1, 4, 4), np.nan))
    assert run.damaged() == {} and sorted(run.pending()) == [(1, 1), (3, 1)]
    assert chunk_file(tmp_path / "r", "asym", 3).is_file()
    # an undecodable chunk of an unfinished realization is no damage to results, but must not stop a write
    damage(chunk_file(tmp_path / "r", "final", 3), "flip")
    run = open_run(tmp_path / "r", mode="r+")
    assert set(run.damaged()) == {(3, 0)}  # (3, 0) was done; (3, 1) never was
    run.reset_damaged()
    rng = np.random.default_rng(1)
    run.write_cell(3, 1, rng.random(3), rng.random(3), rng.random(3), rng.random(3), rng.random((1, 4, 4)))
    assert run.damaged() == {}


def test_cli_verify_status_aggregate_plot_on_a_damaged_run(tmp_path, capsys, monkeypatch, filled_copy):
    filled_copy(tmp_path / "r")
    filled_copy(tmp_path / "fine")
    damage(chunk_file(tmp_path / "r", "asym", 1), "delete")
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "r")
    assert code == 1 and "damaged: realization 1 unet: asym chunk missing" in out, (out, err)
    assert "2 damaged cell(s), 6 whole of 8 done" in out
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "fine")
    assert code == 0 and "0 damaged cell(s), 8 whole of 8 done" in out, (out, err)
    for command in ("aggregate", "plot"):
        code, out, err = cli(capsys, monkeypatch, command, tmp_path / "r")
        assert code == 2 and one_line(err) and "realization 1 unet (asym chunk missing)" in err, (command, err)
    code, out, err = cli(capsys, monkeypatch, "status", str(tmp_path / "r"), "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["state"].startswith("damaged: 2 cell(s)") and row["damaged"] == 2


def test_compute_rerun_recomputes_damaged_cells_bit_for_bit(tmp_path, capsys, monkeypatch):
    """The pipeline: a chunk of a finished run deleted, another bit-flipped; the same compute command
    notes and recomputes exactly those cells, equal to an undamaged run."""
    cfg = dict(models=["is"], nsteps=2, realizations=3)
    compute(config(tmp_path / "r", **cfg))
    shutil.copytree(tmp_path / "r", tmp_path / "truth")  # the undamaged run, kept before the damage
    damage(chunk_file(tmp_path / "r", "asym", 0), "delete")
    damage(chunk_file(tmp_path / "r", "final", 2), "flip")
    notes = []

    class Notes:
        def start(self, *a): ...
        def step(self, *a): ...
        def cell_done(self, *a): ...
        def note(self, message): notes.append(message)

    compute(config(tmp_path / "r", **cfg), Notes())
    assert any("recomputing 2 damaged cell(s): realization 0 is (asym chunk missing)" in n for n in notes), notes
    assert open_run(tmp_path / "r").damaged() == {}
    assert_same_arrays(tmp_path / "r", tmp_path / "truth", names=("done", *open_run(tmp_path / "r").cell_arrays))


# ------------------------------------------------------------------ broken runs


@pytest.mark.parametrize("edit", ["del config", "del models", "del schema_version", "models renamed",
                                  "models shortened", "config a string"])
def test_a_broken_run_is_named_and_never_hides_the_others(tmp_path, capsys, monkeypatch, filled_copy, edit):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "400")  # the rich table on one line per run
    filled_copy(tmp_path / "cache" / "good")
    filled_copy(tmp_path / "cache" / "bad")
    group = zarr.open_group(store_url(tmp_path / "cache" / "bad"), mode="r+")
    verb, key = edit.split(" ", 1)
    if verb == "del":
        del group.attrs[key]
    elif key == "renamed":
        group.attrs["models"] = ["resnet", "els"]
    elif key == "shortened":
        group.attrs["models"] = ["unet"]
    else:
        group.attrs["config"] = "edited"
    code, out, err = cli(capsys, monkeypatch, "status", "--json")
    assert code == 0 and "Traceback" not in err, err
    rows = {Path(r["location"]).name: r for r in json.loads(out)}
    assert rows["good"]["state"] == "complete", rows
    assert rows["bad"]["state"].startswith("broken: run ") and "attribute" in rows["bad"]["state"], rows["bad"]
    code, out, _ = cli(capsys, monkeypatch, "status")
    assert code == 0 and "good" in out and "broken" in out
    for args in (["aggregate", "bad"], ["plot", "bad"], ["verify", "bad"],
                 ["compute", "--models", "is", "--nsteps", "2", "--device", "cpu", "--run", "bad"]):
        code, out, err = cli(capsys, monkeypatch, *args)
        assert code == 2 and one_line(err) and "is broken" in err, (args, err)
    with pytest.raises(BrokenRunError):
        open_run(tmp_path / "cache" / "bad")
    fresh = create_run(tmp_path / "cache" / "bad", {}, MODELS, [0], [-1], 2, (1, 4, 4), maps=False, overwrite=True)
    assert fresh.pending() == [(0, 0), (0, 1)]  # edtool's own broken store may be replaced with --overwrite


# ------------------------------------------------------------------ what --overwrite may delete


def test_compute_overwrite_keeps_a_foreign_summary_and_refuses_a_symlinked_store(tmp_path, capsys, monkeypatch):
    compute(config(tmp_path / "r", models=["is"], nsteps=2, realizations=1))
    theirs = '{"unet": {"mean_ed_magnitude": 0.5}}\n'  # the seed tool's file in the same folder
    (tmp_path / "r" / "summary_stats.json").write_text(theirs)
    code, _, err = cli(capsys, monkeypatch, "aggregate", tmp_path / "r")
    assert code == 2 and one_line(err) and "not written by edtool" in err
    with pytest.warns(UserWarning, match="kept .*summary_stats.json"):
        compute(config(tmp_path / "r", models=["is"], nsteps=3, realizations=1, overwrite=True))
    assert (tmp_path / "r" / "summary_stats.json").read_text() == theirs
    # its own summary, written atomically and recognized: --overwrite deletes it
    (tmp_path / "r" / "summary_stats.json").unlink()
    aggregate_run(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary_stats.json").read_text())["nsteps"] == 3
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp" in p]
    compute(config(tmp_path / "r", models=["is"], nsteps=2, realizations=1, overwrite=True))
    assert not (tmp_path / "r" / "summary_stats.json").exists()
    # ed.zarr a symbolic link to somebody's data: refused in one line, the data untouched
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "ed.zarr").symlink_to(tmp_path / "r" / "ed.zarr")
    before = snapshot(tmp_path / "r")
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", "is", "--nsteps", "3", "--device", "cpu",
                       "--run-dir", tmp_path / "link", "--overwrite")
    assert code == 2 and one_line(err) and "symbolic link" in err, err
    assert snapshot(tmp_path / "r") == before


def test_overwrite_killed_midway_leaves_no_half_store(tmp_path, monkeypatch, filled_copy):
    """The old store is renamed away before it is deleted: a kill leaves no ed.zarr, never a half one."""
    filled_copy(tmp_path / "r")

    def killed(path, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        create_run(tmp_path / "r", {}, MODELS, [0], [-1], 2, (1, 4, 4), maps=False, overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "r" / "ed.zarr").exists()
    assert run_status(str(tmp_path / "r"))["state"].startswith("unreadable: no edtool run")


# ------------------------------------------------------------------ locks: readers and writers


def test_overwrite_waits_for_a_reader_and_a_reader_for_it(tmp_path, filled_copy):
    filled_copy(tmp_path / "r")
    events = []

    def replace():
        events.append("overwrite starts")
        create_run(tmp_path / "r", {}, MODELS, [0], [-1], 2, (1, 4, 4), maps=False, overwrite=True)
        events.append("overwrite done")

    with pytest.warns(UserWarning, match="busy"):
        with access_lock(tmp_path / "r"):  # a reader (plot, verify) holds the run
            thread = threading.Thread(target=replace)
            thread.start()
            time.sleep(0.5)
            assert events == ["overwrite starts"] and open_run(tmp_path / "r").n_realizations == 4
            events.append("reader done")
        thread.join(timeout=30)
    assert events == ["overwrite starts", "reader done", "overwrite done"]
    with access_lock(tmp_path / "r", exclusive=True, doing="testing"):
        with pytest.raises(EdtoolError, match=r"busy \(pid \d+ on .*: testing\)"):
            with access_lock(tmp_path / "r", wait=0.2):
                pass
        assert run_status(str(tmp_path / "r"))["state"].startswith("busy: ")


def test_two_aggregates_and_a_plot_at_once(tmp_path):
    """Real processes started together on one run: all succeed (the aggregates take turns), the
    summary is whole JSON, the store's aggregate is readable."""
    filled(tmp_path / "r", n_real=6)
    env = subprocess_env()
    procs = [subprocess.Popen([sys.executable, "-m", "edtool", *cmd, str(tmp_path / "r")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in (["aggregate", "--json"], ["aggregate", "--json"], ["plot"])]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert [json.loads(out)["cells_done"] for out, _ in outs[:2]] == [12, 12]
    assert json.loads((tmp_path / "r" / "summary_stats.json").read_text())["cells_done"] == 12
    assert open_run(tmp_path / "r").group["aggregate"]["ed_fro_mean"].shape == (2, 3)


@pytest.mark.slow
def test_concurrent_aggregates_and_a_plot_during_compute(tmp_path):
    """Real processes: a compute running; two aggregates and a plot at once on its partial run all
    succeed on a consistent snapshot; compute is not disturbed and its run ends whole."""
    run_dir = tmp_path / "r"
    args = ["compute", "--models", "resnet,is", "--nsteps", "3", "--realizations", "4", "--probes", "32",
            "--device", "cpu", "--quiet", "--run-dir", str(run_dir)]
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "edtool", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_done_cell(run_dir, proc)
        readers = [subprocess.Popen([sys.executable, "-m", "edtool", *cmd, str(run_dir)], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for cmd in (["aggregate", "--json"], ["aggregate", "--json"], ["plot"])]
        outs = [r.communicate(timeout=300) for r in readers]
        assert [r.returncode for r in readers] == [0, 0, 0], outs
        for out, _ in outs[:2]:
            summary = json.loads(out)
            assert 1 <= summary["cells_done"] <= 8
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    run = open_run(run_dir)
    assert run.done_mask().all() and run.damaged() == {}
    assert aggregate_run(run_dir)["cells_done"] == 8


# ------------------------------------------------------------------ command-line edges and cost


def test_memory_url_refused_on_the_command_line(tmp_path, capsys, monkeypatch):
    for args in (["compute", "--models", "is", "--nsteps", "2", "--run-dir", "memory://edtool-cli-run"],
                 ["aggregate", "memory://edtool-cli-run"], ["plot", "memory://x"], ["verify", "MEMORY://x"]):
        code, _, err = cli(capsys, monkeypatch, *args)
        assert code == 2 and one_line(err) and "vanishes when edtool exits" in err, (args, err)


def test_absurd_realization_count_is_one_line_not_memory_error(tmp_path, capsys, monkeypatch):
    start = time.perf_counter()
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", "is", "--nsteps", "2", "--realizations",
                       str(10**9), "--run-dir", tmp_path / "r")
    assert code == 2 and one_line(err) and "at most 1000000" in err, err
    assert time.perf_counter() - start < 10 and not (tmp_path / "r").exists()
    with pytest.raises(EdtoolError, match="more than one run holds"):
        create_run(tmp_path / "api", {}, ["is"], range(10**6 + 1), [-1] * (10**6 + 1), 2, (1, 4, 4), maps=False)


def test_each_batch_reads_only_its_own_done_flags(tmp_path, monkeypatch):
    """Per-cell cost independent of the run size: whole-run reads of `done` happen a fixed number of
    times per compute (start, end), not once per batch."""
    sizes = []
    real = RunStore.done_mask

    def spy(self, realizations=None):
        sizes.append(self.n_realizations if realizations is None else len(list(realizations)))
        return real(self, realizations)

    monkeypatch.setattr(RunStore, "done_mask", spy)
    compute(config(tmp_path / "r", models=["is"], nsteps=1, realizations=6))
    assert sizes.count(6) <= 3 and sizes.count(1) >= 6, sizes


def test_readers_leave_nothing_in_a_folder_without_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    for command in (aggregate_run, plot_run, verify_run):
        with pytest.raises(EdtoolError, match="no edtool run"):
            command(str(tmp_path / "notarun"))
    assert os.listdir(tmp_path / "notarun") == []
