"""Trust all the way down (issue 22): the run store's digests cover every number and setting,
leftovers of killed commands are cleaned or reported, a full disk is one line, odd lock files
are one line or stale.

Each test damages real files on disk and runs the console script in a real process; the truth
is an undamaged copy of the same run, or the store's own contents before the damage.
"""

import errno
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edtool.study.aggregate import aggregate_run
from edtool.study.compute import compute
from edtool.store.run import open_run
from test_pipeline import REPO, assert_same_arrays, config, dead_pid, snapshot, subprocess_env  # noqa: F401
from test_run_integrity import MODELS, edtool, filled, one_line  # noqa: F401


def edtool_disk_full(after: int, *args, env=None):
    """The console entry point in a real process whose disk fills up after `after` store writes."""
    script = textwrap.dedent(f"""
        import errno, os, sys
        import zarr.storage._local as local
        real, count = local._put, [0]
        def put(path, value, exclusive=False):
            count[0] += 1
            if count[0] > {after}:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, value, exclusive)
        local._put = put
        sys.argv = ["edtool", *{[str(a) for a in args]!r}]
        from edtool.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


# ------------------------------------------------------------------ a full disk (issue 22, item 10)


def test_disk_full_during_compute_is_one_line_and_the_rerun_completes_it(tmp_path):
    cfg = dict(models=["is"], nsteps=2, realizations=2, probes=2)
    compute(config(tmp_path / "truth", **cfg))
    code, _, err = edtool_disk_full(30, "compute", "--models", "is", "--nsteps", 2, "--realizations", 2,
                                    "--probes", 2, "--device", "cpu", "--quiet", "--run-dir", tmp_path / "r")
    assert code == 2 and one_line(err), err
    assert f"cannot write {tmp_path / 'r' / 'ed.zarr'}" in err and "no space left" in err, err
    run = open_run(tmp_path / "r")
    assert run.damaged() == {} and 0 < len(run.pending()) <= 2  # nothing half done reads as done
    assert not list((tmp_path / "r").glob("lock*"))  # its lock is released
    compute(config(tmp_path / "r", **cfg))
    assert_same_arrays(tmp_path / "r", tmp_path / "truth", names=("done", *open_run(tmp_path / "r").cell_arrays))


def test_disk_full_during_aggregate_is_one_line_and_the_store_stays_whole(tmp_path):
    filled(tmp_path / "truth")
    filled(tmp_path / "r")
    truth = aggregate_run(tmp_path / "truth")
    code, _, err = edtool_disk_full(5, "aggregate", tmp_path / "r")
    assert code == 2 and one_line(err) and "no space left on the device" in err, err
    assert str(tmp_path / "r") in err
    code, out, err = edtool("verify", tmp_path / "r")
    assert code == 0 and "0 damaged cell(s)" in out, (out, err)
    assert aggregate_run(tmp_path / "r")["unet"] == truth["unet"]


# ------------------------------------------------------------------ odd lock files (issue 22, item 14)


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


@pytest.mark.parametrize("content", ['{"pid": "abc", "host": "HOST"}', "[1, 2]"])
def test_a_lock_file_edtool_never_writes_is_stale(tmp_path, is_run, content):
    """A lock that reads as whole JSON but is no record run_lock writes: no live edtool holds it, so
    status lists the run and compute takes the lock over (a warning says so) and finishes."""
    import socket

    run = copy_run(is_run, tmp_path / "r")
    (run / "lock").write_text(content.replace("HOST", socket.gethostname()))
    code, out, err = edtool("status", run, "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "complete", (out, err)
    code, out, err = edtool("compute", *IS_ARGS, "--run-dir", run)
    assert code == 0 and "taking over an unreadable lock" in err and "Traceback" not in err, err
    assert not (run / "lock").exists()


def test_a_lock_that_is_a_folder_is_one_line_and_kept(tmp_path, is_run):
    copy_run(is_run, tmp_path / "r")
    (tmp_path / "r" / "lock").mkdir()
    (tmp_path / "r" / "lock" / "theirs.txt").write_text("keep me")
    code, _, err = edtool("compute", *IS_ARGS, "--run-dir", tmp_path / "r")
    assert code == 2 and one_line(err) and "lock is a folder" in err, err
    assert (tmp_path / "r" / "lock" / "theirs.txt").read_text() == "keep me"
    assert not list((tmp_path / "r").glob("lock.stale*"))
    code, out, err = edtool("status", tmp_path / "r", "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "complete", (out, err)
