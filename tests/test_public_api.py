"""The public API (edtool/__init__.py, docs/python-api.md): every name `import edtool` offers is the object
in its home module, loaded on first use so that `import edtool` loads no torch, and the calls the page shows
give the numbers an independent computation gives. tests/test_docs.py runs the page's own blocks."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edtool

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", edtool.__all__)
def test_every_public_name_is_the_object_of_its_home(name):
    namespace = {}
    exec(f"from edtool import {name}", namespace)
    if name == "__version__":
        assert namespace[name] == edtool.__version__
        return
    home = importlib.import_module(edtool._HOMES[name])
    assert namespace[name] is getattr(home, name) is getattr(edtool, name)
    assert name in dir(edtool)


def test_all_names_the_exports_and_nothing_else():
    assert edtool.__all__ == ["__version__", *edtool._HOMES]


def test_the_page_lists_every_public_name():
    page = (REPO / "docs" / "python-api.md").read_text()
    assert [name for name in edtool._HOMES if f"`{name}" not in page] == []
    assert [home for home in set(edtool._HOMES.values()) if f"`{home}`" not in page] == []


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        getattr(edtool, "nonexistent")
    assert not hasattr(edtool, "_nonexistent")


def test_import_edtool_loads_no_torch():
    """`import edtool` and its settings stay light (the command line's --help and --version need no torch);
    a name that needs torch brings it."""
    code = ("import sys, edtool; edtool.ComputeConfig; light = 'torch' not in sys.modules; "
            "edtool.exterior_derivative; print(light, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_exterior_derivative_of_a_linear_field_is_its_antisymmetric_part():
    """f(x) = A x sample by sample: ||J - J^T||_F = ||A - A^T||_F and ||J||_F = ||A||_F, exactly."""
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    res = edtool.exterior_derivative(lambda y: (y.reshape(3, 4) @ A.T).reshape(y.shape), x, method="exact")
    assert torch.allclose(res.ed_fro, torch.linalg.matrix_norm(A - A.T).expand(3))
    assert torch.allclose(res.jac_fro, torch.linalg.matrix_norm(A).expand(3))
    assert torch.allclose(res.asym, res.ed_fro / (2 * res.jac_fro))


def test_a_machines_closed_form_is_its_autograd_jacobian():
    """What the page does with an ELS machine, on 8x8 images: the closed form `auto` takes equals the exact
    Jacobian autograd computes through the machine's score."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (12,), generator=g)
    t = 0.5
    x = edtool.add_noise(images[:2], torch.tensor([t, t]), torch.randn(2, 1, 8, 8, generator=g))
    els = edtool.make_machine("els-borders", images, labels, patch_size=3)
    closed = edtool.exterior_derivative(els.field(t), x)
    autograd = edtool.exterior_derivative(lambda y: els.score(t, y), x, method="exact")
    assert closed.method == "analytic" and autograd.method == "exact"
    assert torch.allclose(closed.ed_fro, autograd.ed_fro, rtol=1e-4)
    assert torch.allclose(closed.jac_fro, autograd.jac_fro, rtol=1e-4)


def test_load_reads_the_shipped_network_and_refuses_a_missing_file(tmp_path):
    net = edtool.load(edtool.shipped_dir() / "mnist5k_resnet.safetensors")
    assert net.manifest["arch"] == "resnet" and net.manifest["image_shape"] == [1, 32, 32]
    x = torch.zeros(1, 1, 32, 32)
    assert net.score(0.5, x).shape == x.shape
    with pytest.raises(edtool.EdtoolError, match="does not exist"):
        edtool.load(tmp_path / "none.safetensors")
