"""Trust all the way down: the run store's digests cover every number and setting,
leftovers of killed commands are cleaned or reported, a full disk is one line, odd lock files
are one line or stale.

Each test damages real files on disk and runs the console entry point on them (a real process where
one is killed); the truth is an undamaged copy of the same run, or the store's own contents before the
damage.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edtool.study.aggregate import aggregate_run
from edtool.study.compute import compute
from edtool.store.run import open_run
from helpers import assert_same_arrays, cli, config, filled, make_legacy, MODELS, one_line, snapshot, subprocess_env


def disk_full_at(monkeypatch, where: str):
    """The disk is full from the first write of a store key containing `where` on: zarr's file writer
    raises ENOSPC, as the operating system does."""
    import errno
    import os

    import zarr.storage._local as local

    real, full = local._put, []

    def put(path, value, exclusive=False):
        if full or where in str(path):
            full.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)


# ------------------------------------------------------------------ a full disk


def test_disk_full_during_compute_is_one_line_and_the_rerun_completes_it(tmp_path, is_run, capsys, monkeypatch):
    with monkeypatch.context() as full:
        disk_full_at(full, "jac_fro/c/1/")
        code, _, err = cli(capsys, full, "compute", *IS_ARGS, "--run-dir", tmp_path / "r")
    assert code == 2 and one_line(err), err  # realization 1's second array: its cell is half written
    assert f"cannot write {tmp_path / 'r' / 'ed.zarr' / 'jac_fro' / 'c' / '1'}" in err and "no space left" in err, err
    run = open_run(tmp_path / "r")
    assert run.damaged() == {} and run.pending() == [(1, 0)]  # nothing half done reads as done
    assert not list((tmp_path / "r").glob("lock*"))  # its lock is released
    compute(config(tmp_path / "r", **IS_RUN))  # is_run: the same settings (IS_ARGS) computed without a full disk
    assert_same_arrays(tmp_path / "r", is_run, names=("done", *open_run(tmp_path / "r").cell_arrays))


def test_disk_full_during_aggregate_is_one_line_and_the_store_stays_whole(tmp_path, capsys, monkeypatch):
    filled(tmp_path / "truth")
    filled(tmp_path / "r")
    truth = aggregate_run(tmp_path / "truth")
    aggregate_run(tmp_path / "r")  # an aggregate there already, being replaced when the disk fills
    with monkeypatch.context() as full:
        disk_full_at(full, "aggregate/ed_fro_std")
        code, _, err = cli(capsys, full, "aggregate", tmp_path / "r")
    assert code == 2 and one_line(err) and "no space left on the device" in err, err
    assert f"cannot write {tmp_path / 'r' / 'ed.zarr' / 'aggregate' / 'ed_fro_std'}" in err
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "r")
    assert code == 0 and "0 damaged cell(s)" in out and "damaged:" not in out, (out, err)
    from edtool.study.aggregate import read_aggregate

    assert read_aggregate(open_run(tmp_path / "r")) is None  # half replaced: never read as current
    assert aggregate_run(tmp_path / "r")["unet"] == truth["unet"]


# ------------------------------------------------------------------ odd lock files


IS_RUN = dict(models=["is"], nsteps=2, realizations=2, probes=2)
IS_ARGS = ["--models", "is", "--nsteps", 2, "--realizations", 2, "--probes", 2, "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def is_run(tmp_path_factory):
    """A finished run of the `is` machine (made once), which `edtool compute IS_ARGS` continues."""
    path = tmp_path_factory.mktemp("is-run") / "r"
    compute(config(path, **IS_RUN))
    return path


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target, symlinks=True)
    return target


def test_a_lock_file_edtool_never_writes_is_stale(tmp_path, is_run, capsys, monkeypatch):
    """A lock that reads as whole JSON but is no record run_lock writes: no live edtool holds it, so
    status lists the run and compute takes the lock over (a warning says so) and finishes."""
    import socket

    from edtool.store.locks import run_lock

    for content in ("[1, 2]", '"text"', '{"pid": 1.5, "host": "h"}', '{"host": "h"}'):
        (tmp_path / "api").mkdir(exist_ok=True)
        (tmp_path / "api" / "lock").write_text(content)
        with pytest.warns(UserWarning, match="taking over an unreadable lock"):
            with run_lock(tmp_path / "api"):
                pass
        assert not (tmp_path / "api" / "lock").exists()
    run = copy_run(is_run, tmp_path / "r")
    (run / "lock").write_text('{"pid": "abc", "host": "%s"}' % socket.gethostname())
    code, out, err = cli(capsys, monkeypatch, "status", run, "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "complete", (out, err)
    code, out, err = cli(capsys, monkeypatch, "compute", *IS_ARGS, "--run-dir", run)
    assert code == 0 and "taking over an unreadable lock" in err and "Traceback" not in err, err
    assert not (run / "lock").exists()


def test_a_lock_that_is_a_folder_is_one_line_and_kept(tmp_path, is_run, capsys, monkeypatch):
    copy_run(is_run, tmp_path / "r")
    (tmp_path / "r" / "lock").mkdir()
    (tmp_path / "r" / "lock" / "theirs.txt").write_text("keep me")
    code, _, err = cli(capsys, monkeypatch, "compute", *IS_ARGS, "--run-dir", tmp_path / "r")
    assert code == 2 and one_line(err) and "lock is a folder" in err, err
    assert (tmp_path / "r" / "lock" / "theirs.txt").read_text() == "keep me"
    assert not list((tmp_path / "r").glob("lock.stale*"))
    code, out, err = cli(capsys, monkeypatch, "status", tmp_path / "r", "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "complete", (out, err)


# ------------------------------------------------------------------ digests


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_time_seed_label_are_found_refused_and_rewritten_by_compute(tmp_path, is_run, capsys, monkeypatch):
    """time deleted, seed deleted, label bit-flipped: verify names each (never seeds read as 0),
    aggregate and plot refuse in one line, status says damaged; the same compute rewrites them
    from its settings, equal bit for bit to the run before the damage."""
    run = copy_run(is_run, tmp_path / "r")
    store = run / "ed.zarr"
    (store / "time" / "c" / "0").unlink()
    (store / "seed" / "c" / "0").unlink()
    flip(store / "label" / "c" / "0")

    code, out, err = cli(capsys, monkeypatch, "verify", run)
    assert code == 1 and "Traceback" not in err, (out, err)
    for line in ("damaged: array time: missing", "damaged: array seed: missing",
                 "damaged: array label: unreadable (checksum mismatch)"):
        assert line in out, out
    for command in ("aggregate", "plot"):
        code, _, err = cli(capsys, monkeypatch, command, run)
        assert code == 2 and one_line(err) and "is damaged: array time (missing), array seed (missing)" in err, err
    assert not (run / "summary_stats.json").exists()
    code, out, err = cli(capsys, monkeypatch, "status", run, "--json")
    assert code == 0 and json.loads(out)[0]["state"].startswith("damaged: array time"), out
    code, out, err = cli(capsys, monkeypatch, "compute", *IS_ARGS, "--run-dir", run)
    assert code == 0 and "rewrote its damaged array time (missing), array seed (missing), array label" in err, err
    code, out, err = cli(capsys, monkeypatch, "verify", run)
    assert code == 0 and "0 damaged cell(s)" in out and "damaged:" not in out, (out, err)
    fixed = open_run(run)
    assert fixed.fixed_damage == {}
    for name in ("time", "seed", "label"):
        np.testing.assert_array_equal(fixed.read(name), open_run(is_run).read(name), err_msg=name)


def test_fixed_arrays_are_rewritten_only_from_settings_that_reproduce_them(tmp_path, capsys, monkeypatch):
    """A damaged seed array and a compute with other settings: refused, nothing written; settings that
    match the config but not the recorded seeds (the API): refused by the digest."""
    from edtool.errors import EdtoolError
    from edtool.store.run import create_run

    filled(tmp_path / "r")
    (tmp_path / "r" / "ed.zarr" / "seed" / "c" / "0").unlink()
    before = snapshot(tmp_path / "r")
    with pytest.raises(EdtoolError, match="do not reproduce its seed array"):
        create_run(tmp_path / "r", {"estimator": "exact"}, MODELS, [5, 6, 7, 8], [-1] * 4, 3, (1, 4, 4), maps=False)
    with pytest.raises(EdtoolError, match="was made with nsteps=3"):
        create_run(tmp_path / "r", {"estimator": "exact"}, MODELS, [0, 1, 2, 3], [-1] * 4, 2, (1, 4, 4), maps=False)
    assert snapshot(tmp_path / "r") == before
    run = create_run(tmp_path / "r", {"estimator": "exact"}, MODELS, [0, 1, 2, 3], [-1] * 4, 3, (1, 4, 4), maps=False)
    assert run.fixed_damage == {} and run.seeds.tolist() == [0, 1, 2, 3]


def test_an_edited_attribute_or_record_makes_the_run_broken(tmp_path, capsys, monkeypatch):
    """config.nsteps edited in zarr.json (by hand, as a user would): the run is broken, one line,
    for every command; status still lists the other runs. So is a deleted digest record."""

    filled(tmp_path / "r")
    filled(tmp_path / "r2")
    for run, edit in ((tmp_path / "r", "nsteps"), (tmp_path / "r2", "record")):
        path = run / "ed.zarr" / "zarr.json"
        meta = json.loads(path.read_text())
        if edit == "nsteps":
            meta["attributes"]["config"]["nsteps"] = 3
        else:
            del meta["attributes"]["integrity"]
        path.write_text(json.dumps(meta))
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "r")
    assert code == 2 and one_line(err) and "is broken: group attributes config" in err, (out, err)
    for args in (["aggregate", tmp_path / "r"], ["plot", tmp_path / "r"], ["verify", tmp_path / "r2"]):
        code, _, err = cli(capsys, monkeypatch, *args)
        assert code == 2 and one_line(err) and "is broken" in err, (args, err)
    code, out, _ = cli(capsys, monkeypatch, "status", tmp_path / "r2", "--json")
    assert json.loads(out)[0]["state"].startswith("broken:") and "integrity" in json.loads(out)[0]["state"]


def test_swapped_or_copied_chunks_are_damage_and_compute_repairs_them(tmp_path, is_run, capsys, monkeypatch):
    run = copy_run(is_run, tmp_path / "r")
    a, b = (run / "ed.zarr" / "final" / "c" / str(r) / "0" / "0" / "0" / "0" for r in (0, 1))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert data_a != data_b
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    code, out, err = cli(capsys, monkeypatch, "verify", run)
    assert code == 1 and out.count("final chunk does not match its digest") == 2, (out, err)
    code, _, err = cli(capsys, monkeypatch, "compute", *IS_ARGS, "--run-dir", run)
    assert code == 0, err
    assert open_run(run).damaged() == {}
    assert_same_arrays(run, is_run, names=("done", "cell_digest", *open_run(run).cell_arrays))


def test_a_chunk_copied_from_another_run_is_damage(tmp_path):
    filled(tmp_path / "r")
    filled(tmp_path / "other", seed=1)  # same layout, other numbers: its chunks decode fine here
    source = tmp_path / "other" / "ed.zarr" / "final" / "c" / "2" / "0" / "0" / "0" / "0"
    target = tmp_path / "r" / "ed.zarr" / "final" / "c" / "2" / "0" / "0" / "0" / "0"
    target.write_bytes(source.read_bytes())
    assert open_run(tmp_path / "r").damaged() == {(2, 0): "final chunk does not match its digest (edited, moved or "
                                                          "copied)", (2, 1): "final chunk does not match its digest "
                                                          "(edited, moved or copied)"}


@pytest.mark.parametrize("name, dtype", [("asym", "float64"), ("seed", "float64"), ("done", "int8"),
                                         ("cell_digest", "int64"), ("time", "bogus")])
def test_an_edited_data_type_is_a_broken_run_not_an_internal_error(tmp_path, capsys, monkeypatch, name, dtype):

    filled(tmp_path / "r")
    path = tmp_path / "r" / "ed.zarr" / name / "zarr.json"
    meta = json.loads(path.read_text())
    meta["data_type"] = dtype
    path.write_text(json.dumps(meta))
    for args in (["verify", tmp_path / "r"], ["aggregate", tmp_path / "r"]):
        code, _, err = cli(capsys, monkeypatch, *args)
        assert code == 2 and one_line(err) and "is broken: array" in err and "internal" not in err, (args, err)


def test_aggregate_arrays_are_digested(tmp_path, capsys, monkeypatch):
    """An aggregate chunk replaced by another run's (valid checksum, other numbers): verify names it,
    plot does not use it (computes afresh), aggregate rewrites it."""
    from edtool.study.aggregate import compute_aggregate, read_aggregate

    filled(tmp_path / "r")
    filled(tmp_path / "other", seed=1)
    aggregate_run(tmp_path / "r")
    aggregate_run(tmp_path / "other")
    run = open_run(tmp_path / "r")
    assert read_aggregate(run) is not None
    chunk = Path("ed.zarr") / "aggregate" / "ed_fro_mean" / "c" / "0" / "0"
    (tmp_path / "r" / chunk).write_bytes((tmp_path / "other" / chunk).read_bytes())
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "r")
    assert code == 1 and "damaged: aggregate/ed_fro_mean: does not match its digest" in out, (out, err)
    assert read_aggregate(open_run(tmp_path / "r")) is None
    aggregate_run(tmp_path / "r")
    stored = read_aggregate(open_run(tmp_path / "r"))
    np.testing.assert_array_equal(stored["ed_fro_mean"],
                                  compute_aggregate(open_run(tmp_path / "r"))[0]["ed_fro_mean"].astype(np.float32))


def test_a_store_made_before_digests_opens_resumes_and_aggregates(tmp_path, capsys, monkeypatch):

    filled(tmp_path / "truth")
    filled(tmp_path / "r", skip={(3, 0), (3, 1)})
    make_legacy(tmp_path / "r")
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "r")
    assert code == 0 and out.count("made before edtool kept digests") == 1 and "damaged:" not in out, (out, err)
    code, out, _ = cli(capsys, monkeypatch, "status", tmp_path / "r", "--json")
    (row,) = json.loads(out)
    assert row["legacy"] is True and row["state"] == "partial", row
    code, out, _ = cli(capsys, monkeypatch, "status", tmp_path / "r")
    assert out.count("made before edtool kept digests") == 1
    legacy = open_run(tmp_path / "r", mode="r+")
    assert legacy.integrity is None and legacy.fixed_damage == {} and legacy.labels.tolist() == [-1] * 4
    rng = np.random.default_rng(0)  # the generator filled() used, replayed to realization 3
    cells = [[rng.random(3) + 0.1, rng.random(3) + 1, rng.random(3) / 2, rng.random(3) / 10,
              rng.uniform(-1, 1, (1, 4, 4))] for _ in range(8)]
    for m in range(2):
        legacy.write_cell(3, m, *cells[6 + m])
    assert legacy.damaged() == {}
    assert aggregate_run(tmp_path / "r")["unet"] == aggregate_run(tmp_path / "truth")["unet"]
    assert "cell_digest" not in open_run(tmp_path / "r").group


# ------------------------------------------------------------------ leftovers of kills


def test_what_a_killed_overwrite_leaves_is_reported_and_cleaned_by_the_next_compute(tmp_path, is_run, capsys,
                                                                                    monkeypatch):
    """A real process SIGKILLed while --overwrite deletes the old store leaves `.ed.zarr.deleting-*`
    (a whole old store): status reports it as stale, the next compute removes it with a warning
    and finishes the run. A leftover of a live process (this test's) is reported and kept."""
    import os
    import socket

    run = copy_run(is_run, tmp_path / "r")
    script = textwrap.dedent(f"""
        import os, shutil, signal
        from edtool.store.run import create_run
        shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        create_run({str(run)!r}, {{}}, ["is"], [0], [-1], 2, (1, 4, 4), maps=False, overwrite=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    (killed,) = run.glob(".ed.zarr.deleting-*")
    assert (killed / "zarr.json").is_file() and not (run / "ed.zarr").exists()
    live = run / f".ed.zarr.partial-{os.getpid()}@{socket.gethostname()}-0123abcd"
    live.mkdir()
    code, out, err = cli(capsys, monkeypatch, "status", run)
    out = " ".join(out.split())  # status wraps its lines at 80 columns
    assert code == 0 and f"leftover {killed.name}: an old store being deleted (--overwrite)" in out, (out, err)
    assert "stale: the next compute or aggregate on this run removes it" in out
    assert f"leftover {live.name}: a store being built by pid {os.getpid()}" in out and "kept" in out
    code, out, err = cli(capsys, monkeypatch, "compute", *IS_ARGS, "--run-dir", run)
    assert code == 0 and "removed what killed commands left" in err and killed.name in err, err
    assert not killed.exists() and live.is_dir()
    assert open_run(run).done_mask().all()
