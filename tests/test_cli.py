"""Trust at the command line: a model is checked against its slot, odd numbers are usage errors
before any work, outputs are checked before the work, files edtool did not write are never replaced,
and each refusal is one line (exit 2). Each case runs through the console entry point (`cli`, or a
real `python -m edtool` process where the process itself matters: warnings, a hang)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edtool.networks import checkpoints
from edtool.networks.models import build_network
from helpers import assert_refused, cli, save_tiny, subprocess_env, TINY
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
