"""Helpers shared by the test modules (plain functions and constants; the fixtures are tests/conftest.py's):
running edtool (in this process, or the console script in a real process), tiny networks and stores,
small datasets in the files' own formats, and a machine dressed as a network."""

import contextlib
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edtool.cli import main
from edtool.networks import checkpoints
from edtool.networks.models import build_network
from edtool.store.layout import STEP_ARRAYS
from edtool.store.run import create_run, open_run
from edtool.store.runstore import RunStore
from edtool.config import ComputeConfig
from edtool.model import ScoreModel

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDTOOL_SHARED", REPO.parent / "shared"))  # ../shared: reference files and data


def console_script() -> list:
    """The installed `edtool` entry point (the file pip wrote), else `python -m edtool`."""
    script = Path(sys.executable).parent / "edtool"
    if script.exists():
        return [str(script)]
    found = shutil.which("edtool")
    return [found] if found else [sys.executable, "-m", "edtool"]


def edtool(*args, cwd=None, env=None, timeout=120, exe=None) -> subprocess.CompletedProcess:
    """Run the console script with ARGS; PYTHONPATH keeps it on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*(exe or console_script()), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def edtool_in_process(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`edtool ARGS` through the console entry point in this process, as `edtool` (above) runs it in a new
    one: in folder `cwd`, with `env` added to the environment, stdout and stderr captured, the exit code its
    SystemExit carries. For every test where a new process would show nothing more (no signals, no fresh
    interpreter's imports, no output from outside Python)."""
    argv, folder, environ = sys.argv, os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = ["edtool", *map(str, args)]
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = argv
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["edtool", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *expected):
    """Exit code 2, exactly one line on stderr naming the problem, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("edtool: error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for text in expected:
        assert text.lower() in lines[0].lower(), (text, lines[0])


def assert_refused(result, *expected):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("edtool: error:"), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


ARRAYS = ("time", "seed", "label", *STEP_ARRAYS, "done", "final")


TINY = {"resnet": dict(in_channels=1, out_channels=1, mode="zeros", emb_dim=16, num_layers=1),
        "unet": dict(fsizes=[8, 16], emb_dim=16)}


PNG = b"\x89PNG\r\n\x1a\n"


def save_tiny(path, arch: str, seed: int = 0) -> Path:
    """A small random-weight network for mnist5k (1x32x32) in our checkpoint format."""
    torch.manual_seed(seed)
    kw = TINY[arch]
    return checkpoints.save(path, build_network(arch, **kw), {
        "arch": arch, "arch_kwargs": kw, "dataset": "mnist5k", "image_shape": [1, 32, 32],
        "conditional": False, "num_classes": None, "padding": "zeros"})


def config(run_dir, **kw) -> ComputeConfig:
    base = dict(models=["resnet", "is"], nsteps=2, realizations=2, probes=2, device="cpu",
                run_dir=None if run_dir is None else str(run_dir))
    return ComputeConfig(**{**base, **kw})


def cli(capsys, monkeypatch, *args):
    """Run `edtool ARGS` in this process through the console entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edtool", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env() -> dict:
    """Environment for a real `python -m edtool` process: same thread count, cache and checkpoints."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


def wait_for_done_cell(run_dir, proc, timeout=120.0) -> np.ndarray:
    """Poll the store's `done` array until a first cell is finished; the process must still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process ended early ({proc.returncode}): {proc.stderr.read()}"
        if (Path(str(run_dir).replace("file://", "")) / "ed.zarr" / "zarr.json").exists():
            done = open_run(run_dir).done_mask()
            if done.any():
                return done
        time.sleep(0.02)
    raise AssertionError("no cell finished in time")


def assert_same_arrays(a, b, names=ARRAYS):
    """Every array of two runs equal bit for bit (NaN where NaN)."""
    a = open_run(a) if not hasattr(a, "read") else a
    b = open_run(b) if not hasattr(b, "read") else b
    assert a.models == b.models and a.config == b.config
    for name in names:
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


def snapshot(folder) -> dict:
    """Every file under a folder with its bytes: to show that a refusal changed nothing."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


MODELS = ["unet", "els"]


def filled(location, n_real=4, nsteps=3, maps=False, skip=(), seed=0) -> RunStore:
    """A run of 1x4x4 images with every cell but `skip` written from a seeded generator."""
    run = create_run(location, {"estimator": "exact"}, MODELS, list(range(n_real)), [-1] * n_real, nsteps,
                     (1, 4, 4), maps=maps)
    rng = np.random.default_rng(seed)
    for r in range(n_real):
        for m in range(len(MODELS)):
            vals = dict(ed_fro=rng.random(nsteps) + 0.1, jac_fro=rng.random(nsteps) + 1, asym=rng.random(nsteps) / 2,
                        ed_stderr=rng.random(nsteps) / 10, final=rng.uniform(-1, 1, (1, 4, 4)),
                        curl_map=rng.random((nsteps, 4, 4)) if maps else None)
            if (r, m) not in skip:
                run.write_cell(r, m, **vals)
    return run


def one_line(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    return len(lines) == 1 and "Traceback" not in err


def make_legacy(location):
    """What edtool wrote before digests: no `integrity` record, no cell_digest array, no chunk for an
    array equal to its fill value (labels all -1)."""
    store = Path(location) / "ed.zarr"
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["integrity"]
    meta["consolidated_metadata"]["metadata"].pop("cell_digest", None)
    (store / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(store / "cell_digest")
    (store / "label" / "c" / "0").unlink()


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An unsigned-byte IDX file written independently of edtool."""
    magic = 0x0800 + array.ndim if magic is None else magic
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_root(root: Path, images: np.ndarray, labels: np.ndarray, split="train", gz=True,
                   folder="MNIST") -> tuple[Path, Path]:
    """Lay out an IDX pair as ROOT/<folder>/raw/<prefix>-images-idx3-ubyte[.gz]."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        path = raw / (f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
        blob = idx_bytes(arr)
        path.write_bytes(gzip.compress(blob) if gz else blob)
        paths.append(path)
    return paths[0], paths[1]


def small_mnist(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def bilinear_numpy(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize with edge clamping, written out by hand (the reference)."""
    h, w = img.shape

    def taps(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def toy_images(n=24, size=8, seed=0):
    """Smooth random blobs in [-1, 1], (n, 1, size, size) float32, labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size + 2, size + 2, generator=g), 3, stride=1)
    x = (x - x.amin((1, 2, 3), keepdim=True)) / (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    return (2 * x - 1).float(), torch.arange(n) % 3


class MachineNetwork(ScoreModel):
    """A machine dressed as a network: its schedule read at the exact grid times i/N."""

    def __init__(self, machine, nsteps, conditional=False):
        self.machine, self.nsteps, self.conditional = machine, nsteps, conditional
        self.name = "machine-network"
        self.manifest = {"arch": self.name, "image_shape": list(machine.images.shape[1:]), "padding": "zeros",
                         "num_classes": int(machine.labels.max()) + 1 if conditional else None}

    def eps(self, t, x, label=None):
        return self.machine.eps(t, x, label if self.conditional else None).to(x.dtype)

    def score(self, t, x, label=None):
        return self.machine.score(t, x, label if self.conditional else None).to(x.dtype)

    def to(self, device=None, dtype=None):
        self.machine.to(device, dtype)
        return self
