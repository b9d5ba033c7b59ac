"""compute with what users put in --models beyond the defaults of tests/study/test_compute.py: ELS machines and their
scales, several realizations per batch, conditional networks with --label, circular padding."""

import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.study import compute as pipeline
from edtool.data import load_dataset
from edtool.diffusion import ddim_sample, initial_noise, seed_labels, timesteps
from edtool.jacobian.ed import exterior_derivative
from edtool.els.factory import make_machine
from edtool.model import ScoreModel
from edtool.networks.models import build_network
from edtool.study.compute import compute, probe_seed
from edtool.els.schedule import write_scales_json
from edtool.networks.discovery import scales_path
from edtool.store.layout import STEP_ARRAYS
from edtool.store.run import open_run
from edtool.study.prepare import prepare
from helpers import config

pytestmark = pytest.mark.usefixtures("tiny_networks")


def _tiny(path, **kw):
    """A random-weight ResNet for mnist5k; kw: conditional=True and/or mode="circular"."""
    torch.manual_seed(3)
    arch_kw = {**dict(in_channels=1, out_channels=1, mode="zeros", emb_dim=16, num_layers=1), **kw}
    if arch_kw.get("conditional"):
        arch_kw["num_classes"] = 10
    return checkpoints.save(path, build_network("resnet", **arch_kw), {
        "arch": "resnet", "arch_kwargs": arch_kw, "dataset": "mnist5k", "image_shape": [1, 32, 32],
        "conditional": bool(arch_kw.get("conditional")), "num_classes": arch_kw.get("num_classes"),
        "padding": arch_kw["mode"]})


class _Recorder(ScoreModel):
    """Wraps a network; records the batch size and labels of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.conditional, self.manifest = inner.name, inner.conditional, inner.manifest

    def to(self, device=None, dtype=None):
        self.inner.to(device, dtype)
        return self

    def eps(self, t, x, label=None):
        self.calls.append((x.shape[0], None if label is None else label.tolist()))
        return self.inner.eps(t, x, label)

    def score(self, t, x, label=None):
        self.calls.append((x.shape[0], None if label is None else label.tolist()))
        return self.inner.score(t, x, label)


def _recording(monkeypatch, name):
    recorders = {}
    real_prepare = pipeline.prepare

    def prepare(c):
        study = real_prepare(c)
        study.models[name] = recorders[name] = _Recorder(study.models[name])
        return study

    monkeypatch.setattr(pipeline, "prepare", prepare)
    return recorders


# ------------------------------------------------------------------ ELS and its scales


def _els_at_the_resnet_points(run, schedule_entry_k, nsteps, seed=0):
    """The els-borders machine's exact ED at the tiny ResNet's DDIM points, with patch size
    schedule_entry_k[j] at step j: what a shared-trajectory run must have stored for els."""
    net = checkpoints.load(open_run(run).config["models"]["resnet"]["path"])
    images, labels = load_dataset("mnist5k")
    points = []
    ddim_sample(lambda t, x: net.eps(t, x), initial_noise(seed, (1, 1, 32, 32)), timesteps(nsteps),
                on_step=lambda j, t, x: points.append((t, x)))
    out = []
    for (t, x), k in zip(points, schedule_entry_k):
        machine = make_machine("els-borders", images, labels, patch_size=k)
        out.append(float(exterior_derivative(machine.field(torch.full((1,), t, dtype=torch.float64)), x).ed_fro[0]))
    return np.float32(out)


@pytest.mark.slow  # the ELS machine over 5,000 digits: minutes on 2 cores
def test_els_uses_the_calibration_beside_the_resnet_one_patch_size_per_step(tmp_path, tiny_checkpoints):
    """A scales JSON beside the ResNet checkpoint is found and used, entry j at t = (j + 1) / N: on the
    2-step grid, t = 1 takes entry 1 (k = 5) and t = 1/2 entry 0 (k = 3), from the float64 grid times."""
    ckpt = _tiny(tmp_path / "net" / "tiny_resnet")
    found = write_scales_json(scales_path(ckpt, "els-borders"), [3, 5])
    summary = compute(config(tmp_path / "run", models=["resnet", "els"], resnet=str(ckpt), realizations=1,
                             trajectory="shared", reference="resnet"))
    run = open_run(tmp_path / "run")
    assert run.config["models"]["els"]["scales"] == [3, 5]
    assert run.config["models"]["els"]["scales_file"] == str(found)
    assert not any("fixed patch size" in n for n in summary["notes"])
    expected = _els_at_the_resnet_points(tmp_path / "run", [5, 3], nsteps=2)
    np.testing.assert_allclose(run.read("ed_fro", "els")[0], expected, rtol=1e-5)


def test_els_scales_flag_wins_and_without_scales_a_fixed_size_with_a_note(tmp_path, tiny_checkpoints, monkeypatch):
    """What compute records and tells about the els machine's schedule (prepare: nothing is evaluated)."""
    ckpt = _tiny(tmp_path / "net" / "tiny_resnet")
    beside = write_scales_json(scales_path(ckpt, "els-borders"), [3, 5])
    explicit = write_scales_json(tmp_path / "mine.json", [1, 1])
    study = prepare(config(None, models=["els"], resnet=str(ckpt), scales=str(explicit)))
    assert study.config["models"]["els"]["scales"] == [1, 1]
    assert study.config["models"]["els"]["scales_file"] == str(explicit)
    study = prepare(config(None, models=["els"], resnet=str(ckpt)))
    assert study.config["models"]["els"]["scales_file"] == str(beside) and not study.notes
    assert study.models["els"].patch_sizes == [3, 5]

    monkeypatch.chdir(tmp_path)  # no ./checkpoints calibration here either
    bare = _tiny(tmp_path / "bare" / "tiny_resnet")
    study = prepare(config(None, models=["els"], resnet=str(bare), patch_size=3))
    assert study.config["models"]["els"]["machine"] == "els-borders"
    assert study.config["models"]["els"]["patch_size"] == 3 and "scales" not in study.config["models"]["els"]
    assert study.notes == ["els: no calibrated scales found, using a fixed patch size 3 (run `edtool calibrate` "
                           "or pass --scales)"]


def test_circular_padding_makes_els_the_circular_machine(tmp_path, tiny_checkpoints):
    ckpt = _tiny(tmp_path / "tiny_resnet_circular", mode="circular")
    study = prepare(config(None, models=["resnet", "els"], resnet=str(ckpt), patch_size=3))
    assert study.config["models"]["els"]["machine"] == "els-circular"
    assert study.models["els"].name == "els-circular" and study.models["els"].padding == "circular"


# ------------------------------------------------------------------ batches, labels


def test_batch_of_three_really_batched_matches_batch_one_with_each_rows_seed_label_and_probes(
        tmp_path, tiny_checkpoints, monkeypatch):
    """--batch 3 runs the conditional network on 3 realizations at once (each with its own label) and
    stores what --batch 1 stores, to float32 rounding (README); seeds, labels and Hutchinson probe
    seeds follow the realization, not its place in the batch."""
    ckpt = _tiny(tmp_path / "tiny_resnet_conditional", conditional=True)
    kw = dict(models=["resnet"], resnet=str(ckpt), realizations=3, estimator="hutchinson", probes=3)
    recorders = _recording(monkeypatch, "resnet")
    compute(config(tmp_path / "b3", batch=3, **kw))
    batched = recorders["resnet"].calls
    compute(config(tmp_path / "b1", batch=1, **kw))
    single = recorders["resnet"].calls
    three, one = open_run(tmp_path / "b3"), open_run(tmp_path / "b1")
    drawn = seed_labels([0, 1, 2], torch.arange(10), None, True).tolist()
    assert len(set(drawn)) > 1  # the rows do differ in label
    assert max(n for n, _ in batched) == 3 and batched[0] == (3, drawn)
    assert max(n for n, _ in single) == 1
    np.testing.assert_array_equal(three.labels, drawn)
    np.testing.assert_array_equal(three.seeds, one.seeds)
    for name in STEP_ARRAYS:
        np.testing.assert_allclose(three.read(name), one.read(name), rtol=1e-4, atol=1e-6, err_msg=name)
    # the image after 20 float32 steps: batched kernels' rounding grows to ~2e-4 of pixel values ~1 on some
    # CPUs (AVX-512 MKL paths); another seed or label moves pixels by 1e-1 and more
    np.testing.assert_allclose(three.read("final"), one.read("final"), rtol=1e-4, atol=5e-4, err_msg="final")
    assert probe_seed(0, 1, "resnet", 0) != probe_seed(0, 2, "resnet", 0)  # what makes row order matter


def test_label_reaches_a_conditional_network_through_compute(tmp_path, tiny_checkpoints, monkeypatch):
    ckpt = _tiny(tmp_path / "tiny_resnet_conditional", conditional=True)
    recorders = _recording(monkeypatch, "resnet")
    compute(config(tmp_path / "seven", models=["resnet"], resnet=str(ckpt), label=7, batch=2))
    assert {tuple(lab) for _, lab in recorders["resnet"].calls} == {(7, 7)}
    compute(config(tmp_path / "two", models=["resnet"], resnet=str(ckpt), label=2, batch=2))
    seven, two = open_run(tmp_path / "seven"), open_run(tmp_path / "two")
    assert seven.labels.tolist() == [7, 7] and two.labels.tolist() == [2, 2]
    assert not np.array_equal(seven.read("final"), two.read("final"))  # the label changes the path
