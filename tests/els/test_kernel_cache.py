"""The ELS kernel's build cache as a user meets it: a cached library that is truncated or overwritten is
built again, never mapped (a truncated one killed the process with SIGBUS on every run); a crash leaves
no lock that blocks the next run; without a compiler the one warning reaches the user."""

import hashlib
import os
import shutil
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

from edtool.els import kernel as els_kernels
from edtool.store.run import open_run
from helpers import console_script, edtool, REPO

ELS = ["compute", "--models", "els", "--nsteps", "2", "--realizations", "1", "--max-samples", "200",
       "--device", "cpu", "--quiet"]

needs_compiler = pytest.mark.skipif(shutil.which(els_kernels.CXX) is None, reason="no C++ compiler here")


def _library(kernel_dir):
    (so,) = kernel_dir.glob("els_*.so")
    return so


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A kernel cache built by a first compute, and that run's numbers."""
    root = tmp_path_factory.mktemp("kernel")
    proc = edtool(*ELS, "--run-dir", root / "run", env={"EDTOOL_KERNEL_DIR": str(root / "k"),
                                                        "EDTOOL_CACHE": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr
    return root / "k", open_run(root / "run").read("ed_fro", "els")


@needs_compiler
def test_the_build_records_its_sha256_beside_the_library(built):
    kernel_dir, _ = built
    so = _library(kernel_dir)
    recorded = so.with_name(so.name + ".sha256").read_text().strip()
    assert recorded == hashlib.sha256(so.read_bytes()).hexdigest()
    assert sorted(p.name for p in kernel_dir.iterdir()) == sorted([so.name, so.name + ".sha256"])  # no leftovers


def _damage(kernel_dir, how):
    so = _library(kernel_dir)
    if how.startswith("truncate"):
        with open(so, "r+b") as f:
            f.truncate(int(how.split()[1]))
    elif how == "flip a byte":  # still a loadable library, other code: only the checksum tells
        data = bytearray(so.read_bytes())
        data[len(data) // 2] ^= 0xFF
        so.write_bytes(bytes(data))
    elif how == "no checksum":  # a cache from before checksums
        so.with_name(so.name + ".sha256").unlink()
    elif how == "checksum garbage":
        so.with_name(so.name + ".sha256").write_text("garbage\n")


@needs_compiler
# two damages in the default run (a truncation, which mapped would be a SIGBUS, and a changed byte); the rest with -m slow
@pytest.mark.parametrize("how", [pytest.param("truncate 1000", marks=pytest.mark.slow), "truncate 4000",
                                 pytest.param("truncate 60000", marks=pytest.mark.slow), "flip a byte",
                                 pytest.param("no checksum", marks=pytest.mark.slow),
                                 pytest.param("checksum garbage", marks=pytest.mark.slow)])
def test_a_damaged_cached_kernel_is_built_again_and_gives_the_same_numbers(built, how, tmp_path):
    kernel_dir, reference = built
    shutil.copytree(kernel_dir, tmp_path / "k")
    _damage(tmp_path / "k", how)
    proc = edtool(*ELS, "--run-dir", tmp_path / "run", env={"EDTOOL_KERNEL_DIR": str(tmp_path / "k")})
    assert proc.returncode == 0 and proc.stderr.strip() == "", (proc.returncode, proc.stderr)  # not -7 (SIGBUS)
    assert np.array_equal(open_run(tmp_path / "run").read("ed_fro", "els"), reference)
    so = _library(tmp_path / "k")
    assert so.with_name(so.name + ".sha256").read_text().strip() == hashlib.sha256(so.read_bytes()).hexdigest()
    assert not (tmp_path / "run" / "lock").exists()


def test_without_a_compiler_the_one_warning_reaches_the_user(tmp_path):
    """compute measures inside a warnings filter; the kernel is loaded before it, so its note is shown."""
    proc = edtool(*ELS, "--run-dir", tmp_path / "run", env={"EDTOOL_KERNEL_DIR": str(tmp_path / "k"),
                                                            "CXX": "no-such-compiler-xyz"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fused ELS kernel is unavailable" in lines[0] and "g++" in lines[0], proc.stderr
    assert np.isfinite(open_run(tmp_path / "run").read("ed_fro", "els")).all()


# Slow only in the process that is killed (SLOWMOD_SLEEP set), so its lock is held long enough to kill it
# there; the run after it computes the same cells at full speed.
SLOW_MODULE = """
import os
import time


class Slow:
    image_shape = (1, 2, 2)

    def score(self, t, x, label=None):
        time.sleep(float(os.environ.get("SLOWMOD_SLEEP", "0")))
        return -x
"""


def test_a_killed_compute_leaves_no_lock_that_blocks_the_next_run(tmp_path):
    """kill -9 (as SIGBUS did) while the run lock is held: the next run takes the dead holder's lock over
    with a warning, finishes every cell, and removes its lock."""
    (tmp_path / "slowmod.py").write_text(textwrap.dedent(SLOW_MODULE))
    args = ["compute", "--models", "s=py:slowmod:Slow", "--nsteps", "20", "--realizations", "2", "--estimator",
            "exact", "--device", "cpu", "--quiet", "--run-dir", str(tmp_path / "run")]
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    child = subprocess.Popen([*console_script(), *args], env={**os.environ, "OMP_NUM_THREADS": "1", "SLOWMOD_SLEEP": "0.2", **env},
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / "lock"
    deadline = time.time() + 60
    while not lock.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the compute never took its lock"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert lock.exists()  # what a crash leaves
    proc = edtool(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "stale lock" in proc.stderr and "that process is gone" in proc.stderr
    assert open_run(tmp_path / "run").done_mask().all() and not lock.exists()


@needs_compiler
def test_a_verified_library_in_a_folder_that_takes_no_files_loads_from_a_temporary_copy(built, tmp_path):
    """The private copy goes to the system's temporary folder when the cache folder takes no new files (a
    read-only shared cache; here a folder that does not exist)."""
    kernel_dir, _ = built
    so = _library(kernel_dir)
    lib = els_kernels._open_copy(so.read_bytes(), so.name, tmp_path / "not-a-folder")
    assert hasattr(lib, "score_chunk") and not (tmp_path / "not-a-folder").exists()
