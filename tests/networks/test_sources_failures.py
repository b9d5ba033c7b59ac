"""`--models LABEL=SOURCE` as a user meets it when something is wrong, through the console entry point.

A checkpoint path works like `--unet`; a bad checkpoint, a diffusers config that is not what diffusers
writes, or a `py:` module whose own code fails is one line naming the source (exit 2), never edtool's
internal error; a `py:` model that fails at a point (raises, or returns no score of x's shape) is that
cell's NaN and a warning, and the run goes on. No file is ever unpickled into running code.
"""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.networks.models import build_network
from edtool.store.run import open_run
from helpers import assert_one_line_error, edtool_in_process, REPO

TINY = ["--nsteps", "2", "--realizations", "1", "--device", "cpu", "--quiet"]
SHIPPED_UNET = REPO / "checkpoints" / "mnist5k_unet.safetensors"


# ------------------------------------------------------------------ a checkpoint path as SOURCE


def test_checkpoint_path_source_gives_the_numbers_of_the_same_network_by_name(tmp_path):
    """The documented form `--models LABEL=<checkpoint>`: the same weights as `--unet <checkpoint>`, so the
    same numbers at every step (both exact, both on their own, identical, path). A tiny UNet of 8 x 8 images
    keeps the exact Jacobian cheap."""
    torch.manual_seed(0)
    kw = dict(fsizes=[8, 16], emb_dim=16)
    unet = checkpoints.save(tmp_path / "small_unet", build_network("unet", **kw), {
        "arch": "unet", "arch_kwargs": kw, "dataset": "mnist5k", "image_shape": [1, 8, 8], "conditional": False,
        "num_classes": None, "padding": "zeros"})
    proc = edtool_in_process("compute", "--models", f"mine={unet},unet", "--unet", unet, "--estimator", "exact",
                             *TINY, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = open_run(tmp_path / "run")
    assert run.done_mask().all() and run.config["models"]["mine"]["path"] == str(unet)
    mine, unet = run.read("ed_fro", "mine")[0], run.read("ed_fro", "unet")[0]
    assert np.isfinite(mine).all() and mine == pytest.approx(unet, rel=1e-6)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist"),
    ("diffusers weights", "pass its folder"),
    ("random .pt", "not a pickled DDIM"),
    ("malicious .pt", "refusing to unpickle"),
    ("manifest a list", "not an edtool checkpoint manifest"),
    ("manifest image_shape text", "image_shape 'abc' is not [channels, height, width]"),
    ("manifest for other channels", "images of 3 channels to a network that takes 1"),
    ("manifest padding 7", "padding 7 is not one of zeros, reflect"),
])
def test_a_bad_checkpoint_source_is_one_line_and_never_runs_code(kind, expected, tmp_path):
    marker = tmp_path / "ran"
    if kind == "missing":
        path = tmp_path / "nope.safetensors"
    elif kind == "diffusers weights":
        from safetensors.torch import save_file

        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
        path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({"w": torch.zeros(2)}, str(path))
    elif kind == "random .pt":
        path = tmp_path / "random.pt"
        torch.save({"a": torch.zeros(3)}, path)
    elif kind == "malicious .pt":
        path = tmp_path / "backbone_MNIST_UNet_zeros.pt"  # a paper checkpoint's name: imported on the fly
        evil = _Evil()
        evil.marker = marker
        torch.save(evil, path)
    else:
        path = tmp_path / "m.safetensors"
        path.write_bytes(SHIPPED_UNET.read_bytes())
        manifest = json.loads(SHIPPED_UNET.with_suffix(".json").read_text())
        manifest = {"manifest a list": [1, 2], "manifest image_shape text": {**manifest, "image_shape": "abc"},
                    "manifest for other channels": {**manifest, "image_shape": [3, 32, 32]},
                    "manifest padding 7": {**manifest, "padding": 7}}[kind]
        path.with_suffix(".json").write_text(json.dumps(manifest))
    proc = edtool_in_process("compute", "--models", f"x={path}", *TINY, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert_one_line_error(proc, expected)
    assert not marker.exists()


# ------------------------------------------------------------------ py: sources whose own code fails

MODULE = """
import sys
import torch


class Good:
    image_shape = (1, 4, 4)

    def score(self, t, x, label=None):
        return -x


def factory_raises():
    raise KeyError("factory broke")


class MovingRaises(Good):
    def to(self, device=None, dtype=None):
        raise RuntimeError("cannot move")


def _with(**attrs):
    return type("Model", (Good,), attrs)


MissingWeights = _with(weights_files=["no_such_weights.bin"])
ShapeText = _with(image_shape="abc")
ClassesText = _with(num_classes="ten")
NoClasses = _with(num_classes=0)


class WrongShape(Good):
    def score(self, t, x, label=None):
        return x[..., :-1]


class Scalar(Good):
    def score(self, t, x, label=None):
        return x.sum()


class Raises(Good):
    def score(self, t, x, label=None):
        raise ValueError("inside score")


class Exits(Good):
    def score(self, t, x, label=None):
        sys.exit(0)
"""


USER_MODULES = ("usermod", "importboom", "syntaxbad", "exits", "needsdep")


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A folder of user modules on the import path (each imported afresh by the test that uses it)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in USER_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "usermod.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "importboom.py").write_text("raise ValueError('import boom')\n")
    (tmp_path / "syntaxbad.py").write_text("def broken(:\n    pass\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "needsdep.py").write_text("import no_such_dependency_xyz\n")
    return tmp_path


def _run_py(modules, entries, *args):
    return edtool_in_process("compute", "--models", entries, "--estimator", "exact", *TINY, "--run-dir",
                             modules / "run", *args, cwd=modules)


@pytest.mark.parametrize("source, expected", [
    ("py:usermod:factory_raises", ["making the model factory_raises raised KeyError", "factory broke"]),
    ("py:importboom:X", ["importing importboom raised ValueError: import boom"]),
    ("py:syntaxbad:X", ["importing syntaxbad raised SyntaxError"]),
    ("py:exits:X", ["importing exits raised SystemExit: 3"]),
    ("py:needsdep:X", ["importing needsdep raised ModuleNotFoundError", "no_such_dependency_xyz"]),
    ("py:.usermod:Good", ["full name"]),
    ("py:usermod:Good.score", ["making the model Good.score raised TypeError"]),
    ("py:usermod:MovingRaises", ["to() raised RuntimeError: cannot move"]),
    ("py:usermod:MissingWeights", ["weights_files names no_such_weights.bin"]),
    ("py:usermod:ShapeText", ["image_shape 'abc'"]),
    ("py:usermod:ClassesText", ["num_classes 'ten'"]),
    ("py:usermod:NoClasses", ["num_classes 0", "positive int"]),
])
def test_a_py_source_whose_own_code_fails_is_one_line_naming_it(modules, source, expected):
    proc = _run_py(modules, f"x={source}")
    assert_one_line_error(proc, source, *expected)
    assert "internal error" not in proc.stderr and not (modules / "run").exists()


@pytest.mark.parametrize("model, expected", [
    ("WrongShape", "got a torch.float32 tensor of shape (1, 1, 4, 3)"),
    ("Scalar", "got a torch.float32 tensor of shape ()"),
    ("Raises", "raised ValueError: inside score"),
    ("Exits", "raised SystemExit: 0"),
])
def test_a_py_model_failing_at_a_point_is_that_cells_nan_and_the_run_goes_on(modules, model, expected):
    """The contract of docs/models.md: what fails inside score (an exception, sys.exit, an output that is
    no score of x) is NaN for that cell plus a warning naming the source; the other models are measured."""
    proc = _run_py(modules, f"good=py:usermod:Good,bad=py:usermod:{model}")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if f"py:usermod:{model}" in line]
    assert len(warned) == 1 and expected in warned[0] and "stored as NaN" in warned[0], proc.stderr
    run = open_run(modules / "run")
    assert run.done_mask().all()
    assert np.isnan(run.read("ed_fro", "bad")).all()
    assert run.read("ed_fro", "good")[0] == pytest.approx([0.0, 0.0], abs=1e-6)  # s = -x: a gradient, ED 0
    assert run.read("jac_fro", "good")[0] == pytest.approx([4.0, 4.0], rel=1e-6)  # ||-I_16||_F


# ------------------------------------------------------------------ diffusers folders with malformed configs


def _diffusers_folder(tmp_path, unet=None, scheduler=None, index=None):
    """A pipeline folder with configs only (every refusal below comes before the weights are read); a dict
    changes the good config's keys, anything else replaces the whole file."""
    def merged(good, change):
        return {**good, **(change or {})} if isinstance(change, (dict, type(None))) else change

    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    files = {"model_index.json": merged({"_class_name": "DDPMPipeline"}, index),
             "unet/config.json": merged({"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1}, unet),
             "scheduler/scheduler_config.json": merged({"_class_name": "DDPMScheduler"}, scheduler)}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("change, expected", [
    (dict(unet=[1, 2, 3]), "unet/config.json holds a JSON list, not an object"),
    (dict(scheduler="x"), "scheduler_config.json holds a JSON str, not an object"),
    (dict(index=5), "model_index.json holds a JSON int"),
    (dict(unet={"sample_size": [28]}), "sample_size [28] is not an image size"),
    (dict(unet={"sample_size": "28"}), "sample_size '28' is not an image size"),
    (dict(unet={"sample_size": 0}), "sample_size 0"),
    (dict(unet={"in_channels": "x"}), "in_channels 'x' is not a positive int"),
    (dict(unet={"num_class_embeds": 0}), "num_class_embeds 0 is not the number of classes"),
    (dict(scheduler={"beta_schedule": "nonsense"}), "cannot build its DDPMScheduler"),
])
def test_a_malformed_diffusers_config_is_one_line(tmp_path, change, expected):
    pytest.importorskip("diffusers")
    folder = _diffusers_folder(tmp_path, **change)
    proc = edtool_in_process("compute", "--models", f"m={folder}", *TINY, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert_one_line_error(proc, expected)


def test_a_bin_only_diffusers_folder_loads_without_diffusers_own_error_line(tmp_path):
    """Weights as diffusion_pytorch_model.bin only (older diffusers): loaded (weights_only, no code run),
    measured, and nothing on stderr."""
    diffusers = pytest.importorskip("diffusers")
    folder = _diffusers_folder(tmp_path)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert [p.name for p in (folder / "unet").glob("*.bin")] and not list((folder / "unet").glob("*.safetensors"))
    proc = edtool_in_process("compute", "--models", f"m={folder}", "--estimator", "exact", *TINY, "--run-dir",
                             tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert np.isfinite(open_run(tmp_path / "run").read("ed_fro", "m")).all()


# ------------------------------------------------------------------ --scheduler


@pytest.mark.parametrize("models", ["unet", "x=py:usermod:Good", f"x={SHIPPED_UNET}"])
def test_scheduler_without_a_diffusers_source_is_refused(modules, models):
    proc = _run_py(modules, models, "--scheduler", modules / "no_such_scheduler")
    assert_one_line_error(proc, "--scheduler", "diffusers model folder", "drop --scheduler")


def test_scheduler_path_that_does_not_exist_is_refused(tmp_path):
    folder = _diffusers_folder(tmp_path)
    proc = edtool_in_process("compute", "--models", f"m={folder}", "--scheduler", tmp_path / "nowhere", *TINY,
                             "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert_one_line_error(proc, "--scheduler", "no such file or folder")
