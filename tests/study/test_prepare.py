"""edtool.study.prepare: what a run of models loads and the labels it measures with.

A run of `py:` models alone never imports the ELS engine, kernel or machine modules (they are imported where a
machine is asked for), and still measures the right numbers.

Colour and labels end to end: a CIFAR-10 root in the real batch format, tiny 3-channel
class-conditional UNet/ResNet checkpoints, compute (unet, resnet, els with class-conditional
candidates), aggregate and plot through the console entry point; the stored labels are the ones the
models used (checked against independent recomputations), the figures draw colour images. A
circular-padding network makes `els` mean `els-circular` in compute, calibrate and sample. `sample
--layout paper` writes the paper's files (plain tensors) with the same numbers as edtool's layout.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from edtool import data
from edtool.networks import checkpoints
from edtool.diffusion import ddim_sample, initial_noise, seed_labels
from edtool.els.factory import make_machine
from edtool.networks.models import build_network
from edtool.store.run import open_run
from helpers import cli

CLASSES = 10


def write_cifar_root(root: Path, per_batch: int = 10) -> tuple:
    """Five training batches and a test batch in CIFAR-10's python format (dicts of a uint8 (N, 3072)
    array and a label list); every class present, images with a distinct colour per class."""
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_images, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [(len(all_labels) + k) % CLASSES for k in range(per_batch)]
        tint = np.array([[40 + 20 * c, 200 - 15 * c, 60 + (37 * c) % 190] for c in labels], dtype=np.int64)
        chw = np.clip(tint[:, :, None, None] + rng.integers(-30, 30, (per_batch, 3, 32, 32)), 0, 255).astype(np.uint8)
        batch = {"batch_label": name, "data": chw.reshape(per_batch, 3072), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        if name != "test_batch":
            all_images.append(chw)
            all_labels += labels
    return np.concatenate(all_images), np.array(all_labels)


def save_network(path: Path, arch: str, channels: int, dataset: str, conditional: bool, padding="zeros") -> Path:
    torch.manual_seed({"unet": 0, "resnet": 1}[arch])
    kw = {"unet": dict(fsizes=[8, 16], emb_dim=16), "resnet": dict(emb_dim=16, num_layers=1)}[arch]
    kw.update(in_channels=channels, out_channels=channels, mode=padding, conditional=conditional,
              num_classes=CLASSES if conditional else None)
    return checkpoints.save(path, build_network(arch, **kw), {
        "arch": arch, "arch_kwargs": kw, "dataset": dataset, "image_shape": [channels, 32, 32],
        "conditional": conditional, "num_classes": CLASSES if conditional else None, "padding": padding})


def machine_final(kind, images, noise, nsteps, patch_size=3):
    """An ELS sample from `noise` by an unconditional machine over the given images (the reference)."""
    m = make_machine(kind, images, patch_size=patch_size)
    with torch.no_grad():
        return ddim_sample(lambda t, x: m.eps(t, x).to(x.dtype), noise, nsteps)[0].numpy()


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDTOOL_CHECKPOINTS", raising=False)
    monkeypatch.setattr(data, "fetch", lambda *a, **k: (_ for _ in ()).throw(OSError("offline (test)")))
    images, labels = write_cifar_root(tmp_path / "data")
    nets = {a: save_network(tmp_path / "nets" / f"cifar_{a}", a, 3, "cifar10", True) for a in ("unet", "resnet")}
    return tmp_path / "data", images, labels, nets


def test_cifar_conditional_colour_end_to_end(tmp_path, capsys, monkeypatch, cifar):
    root, images_u8, labels_np, nets = cifar
    run = tmp_path / "run"
    code, out, err = cli(capsys, monkeypatch, "compute", "--dataset", "cifar10", "--data-root", root, "--models",
                         "unet,resnet,els", "--unet", nets["unet"], "--resnet", nets["resnet"], "--realizations", "3",
                         "--nsteps", "2", "--probes", "2", "--patch-size", "3", "--max-samples", "2", "--device",
                         "cpu", "--run-dir", run, "--quiet")
    assert code == 0, err
    store = open_run(run)
    assert store.image_shape == (3, 32, 32) and store.done_mask().all()
    assert np.isfinite(store.read("asym")).all()
    cfg = store.config
    assert cfg["models"]["els"]["machine"] == "els-borders" and cfg["max_samples"] == 2
    labels = store.labels.tolist()
    assert labels == seed_labels([0, 1, 2], None, None, True, n_classes=CLASSES).tolist()

    images, all_labels = data.load_dataset("cifar10", root=root)
    final = store.read("final")  # (R, M, C, H, W)
    for r, c in enumerate(labels):
        noise = initial_noise(r, (1, 3, 32, 32))
        # the conditional machine with label c is the plain machine over the first 2 images of class c
        want = machine_final("els-borders", images[all_labels == c][:2], noise, 2)
        np.testing.assert_allclose(final[r, 2], want, rtol=1e-4, atol=1e-5)
        net = checkpoints.load(nets["unet"])
        with torch.no_grad():
            want = ddim_sample(lambda t, x: net.eps(t, x, torch.tensor([c])), noise, 2)[0].numpy()
        np.testing.assert_allclose(final[r, 0], want, rtol=1e-5, atol=1e-6)
    assert len({tuple(np.round(final[r, 2].mean((1, 2)), 3)) for r in range(3)}) > 1  # per-class tints differ

    code, out, err = cli(capsys, monkeypatch, "aggregate", run)
    assert code == 0, err
    summary = json.loads((run / "summary_stats.json").read_text())
    assert summary["els"]["num_realizations"] == 3
    code, out, err = cli(capsys, monkeypatch, "plot", run)
    assert code == 0, err
    assert (run / "ed_analysis_single.png").exists()

    from edtool.study.figures import single_figure

    fig = single_figure(store, store.done_mask(), 0)
    shown = [im.get_array() for ax in fig.axes for im in ax.get_images()]
    assert len(shown) == 3 and all(a.shape == (32, 32, 3) for a in shown)  # RGB, not a gray channel
    # the drawn els image is the stored one, channels in R, G, B order
    np.testing.assert_allclose(np.asarray(shown[2]), np.clip((final[0, 2].transpose(1, 2, 0) + 1) / 2, 0, 1),
                               atol=1e-6)


def test_sample_paper_layout_has_the_same_numbers(tmp_path, capsys, monkeypatch, cifar):
    root, _, _, nets = cifar
    common = ["sample", "--checkpoint", nets["resnet"], "--machine", "els", "--seeds", "2", "--seed", "5",
              "--nsteps", "2", "--patch-size", "3", "--max-samples", "2", "--data-root", root, "--device", "cpu",
              "--quiet"]
    code, _, err = cli(capsys, monkeypatch, *common, "--out", tmp_path / "ours")
    assert code == 0, err
    code, _, err = cli(capsys, monkeypatch, *common, "--out", tmp_path / "paper", "--layout", "paper")
    assert code == 0, err
    paper, ours = tmp_path / "paper", tmp_path / "ours"
    assert sorted(p.name for p in (paper / "seeds").iterdir()) == ["0000.pt", "0001.pt"]
    labels = seed_labels([5, 6], None, None, True, n_classes=CLASSES)
    for i, s in enumerate((5, 6)):
        for folder in ("seeds", "els_outputs", "labels", "network_outputs", "is_outputs"):
            t = torch.load(paper / folder / f"{i:04d}.pt", weights_only=True)
            assert type(t) is torch.Tensor and t.shape[0] == 1
            np.testing.assert_array_equal(t[0].numpy(), np.load(ours / folder / f"seed_{s}.npy"))
        assert torch.equal(torch.load(paper / "seeds" / f"{i:04d}.pt", weights_only=True), initial_noise(s, (1, 3, 32, 32)))
        assert int(torch.load(paper / "labels" / f"{i:04d}.pt", weights_only=True)) == int(labels[i])
    assert json.loads((paper / "r2_summary.json").read_text())["labels"] == labels.tolist()
    grid = matplotlib.image.imread(paper / "samples_grid.png")
    assert grid.ndim == 3 and np.abs(grid[..., 0] - grid[..., 1]).max() > 0.1  # a colour sheet
    code, _, err = cli(capsys, monkeypatch, *common, "--out", tmp_path / "bad", "--layout", "seed")
    assert code == 2 and "layout" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_circular_network_means_els_circular_in_compute_calibrate_and_sample(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDTOOL_CHECKPOINTS", raising=False)
    net = save_network(tmp_path / "circ_resnet", "resnet", 1, "mnist5k", False, padding="circular")
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", "resnet,els", "--resnet", net, "--nsteps", "2",
                       "--probes", "2", "--patch-size", "3", "--max-samples", "20", "--device", "cpu", "--run-dir",
                       tmp_path / "run", "--quiet")
    assert code == 0, err
    store = open_run(tmp_path / "run")
    assert store.config["models"]["els"]["machine"] == "els-circular"
    images, _ = data.load_dataset("mnist5k")
    want = machine_final("els-circular", images[:20], initial_noise(0, (1, 1, 32, 32)), 2)
    np.testing.assert_allclose(store.read("final")[0, 1], want, rtol=1e-4, atol=1e-5)

    code, out, err = cli(capsys, monkeypatch, "calibrate", "--checkpoint", net, "--machine", "els", "--sizes", "3,5",
                         "--seeds", "1", "--nsteps", "2", "--max-samples", "20", "--device", "cpu", "--quiet",
                         "--out", tmp_path / "circ_scales.json")
    assert code == 0, err
    assert json.loads((tmp_path / "circ_scales.json").read_text())["machine"] == "els-circular"

    code, out, err = cli(capsys, monkeypatch, "sample", "--checkpoint", net, "--machine", "els", "--seeds", "1",
                         "--nsteps", "2", "--scales", tmp_path / "circ_scales.json", "--max-samples", "20", "--out",
                         tmp_path / "s", "--device", "cpu", "--quiet", "--no-baseline")
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "r2_summary.json").read_text())
    assert list(summary["machines"]) == ["els-circular"]
    assert (tmp_path / "s" / "els-circular_outputs").is_dir()


ELS_MODULES = ("edtool.els.engine", "edtool.els.kernel", "edtool.els.machine")

# s(x) = -x + (x shifted one pixel along the rows) / 2 on 1x4x4 images: J = -I + P/2 with P a permutation
# whose transpose (the shift the other way) shares no entry with it, so ||J - J^T||_F = sqrt(2 * 16) / 2.
LINEAR_MODULE = '''
import torch


class Shift:
    image_shape = (1, 4, 4)

    def score(self, t, x, label=None):
        return -x + 0.5 * torch.roll(x, 1, dims=-1)
'''

SCRIPT = """
import json, sys
from edtool.config import ComputeConfig
{body}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("edtool.els."))))
"""


def _els_modules_loaded(tmp_path, body: str) -> list:
    """The edtool.els modules a fresh interpreter has loaded after running `body`."""
    (tmp_path / "shiftmod.py").write_text(LINEAR_MODULE)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(body=textwrap.dedent(body))], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1",
                               "EDTOOL_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_py_only_compute_does_not_import_the_els_engine(tmp_path):
    """compute() of a `py:` model: the exact ED of its linear field, without loading the ELS engine."""
    loaded = _els_modules_loaded(tmp_path, f"""
        from edtool.study.compute import compute
        from edtool.store.run import open_run
        summary = compute(ComputeConfig(models=["shift=py:shiftmod:Shift"], nsteps=2, realizations=2,
                                        estimator="exact", run_dir={str(tmp_path / "run")!r}, device="cpu"))
        ed = open_run(summary["location"]).read("ed_fro", "shift")
        assert abs(ed - 32 ** 0.5 / 2).max() < 1e-5, ed
    """)
    assert not set(ELS_MODULES) & set(loaded), loaded


def test_a_machine_run_imports_the_els_engine_where_it_builds_the_machine(tmp_path):
    """The control: prepare() of the `is` machine loads the modules the test above finds absent."""
    loaded = _els_modules_loaded(tmp_path, """
        from edtool.study.prepare import prepare
        prepared = prepare(ComputeConfig(models=["is"], nsteps=2, realizations=1, max_samples=20, device="cpu"))
        assert prepared.config["models"]["is"]["machine"] == "is"
    """)
    assert set(ELS_MODULES) <= set(loaded), loaded


def test_extra_arrays_follow_the_settings_and_are_the_results_compute_copies():
    """extra_array_dims picks the store layout's arrays by the settings a run records, and every per-cell array
    name is a field of the result compute copies it from (ed: EDResult; locality, alignment: their results),
    so a name is written once, in edtool.store.layout."""
    from dataclasses import fields

    from edtool.jacobian.ed import EDResult
    from edtool.jacobian.locality import AlignmentResult, LocalityResult
    from edtool.store.layout import ALIGN_ARRAYS, LOCALITY_ARRAYS, POINT_ARRAYS, STEP_ARRAYS
    from edtool.study.prepare import extra_array_dims

    assert extra_array_dims({}) == {}
    assert extra_array_dims({"locality": {"radius": 3}}) == LOCALITY_ARRAYS
    assert extra_array_dims({"align": {"reference": "unet"}, "save_points": True}) == {**ALIGN_ARRAYS, **POINT_ARRAYS}
    for names, result in ((STEP_ARRAYS, EDResult), (LOCALITY_ARRAYS, LocalityResult), (ALIGN_ARRAYS, AlignmentResult)):
        assert set(names) <= {f.name for f in fields(result)}, result
