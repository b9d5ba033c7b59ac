"""experiments/training/gpu_campaign.sh, the script a GPU lease runs, run here on CPU the way
the lease runs it: a time-limited stretch of a state packed into $OUT/<net>.tar, then unpacked into the
committed state only when it is a complete state further on."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edtool.networks import train_state
from edtool.paths import REPO_ROOT
from helpers import edtool_in_process, write_idx_root

SCRIPT = REPO_ROOT / "experiments" / "training" / "gpu_campaign.sh"


def _script(*args, **env):
    """bash gpu_campaign.sh ARGS with this interpreter as python3; returns the finished process."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, "EDTOOL_DEVICE": "cpu", "EDTOOL_CAMPAIGN_NETS": "tiny",
                               "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}})


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A tiny resnet's training state after 2 steps, trained once (in this process: the start state is
    input here, the script's own training runs in its process); each test trains a copy further."""
    folder = tmp_path_factory.mktemp("two-steps") / "tiny"
    done = edtool_in_process("train", "--arch", "resnet", "--width", "16", "--layers", "1", "--batch", "2",
                             "--lr-gamma", "0.99", "--steps", "2", "--state", folder, "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    return folder


# The stretches train 1 second (`run 1 0`): the trainer takes at least one step before it looks at its limit,
# so the state always ends past its 2 steps.


def _step(folder: Path) -> int:
    return train_state.read(folder)["step"]


def test_a_lease_stretch_comes_back_as_a_tar_and_unpacks_only_forward(tmp_path, two_steps):
    lease, committed = tmp_path / "lease", tmp_path / "committed"
    lease.mkdir()
    shutil.copytree(two_steps, lease / "tiny")
    shutil.copytree(lease, committed)  # what git holds, while the lease's copy trains
    shutil.copytree(lease / "tiny", tmp_path / "first")
    rng = np.random.default_rng(0)
    write_idx_root(tmp_path / "held", rng.integers(0, 256, (8, 28, 28)), rng.integers(0, 10, 8), split="test")

    done = _script("run", 1, 0, EDTOOL_TRAINING_DIR=lease, EDTOOL_HELD_OUT=tmp_path / "held", OUT=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "out" / "train_tiny.log").read_text()
    assert "stopped at the time limit" in log, log
    reached = _step(lease / "tiny")
    assert reached > 2
    with tarfile.open(tmp_path / "out" / "tiny.tar") as tar:
        names = set(tar.getnames())
    assert "tiny/state.json" in names and f"tiny/state_step{reached:08d}.safetensors" in names
    assert (tmp_path / "out" / "tiny_snapshots.tar").exists()  # empty here: no snapshot in 1 second

    done = _script("unpack", tmp_path / "out", EDTOOL_TRAINING_DIR=committed)
    assert done.returncode == 0 and f"step 2 -> {reached}" in done.stdout, done.stderr
    assert _step(committed / "tiny") == reached
    assert sorted(p.name for p in (committed / "tiny").glob("state_step*")) == [f"state_step{reached:08d}.safetensors"]
    assert [p.name for p in committed.iterdir()] == ["tiny"]  # no work folder left behind

    done = _script("unpack", tmp_path / "nothing", EDTOOL_TRAINING_DIR=committed)
    assert done.returncode != 0 and "nothing unpacked" in done.stderr
    done = _script("unpack", tmp_path / "out", EDTOOL_TRAINING_DIR=committed)  # the same stretch again
    assert done.returncode != 0 and "nothing replaced" in done.stderr

    def flipped(b: bytes) -> bytes:  # 64 bytes inside the state's tensors, the tar itself intact
        m = len(b) // 2
        return b[:m] + bytes(x ^ 0xFF for x in b[m:m + 64]) + b[m + 64:]

    tar_bytes = (tmp_path / "out" / "tiny.tar").read_bytes()
    for damage in (lambda b: b[:-20000], flipped):  # a transfer broken off; bytes changed on the way
        (tmp_path / "out" / "tiny.tar").write_bytes(damage(tar_bytes))
        shutil.rmtree(committed / "tiny")
        shutil.copytree(tmp_path / "first", committed / "tiny")  # the committed state before the stretch
        before = {p.name: p.read_bytes() for p in (committed / "tiny").iterdir() if p.is_file()}
        done = _script("unpack", tmp_path / "out", EDTOOL_TRAINING_DIR=committed)
        assert done.returncode != 0 and "nothing replaced" in done.stderr and "Traceback" not in done.stderr
        assert {p.name: p.read_bytes() for p in (committed / "tiny").iterdir() if p.is_file()} == before
        assert [p.name for p in committed.iterdir()] == ["tiny"]


def test_a_network_without_a_working_state_starts_from_the_kept_one_and_leaves_it_alone(tmp_path, two_steps):
    """The state git keeps (kept/<net>/) is copied to <net>/ before a stretch; training advances the copy only, and
    a network with neither is skipped instead of starting a fresh network."""
    training = tmp_path / "training"
    shutil.copytree(two_steps, training / "kept" / "tiny")
    kept = {p.name: p.read_bytes() for p in (training / "kept" / "tiny").iterdir() if p.is_file()}
    rng = np.random.default_rng(0)
    write_idx_root(tmp_path / "held", rng.integers(0, 256, (8, 28, 28)), rng.integers(0, 10, 8), split="test")
    done = _script("run", 1, 0, EDTOOL_CAMPAIGN_NETS="tiny absent", EDTOOL_TRAINING_DIR=training,
                   EDTOOL_HELD_OUT=tmp_path / "held", OUT=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "stopped at the time limit" in (tmp_path / "out" / "train_tiny.log").read_text()
    assert _step(training / "tiny") > 2
    assert {p.name: p.read_bytes() for p in (training / "kept" / "tiny").iterdir() if p.is_file()} == kept
    assert "absent: no state" in done.stdout and not (training / "absent").exists()


def test_the_lease_runs_the_gpu_benchmark_within_its_time(tmp_path, tiny_checkpoints):
    """`gpu_campaign.sh run 0 BENCH_S` as the lease calls it, the benchmark alone (no network to train), on CPU
    with tiny networks: it finishes inside BENCH_S with its table in $OUT/bench_gpu.log, every file under 16 MB."""
    nets = f"--unet {tiny_checkpoints / 'tiny_unet.safetensors'} --resnet {tiny_checkpoints / 'tiny_resnet.safetensors'}"
    done = _script("run", 0, 240, EDTOOL_CAMPAIGN_NETS="", OUT=tmp_path / "out", EDTOOL_BENCH_ARGS=(
        f"{nets} --models resnet,els --probes 2 --nsteps 2 --check-steps 2 --realizations 2 --batches 1,2 --max-samples 20 "
        "--check-samples 20"))
    assert done.returncode == 0, done.stderr
    assert "bench_gpu exit 0" in done.stdout, done.stdout
    log = (tmp_path / "out" / "bench_gpu.log").read_text()
    assert "limit 180.0 s" in log and "| 2 | 2 |" in log and "bench_gpu done" in log, log
    assert all(p.stat().st_size < 16_000_000 for p in (tmp_path / "out").rglob("*") if p.is_file())
