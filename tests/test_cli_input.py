"""Hostile input next to friendly input: every case ends as one line on stderr and exit
code 2, or as the right number with a line that says what was done; never a traceback, never a
silently different number. CLI cases run through the console entry point (`cli`)."""

import struct

import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.study import compute as pipeline
from edtool.data import read_idx
from edtool.errors import EdtoolError
from edtool.jacobian.ed import exterior_derivative
from edtool.els.factory import make_machine
from edtool.networks.models import build_network
from edtool.els.schedule import resampling_note, write_scales_json
from edtool.store.run import open_run
from edtool.study.prepare import prepare
from helpers import assert_refused, cli, config, TINY

pytestmark = pytest.mark.usefixtures("tiny_networks")


COMPUTE = ["compute", "--models", "is", "--nsteps", "2", "--device", "cpu"]


@pytest.mark.parametrize("device,expected", [("meta", "--device meta holds shapes but no numbers"),
                                             ("mps", "--device mps is not available"),
                                             ("xpu", "--device xpu is not available"),
                                             ("tpu", "unknown --device 'tpu'")])
def test_unusable_devices_are_refused(device, expected, tmp_path, capsys, monkeypatch):
    args = [a if a != "cpu" else device for a in COMPUTE]
    assert_refused(cli(capsys, monkeypatch, *args, "--run-dir", tmp_path / "r"), expected)
    assert not (tmp_path / "r").exists()  # nothing stored: no run of NaN reported as a success


@pytest.mark.parametrize("size,expected", [(101, "--patch-size 101 is larger than the 32x32 images allow; patch "
                                                  "sizes go up to 31"),
                                           (33, "--patch-size 33 is larger"), (4, "--patch-size is 4"),
                                           (0, "--patch-size is 0"), (-3, "--patch-size is -3")])
def test_patch_sizes_that_do_not_fit_are_refused(size, expected, tmp_path, capsys, monkeypatch):
    result = cli(capsys, monkeypatch, *COMPUTE, "--models", "is,els", "--patch-size", size, "--run-dir", tmp_path)
    assert_refused(result, expected)


def test_machines_refuse_windows_that_change_nothing_but_the_cost():
    """The library takes windows up to 2 * side - 1 (each then covers the whole image; tests/els/test_machine.py
    checks those against brute force); the commands up to the image side."""
    images = torch.zeros(3, 1, 8, 12)
    assert make_machine("els-borders", images, patch_size=23).patch_sizes == [23]
    with pytest.raises(EdtoolError, match="patch size 25 is larger than the 8x12 images allow; patch sizes go up "
                                          "to 23"):
        make_machine("els-borders", images, scales=[3, 25])


def test_environment_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("EDTOOL_CACHE", str(afile))
    assert_refused(cli(capsys, monkeypatch, *COMPUTE), f"EDTOOL_CACHE={afile} is a file, not a folder")
    assert_refused(cli(capsys, monkeypatch, "status"), "is a file, not a folder")
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_refused(cli(capsys, monkeypatch, *COMPUTE, "--run-dir", tmp_path / "w"),
                   "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not", "torchrun")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert_refused(cli(capsys, monkeypatch, *COMPUTE, "--run-dir", tmp_path / "w"), "WORLD_SIZE='two'")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: runs
    code, out, err = cli(capsys, monkeypatch, *COMPUTE, "--run-dir", tmp_path / "w", "--quiet")
    assert code == 0, err


def test_a_network_whose_padding_no_machine_models(tmp_path, capsys, monkeypatch):
    """A reflect-padded network runs; `els` (which follows the padding) is refused naming the fix."""
    kw = {**TINY["resnet"], "mode": "reflect"}
    torch.manual_seed(0)
    path = checkpoints.save(tmp_path / "reflect_resnet", build_network("resnet", **kw), {
        "arch": "resnet", "arch_kwargs": kw, "dataset": "mnist5k", "image_shape": [1, 32, 32],
        "conditional": False, "num_classes": None, "padding": "reflect"})
    result = cli(capsys, monkeypatch, *COMPUTE, "--models", "resnet,els", "--resnet", path, "--run-dir", tmp_path / "r")
    assert_refused(result, f"{path} has padding 'reflect'", "els-borders or els-circular")
    code, out, err = cli(capsys, monkeypatch, *COMPUTE, "--models", "resnet,is", "--resnet", path, "--run-dir",
                         tmp_path / "r", "--quiet")
    assert code == 0, err


def test_an_idx_header_whose_sizes_overflow_is_refused(tmp_path):
    """2^31 * 2^31 * 4 = 2^64 wraps to 0 in int64: an empty file passed the size checks, then crashed."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I3I", 0x0803, 2**31, 2**31, 4))
    with pytest.raises(EdtoolError, match=f"truncated: its header promises {2**64} bytes of data"):
        read_idx(path, 3)
    path.write_bytes(struct.pack(">I3I", 0x0803, 2, 2, 2) + bytes(8))  # the friendly twin
    assert read_idx(path, 3).shape == (2, 2, 2)


# ------------------------------------------------------------------ numbers that are not what was asked for


def test_rtol_missed_at_the_probe_cap_is_said_and_stored(tmp_path, capsys, monkeypatch):
    """--rtol below what the cap allows: a warning line naming the worst point; the store's
    ed_stderr / ed_fro is the achieved relative error (above the target)."""
    monkeypatch.setattr(pipeline, "RTOL_MAX_PROBES", 4)
    args = ["compute", "--models", "resnet", "--estimator", "hutchinson", "--probes", "2", "--nsteps", "2",
            "--device", "cpu", "--quiet"]
    code, out, err = cli(capsys, monkeypatch, *args, "--rtol", "1e-6", "--run-dir", tmp_path / "tight")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "not reached" in line]
    assert len(warning) == 1 and "--rtol 1e-06 not reached at 2 (realization, model, step) points" in warning[0]
    assert "probe cap of 4" in warning[0]
    run = open_run(tmp_path / "tight")
    achieved = run.read("ed_stderr", "resnet") / run.read("ed_fro", "resnet")
    assert (achieved > 1e-6).all() and f"{achieved.max():.3g}" in warning[0]
    code, out, err = cli(capsys, monkeypatch, *args, "--rtol", "0.99", "--run-dir", tmp_path / "loose")
    assert code == 0 and "not reached" not in err


def test_a_schedule_of_another_length_is_resampled_with_a_note(tmp_path):
    assert resampling_note("els", [3] * 20, 20) is None
    note = resampling_note("els", [3] * 20, 10, "paper.pt")
    assert note == ("els: paper.pt has 20 entries for 10 steps; each step uses the entry for its time t "
                    "(entries 2, 4, 6, 8, 10, 12, 14, 16, 18, 20 of 1..20)")
    odd = resampling_note("els", [3] * 37, 2, "x.json")
    assert "(entries 19, 37 of 1..37); 37 is no multiple of 2" in odd and "calibrate with --nsteps 2" in odd
    path = write_scales_json(tmp_path / "s.json", [3] * 20)
    study = prepare(config(tmp_path / "r", models=["els"], scales=str(path), nsteps=10))
    assert any("has 20 entries for 10 steps" in n for n in study.notes)
    assert study.config["models"]["els"]["scales"] == [3] * 20  # the file as it is, recorded
    # a length that is no multiple of the steps would run the machine between its calibrated times:
    # refused in one line, naming the lengths that would work
    path = write_scales_json(tmp_path / "odd.json", [3] * 37)
    with pytest.raises(EdtoolError, match=r"37 patch sizes.*--nsteps 2: use --nsteps 1, 37"):
        prepare(config(tmp_path / "r2", models=["els"], scales=str(path), nsteps=2))


def test_rtol_met_is_recorded_by_the_estimator():
    A = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="rtol 1e-09 not reached"):
        res = exterior_derivative(lambda v: v @ A.T, x, method="hutchinson", probes=4, rtol=1e-9, max_probes=8,
                                  dtype=torch.float64)
    assert res.probes == 8 and not res.rtol_met.any()
    assert np.all((res.ed_stderr / res.ed_fro).numpy() > 1e-9)


# ------------------------------------------------------------------ files edtool did not write


def test_analyze_never_replaces_the_seed_tools_figures(tmp_path, capsys, monkeypatch):
    """A figure of the same name that edtool did not write is refused before anything is computed;
    edtool's own figures are replaced on a rerun; --overwrite replaces the foreign one."""
    folder = tmp_path / "out" / "mnist5k" / "single_realization"
    folder.mkdir(parents=True)
    theirs = folder / "asym_vs_time.png"
    theirs.write_bytes(b"the seed tool's figure")
    args = ["analyze", "--output_dir", tmp_path / "out", "--models", "resnet,is", "--nsteps", 2, "--device", "cpu",
            "--quiet"]
    assert_refused(cli(capsys, monkeypatch, *args), f"{theirs} exists and edtool did not write it", "--overwrite")
    assert theirs.read_bytes() == b"the seed tool's figure" and not (folder / "ed.zarr").exists()

    code, out, err = cli(capsys, monkeypatch, *args, "--overwrite")
    assert code == 0, err
    assert theirs.read_bytes().startswith(b"\x89PNG")
    code, out, err = cli(capsys, monkeypatch, "plot", folder)  # its own figures: replaced without a word
    assert code == 0 and str(theirs) in out, err
    theirs.write_bytes(b"edited by hand")
    assert_refused(cli(capsys, monkeypatch, "plot", folder), str(theirs))


def test_a_kill_during_plot_leaves_the_good_figure(tmp_path, capsys, monkeypatch):
    """The figure is written to a temporary name and renamed: a crash (or kill) mid-write leaves the
    previous figure whole and no half file under the real name."""
    from matplotlib.figure import Figure

    code, out, err = cli(capsys, monkeypatch, *COMPUTE, "--models", "is", "--run-dir", tmp_path / "r", "--quiet")
    assert code == 0, err
    code, out, err = cli(capsys, monkeypatch, "plot", tmp_path / "r")
    good = {p.name: p.read_bytes() for p in (tmp_path / "r").glob("*.png")}
    assert "ed_analysis_single.png" in good  # the first one plot writes

    def dies_mid_write(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", dies_mid_write)
    code, out, err = cli(capsys, monkeypatch, "plot", tmp_path / "r")
    assert code == 130
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").glob("*.png")} == good
    assert not [p.name for p in (tmp_path / "r").iterdir() if ".tmp" in p.name]
