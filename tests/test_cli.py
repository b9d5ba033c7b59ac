"""The commands (edtool.cli, edtool.cli_networks) against wrong or hostile input: a model is checked
against its slot, odd numbers and malformed option values are usage errors before any work, outputs are
checked before the work, files edtool did not write are never replaced, and each refusal is one line
(exit 2). Each case runs through the console entry point (`cli`, or a real `python -m edtool` process
where the process itself matters: warnings, a hang)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.networks.models import build_network
from edtool.study import compute as pipeline
from edtool.data import read_idx
from edtool.errors import EdtoolError
from edtool.jacobian.ed import exterior_derivative
from edtool.els.factory import make_machine
from edtool.els.schedule import resampling_note, write_scales_json
from edtool.store.run import open_run
from edtool.study.prepare import prepare
from helpers import (assert_one_line_error, assert_refused, cli, config, edtool_in_process, save_tiny, subprocess_env,
                     TINY)
from paper_networks import DDIM, MinimalUNet, save_paper

pytestmark = pytest.mark.usefixtures("tiny_networks")

SMALL = ["--nsteps", "2", "--device", "cpu", "--quiet"]


def save_conditional(path, classes: int = 10) -> Path:
    """A small class-conditional UNet for mnist5k in our format."""
    torch.manual_seed(3)
    kw = {**TINY["unet"], "conditional": True, "num_classes": classes}
    return checkpoints.save(path, build_network("unet", **kw), {
        "arch": "unet", "arch_kwargs": kw, "dataset": "mnist5k", "image_shape": [1, 32, 32],
        "conditional": True, "num_classes": classes, "padding": "zeros"})


# ------------------------------------------------------------------ item 3: a model against its slot


def test_a_resnet_given_to_the_unet_slot_is_refused(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    resnet = tiny_checkpoints / "tiny_resnet.safetensors"
    assert_refused(cli(capsys, monkeypatch, "compute", "--models", "unet", "--unet", resnet, *SMALL,
                       "--run-dir", tmp_path / "r"), f"--unet {resnet} holds a resnet, not a unet")
    assert not (tmp_path / "r" / "ed.zarr").exists()
    unet = tiny_checkpoints / "tiny_unet.safetensors"
    assert_refused(cli(capsys, monkeypatch, "compute", "--models", "resnet", "--resnet", unet, *SMALL,
                       "--run-dir", tmp_path / "r"), "holds a unet, not a resnet")


def test_weights_beside_another_networks_manifest_are_one_short_line(tiny_checkpoints, tmp_path, capsys,
                                                                      monkeypatch):
    """A ResNet .safetensors with a UNet's manifest: counts and one example name, not whole key lists."""
    (tmp_path / "net.safetensors").write_bytes((tiny_checkpoints / "tiny_resnet.safetensors").read_bytes())
    (tmp_path / "net.json").write_text((tiny_checkpoints / "tiny_unet.json").read_text())
    result = cli(capsys, monkeypatch, "compute", "--models", "unet", "--unet", tmp_path / "net.safetensors",
                 *SMALL, "--run-dir", tmp_path / "r")
    assert_refused(result, "does not hold the weights of the unet its manifest net.json describes",
                   "weights missing, e.g.", "unexpected weights, e.g.")
    assert len(result[2]) < 400, result[2]


def test_labels_only_on_conditional_networks(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    assert_refused(cli(capsys, monkeypatch, "compute", "--models", "unet", "--label", "3", *SMALL,
                       "--run-dir", tmp_path / "r"), "--label 3: the unet network is unconditional")
    assert not (tmp_path / "r" / "ed.zarr").exists()
    unet = tiny_checkpoints / "tiny_unet.safetensors"
    sample = ["sample", "--checkpoint", unet, "--machine", "is", "--seeds", "2", "--max-samples", "20", *SMALL]
    assert_refused(cli(capsys, monkeypatch, *sample, "--label", "11", "--out", tmp_path / "s"),
                   "--label 11: the network is unconditional")
    assert not (tmp_path / "s").exists()
    # a conditional network takes labels of its classes only (its manifest's num_classes)
    cond = save_conditional(tmp_path / "cond", classes=4)
    sample[2] = cond
    assert_refused(cli(capsys, monkeypatch, *sample, "--label", "4", "--out", tmp_path / "s"),
                   "label 4 is not a class of the data (0..3)")
    assert_refused(cli(capsys, monkeypatch, "compute", "--models", "unet", "--unet", cond, "--label", "7",
                       *SMALL, "--run-dir", tmp_path / "r"), "--label 7 is not a class of mnist5k (0..3)")
    code, _, err = cli(capsys, monkeypatch, *sample, "--label", "3", "--out", tmp_path / "s")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "r2_summary.json").read_text())["labels"] == [3, 3]


# ------------------------------------------------------------------ items 11, 12: numbers out of range


@pytest.mark.parametrize("args, expected", [
    (["compute", "--probes", "1000000000"], "--probes"),
    (["analyze", "--probes", "1000000000"], "--probes"),
    (["compute", "--probes", "1"], "--probes"),
    (["train", "--arch", "unet", "--fsizes", "8,,16"], "--fsizes must be integers separated by commas"),
    (["train", "--arch", "unet", "--fsizes", "8,16,"], "--fsizes must be integers separated by commas"),
    (["train", "--arch", "unet", "--fsizes", ",8,16"], "--fsizes must be integers separated by commas"),
    (["calibrate", "--checkpoint", "x.safetensors", "--sizes", "3,,5"], "--sizes must be integers"),
])
def test_out_of_range_or_malformed_values_are_one_line(args, expected, tmp_path):
    proc = edtool_in_process(*args, "--nsteps" if args[0] != "train" else "--steps", "2", cwd=tmp_path)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("args,words", [
    (["--nsteps", "10000000000"], "--nsteps"), (["--seed", "18446744073709551616"], "--seed"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**63 - 1), "--realizations", "2"], "seeds go from 0 to")])
def test_huge_numbers_to_compute_are_usage_errors_leaving_nothing(args, words, tmp_path, capsys, monkeypatch):
    assert_refused(cli(capsys, monkeypatch, "compute", "--models", "is", "--nsteps", "2", "--device", "cpu",
                       "--run-dir", tmp_path / "r", *args), words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,words", [
    (["--seed", "18446744073709551616"], "--seed"), (["--nsteps", "10000000000"], "--nsteps"),
    (["--batch", "0"], "--batch"), (["--batch", "-1"], "--batch"), (["--seeds", "0"], "Invalid value for '--seeds'"),
    (["--seed", str(2**63 - 1), "--seeds", "2"], "seeds go from 0 to")])
def test_odd_numbers_to_sample_are_refused_leaving_nothing(args, words, tiny_checkpoints, tmp_path, capsys,
                                                           monkeypatch):
    assert_refused(cli(capsys, monkeypatch, "sample", "--checkpoint", tiny_checkpoints / "tiny_unet.safetensors",
                       "--machine", "is", "--max-samples", "20", "--out", tmp_path / "s", "--device", "cpu", *args),
                   words)
    assert not (tmp_path / "s").exists()  # no sample_settings.json left behind


def test_calibrate_batch_zero_is_refused(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    assert_refused(cli(capsys, monkeypatch, "calibrate", "--checkpoint", tiny_checkpoints / "tiny_unet.safetensors",
                       "--batch", "0", "--out", tmp_path / "c.json"), "--batch")


@pytest.mark.parametrize("args,words", [
    (["--fsizes", "0,0"], "--fsizes needs two or more channel widths of at least 1"),
    (["--fsizes", "8"], "--fsizes needs two or more"),
    (["--fsizes", "8,16", "--emb-dim", "3"], "--emb-dim must be even and at least 4"),
    (["--fsizes", "8,8,8,8,8,8,8"], "images do not divide by 64")])
def test_unet_shapes_no_network_has_are_refused_before_training(args, words, tmp_path, capsys, monkeypatch):
    assert_refused(cli(capsys, monkeypatch, "train", "--arch", "unet", "--steps", "1", "--out", tmp_path / "t",
                       "--quiet", *args), words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,dataset,words", [
    ("backbone_MNIST_UNet_zeros.pt", "imagenet", "unknown --dataset 'imagenet'"),
    ("backbone_MNIST_UNet_zeros.pt", "cifar10", "is a network for mnist"),
    ("net.pt", "cifar10", "--dataset cifar10 has 3-channel images, net.pt takes 1-channel ones")])
def test_import_refuses_a_dataset_the_network_was_not_made_for(name, dataset, words, tmp_path, capsys, monkeypatch):

    src = save_paper(tmp_path / name, DDIM(MinimalUNet()))
    assert_refused(cli(capsys, monkeypatch, "import-checkpoint", src, "--dataset", dataset, "--out",
                       tmp_path / "out" / "i"), words)
    assert not (tmp_path / "out").exists()
    code, _, err = cli(capsys, monkeypatch, "import-checkpoint", src, "--dataset", "mnist5k", "--out",
                       tmp_path / "out" / "i")
    assert code == 0 and checkpoints.read_manifest(tmp_path / "out" / "i.json")["dataset"] == "mnist5k", err


# ------------------------------------------------------------------ item 14: a malformed --merge part


def _part(ckpt: Path, sizes, table) -> dict:
    """A calibration JSON as `edtool calibrate` writes it (the fields --merge reads), 2 steps, 1 seed."""
    return {"machine": "els-borders", "metric": "cosine", "seeds": [0], "labels": None, "nsteps": 2,
            "n_images": 20, "dataset": "mnist5k", "checkpoint_sha256": checkpoints.file_hash(ckpt),
            "sizes": sizes, "t": [0.5, 1.0], "seconds": {"total": 1.0}, "similarity_per_seed": table,
            "scales": [sizes[0]] * 2}


@pytest.mark.parametrize("field,value,words", [
    ("similarity_per_seed", "x", "its similarity_per_seed is not a table of numbers"),
    ("similarity_per_seed", [[[0.5]], [["a"]]], "its similarity_per_seed is not a table of numbers"),
    ("similarity_per_seed", [[[0.5, 0.1]], [[0.5, 0.1]]], "not a table of nsteps x seeds x sizes = 2 x 1 x 1"),
    ("sizes", "5", "its sizes is not a list of patch sizes"),
    ("seconds", {"total": "soon"}, "its seconds or t is not what calibrate writes")])
def test_a_malformed_merge_part_is_one_line(field, value, words, tiny_checkpoints, tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoints / "tiny_resnet.safetensors"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part(ckpt, [3], [[[0.9]], [[0.8]]])))
    b.write_text(json.dumps(_part(ckpt, [5], [[[0.7]], [[0.95]]])))
    merge = ["calibrate", "--checkpoint", ckpt, "--merge", f"{a},{b}"]
    code, out, err = cli(capsys, monkeypatch, *merge, "--out", tmp_path / "good.json")
    assert code == 0, err
    assert json.loads((tmp_path / "good.json").read_text())["scales"] == [3, 5]  # the better size at each step
    b.write_text(json.dumps({**_part(ckpt, [5], [[[0.7]], [[0.95]]]), field: value}))
    assert_refused(cli(capsys, monkeypatch, *merge, "--out", tmp_path / "bad.json"), f"{b}: ", words)
    assert not (tmp_path / "bad.json").exists()


# ------------------------------------------------------------------ item 15: ranks that never meet


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank,words", [("3", "RANK=3 with WORLD_SIZE=2: ranks go from 0 to 1"),
                                        ("x", "RANK='x' is not a rank number")])
def test_a_rank_number_out_of_range_stops_with_one_line(rank, words, tmp_path, capsys, monkeypatch):
    """Refused from the environment before any process group is joined: in this process (the
    console script's main(), same exit code and line)."""
    for name, value in {"RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    assert_refused(cli(capsys, monkeypatch, "compute", "--models", "is", *SMALL, "--run-dir", tmp_path / "r"), words)
    assert not (tmp_path / "r" / "ed.zarr").exists()


@pytest.mark.parametrize("rank,words", [("1", "rank 1 of 2: the other ranks did not join at 127.0.0.1:"),
                                        ("0", "rank 0 of 2: the other ranks did not join at 127.0.0.1:")])
def test_a_rank_without_its_peers_stops_with_one_line(rank, words, tmp_path):
    """A real process, which must not wait forever. Alone, rank 0 waits for rank 1 and rank 1 for rank 0's
    store; both stop after EDTOOL_RENDEZVOUS_TIMEOUT (half a second here: the wait is the same at any
    length) with one line and no torch C++ log lines."""
    env = {**subprocess_env(), "RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "EDTOOL_RENDEZVOUS_TIMEOUT": "0.5"}
    proc = subprocess.run([sys.executable, "-m", "edtool", "compute", "--models", "is", *SMALL, "--run-dir",
                           tmp_path / "r"], env=env, capture_output=True, text=True, timeout=120)
    assert_refused((proc.returncode, proc.stdout, proc.stderr), words)
    assert not (tmp_path / "r" / "ed.zarr").exists()


# ------------------------------------------------------------------ item 13: messages


@pytest.mark.parametrize("url,words", [
    ("foo://x", "the URL scheme foo:// is not one edtool can use"),
    ("zip://x", "zip:// is read-only"),
    ("http://example.invalid/r", "the URL scheme http:// is not usable here"),
    ("s3://bucket/r", "the URL scheme s3:// is not usable here: Install s3fs")])
def test_unusable_url_schemes_say_so_in_one_line(url, words, tmp_path, capsys, monkeypatch):
    """Unknown, not installed here, or read-only: never 'exists but is not an edtool run store' (and
    no warning about locks before it)."""
    import fsspec

    scheme = url.split(":")[0]
    if scheme in ("http", "s3"):
        try:
            fsspec.get_filesystem_class(scheme)
            pytest.skip(f"the package for {scheme}:// is installed here")
        except ImportError:
            pass
    for command in (["compute", "--models", "is", "--nsteps", "2", "--device", "cpu", "--run-dir", url],
                    ["status", url], ["verify", url], ["plot", url, "--out", tmp_path / "f"]):
        reading = command[0] != "compute"
        code, out, err = cli(capsys, monkeypatch, *command)
        assert_refused((code, out, err), url, "names a path inside an archive" if reading and scheme == "zip"
                       else words)
    assert not (tmp_path / "f").exists()


def _nan_network(path: Path) -> Path:
    """A UNet whose output bias is NaN: every score it gives is non-finite."""
    from safetensors.torch import load_file, save_file

    save_tiny(path, "unet")
    weights = load_file(str(path.with_suffix(".safetensors")))
    weights["output_conv.bias"][:] = float("nan")
    save_file(weights, str(path.with_suffix(".safetensors")))
    manifest = json.loads(path.with_suffix(".json").read_text())
    manifest.pop("weights_sha256", None)
    path.with_suffix(".json").write_text(json.dumps(manifest))
    return path.with_suffix(".safetensors")


def test_a_warning_is_one_line_said_once(tmp_path):
    """A real process: Python's warnings print their source line unless edtool formats them; the
    non-finite warning appears once, not during the run and again in the closing summary."""
    net = _nan_network(tmp_path / "nan_unet")
    proc = subprocess.run([sys.executable, "-m", "edtool", "compute", "--models", "unet", "--unet", net, *SMALL,
                           "--run-dir", tmp_path / "r"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["edtool: warning: unet: non-finite values on realization(s) [0] -> NaN"]


def test_changing_only_the_layout_names_only_the_layout(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    sample = ["sample", "--checkpoint", tiny_checkpoints / "tiny_unet.safetensors", "--machine", "is", "--seeds",
              "2", "--max-samples", "20", "--out", tmp_path / "s", *SMALL]
    for first, second in ((["--layout", "paper"], []), ([], ["--layout", "paper"])):
        code, _, err = cli(capsys, monkeypatch, *sample, *first, "--overwrite")
        assert code == 0, err
        assert_refused(cli(capsys, monkeypatch, *sample, *second), "(layout differ, recorded in")


def test_demo_with_other_settings_suggests_what_demo_has(tmp_path, capsys, monkeypatch):
    demo = ["demo", "--models", "is", "--device", "cpu", "--out", tmp_path / "d"]
    code, _, err = cli(capsys, monkeypatch, *demo, "--nsteps", "2")
    assert code == 0, err
    code, out, err = cli(capsys, monkeypatch, *demo, "--nsteps", "3")
    assert_refused((code, out, err), "was made with nsteps=2; you asked for nsteps=3: give the demo another --out",
                   f"or delete {tmp_path / 'd' / 'run'}")
    assert "--run" not in err.replace(f"{tmp_path / 'd' / 'run'}", "") and "--overwrite" not in err


# ------------------------------------------------------------------ item 6: sample never replaces another's file


def _sample_args(ckpt: Path, out: Path, *more):
    return ["sample", "--checkpoint", ckpt, "--machine", "is", "--max-samples", "20", "--out", out, *SMALL, *more]


def test_a_rerun_of_sample_keeps_an_edited_summary(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    args = _sample_args(tiny_checkpoints / "tiny_unet.safetensors", tmp_path / "s", "--seeds", "2")
    assert cli(capsys, monkeypatch, *args)[0] == 0
    assert cli(capsys, monkeypatch, *args)[0] == 0  # the same sample again: edtool's own files are redone
    summary = tmp_path / "s" / "r2_summary.json"
    summary.write_text(summary.read_text().replace('"nsteps": 2', '"nsteps": 2, "my_note": "keep"'))
    edited = summary.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert_refused(cli(capsys, monkeypatch, *args, *extra), f"{summary} exists and edtool did not write it",
                       "move it away or use another --out")
        assert summary.read_bytes() == edited


def test_sample_overwrite_never_replaces_a_file_edtool_did_not_write(tiny_checkpoints, tmp_path, capsys,
                                                                     monkeypatch):
    ckpt = tiny_checkpoints / "tiny_unet.safetensors"
    out = tmp_path / "s"
    assert cli(capsys, monkeypatch, *_sample_args(ckpt, out, "--seeds", "2"))[0] == 0
    mine = out / "seeds" / "seed_2.npy"
    mine.write_bytes(b"my own file")
    for extra, words in (([], "holds samples made with other settings (seeds differ"),  # seeds 0..2
                         (["--overwrite"], f"{mine} exists and edtool did not write it")):
        assert_refused(cli(capsys, monkeypatch, *_sample_args(ckpt, out, "--seeds", "3", *extra)), words)
        assert mine.read_bytes() == b"my own file"
    assert (out / "seeds" / "seed_1.npy").exists()  # nothing of the earlier samples was deleted either
    mine.unlink()
    code, _, err = cli(capsys, monkeypatch, *_sample_args(ckpt, out, "--seeds", "3", "--overwrite"))
    assert code == 0, err
    assert json.loads((out / "r2_summary.json").read_text())["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_sample_out_that_takes_no_files_is_refused_before_sampling(where, tiny_checkpoints, tmp_path, capsys,
                                                                   monkeypatch):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "is_a_file" else tmp_path / "afile" / "s"
    assert_refused(cli(capsys, monkeypatch, *_sample_args(tiny_checkpoints / "tiny_unet.safetensors", out)),
                   f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_sample_out_in_a_folder_that_takes_no_files(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """A read-only folder is refused before any work. Simulated: root writes through permission bits, so
    the probe check_output makes (a temporary file in the folder) is refused here as the OS would."""
    import tempfile

    real = tempfile.TemporaryFile

    def read_only(*a, dir=None, **kw):
        if dir is not None and Path(dir) == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert_refused(cli(capsys, monkeypatch, *_sample_args(tiny_checkpoints / "tiny_unet.safetensors",
                                                          tmp_path / "ro" / "s")),
                   f"{tmp_path / 'ro'} does not take files (Permission denied)")
    assert list((tmp_path / "ro").iterdir()) == []


# ------------------------------------------------------------------ items 8, 10: figures and outputs


def _compute_is(tmp_path, capsys, monkeypatch, name: str, realizations: int) -> Path:
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", "is", *SMALL, "--realizations", realizations,
                       "--run-dir", tmp_path / name)
    assert code == 0, err
    return tmp_path / name


def test_one_folder_never_mixes_the_figures_of_two_runs(tmp_path, capsys, monkeypatch):
    """plot A --out F then plot B --out F: refused unless --overwrite, which removes A's figures (those
    edtool wrote) so that F holds B's alone; a file edtool did not write stays."""
    a = _compute_is(tmp_path, capsys, monkeypatch, "a", 2)  # two realizations: an aggregated figure too
    b = _compute_is(tmp_path, capsys, monkeypatch, "b", 1)
    figures = tmp_path / "F"
    assert cli(capsys, monkeypatch, "plot", a, "--out", figures)[0] == 0
    assert cli(capsys, monkeypatch, "plot", a, "--out", figures, "--format", "svg")[0] == 0
    (figures / "notes.txt").write_text("mine")
    assert (figures / "ed_analysis_aggregated.png").exists()
    assert_refused(cli(capsys, monkeypatch, "plot", b, "--out", figures), f"{figures} holds figures of another run",
                   "--overwrite")
    code, out, err = cli(capsys, monkeypatch, "plot", b, "--out", figures, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in figures.iterdir() if not p.name.startswith(".")) == [
        "asym_vs_time.png", "ed_analysis_single.png", "notes.txt"]
    assert cli(capsys, monkeypatch, "plot", b, "--out", figures)[0] == 0  # the same run again: fine


def test_a_run_plotted_into_its_own_folder_drops_figures_it_no_longer_makes(tmp_path, capsys, monkeypatch):
    run = _compute_is(tmp_path, capsys, monkeypatch, "r", 2)
    assert cli(capsys, monkeypatch, "plot", run)[0] == 0
    assert (run / "ed_analysis_aggregated.png").exists()
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", "is", *SMALL, "--realizations", "1",
                       "--run-dir", run, "--overwrite")  # recomputed with one realization
    assert code == 0, err
    assert cli(capsys, monkeypatch, "plot", run)[0] == 0
    assert not (run / "ed_analysis_aggregated.png").exists() and (run / "ed_analysis_single.png").exists()


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_plot_into_a_target_that_takes_no_files(where, tmp_path, capsys, monkeypatch):
    run = _compute_is(tmp_path, capsys, monkeypatch, "r", 1)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "is_a_file" else tmp_path / "afile" / "figs"
    assert_refused(cli(capsys, monkeypatch, "plot", run, "--out", out), f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_analyze_refuses_a_format_before_computing(tmp_path, capsys, monkeypatch):
    assert_refused(cli(capsys, monkeypatch, "analyze", "--models", "is", "--nsteps", "2", "--device", "cpu",
                       "--format", "tiff", "--output-dir", tmp_path / "a"), "figure format 'tiff' is not supported")
    assert not (tmp_path / "a").exists()


def test_calibrate_out_a_folder_is_refused_before_loading(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.setattr("edtool.cli_networks._network_and_data", lambda *a: pytest.fail("loaded before the check"))
    assert_refused(cli(capsys, monkeypatch, "calibrate", "--checkpoint", tiny_checkpoints / "tiny_resnet.safetensors",
                       "--out", tmp_path / "d", "--force"), f"{tmp_path / 'd'} is a folder")


def test_a_run_dir_that_is_a_file_is_refused_by_name(tmp_path, capsys, monkeypatch):
    """--run-dir pointing at a file (or below one) says so, and the file is left as it was."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for run_dir in (blocker, blocker / "sub"):
        assert_refused(cli(capsys, monkeypatch, "compute", "--models", "els", *SMALL, "--max-samples", "2",
                           "--run-dir", run_dir), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"


# ------------------------------------------------------------------ hostile input
# Hostile input next to friendly input: every case ends as one line on stderr and exit
# code 2, or as the right number with a line that says what was done; never a traceback, never a
# silently different number. CLI cases run through the console entry point (`cli`).


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
    # the ideal score alone: which figures are refused or replaced does not depend on the models in them
    args = ["analyze", "--output_dir", tmp_path / "out", "--models", "is", "--nsteps", 2, "--device", "cpu",
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
