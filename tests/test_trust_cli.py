"""Issue 22 at the command line: a model is checked against its slot, odd numbers are usage errors
before any work, outputs are checked before the work, files edtool did not write are never replaced,
and each refusal is one line (exit 2). Each case runs through the console entry point (`cli`, or a
real `python -m edtool` process where the process itself matters: warnings, a hang)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edtool.networks import checkpoints
from edtool.networks.models import build_network
from test_bad_input import assert_refused
from test_pipeline import TINY, _tiny_networks, cli, save_tiny, subprocess_env, tiny_checkpoints  # noqa: F401

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
    (["--batch", "0"], "--batch"), (["--batch", "-1"], "--batch"), (["--seeds", "0"], "--seeds must be at least 1"),
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
    from test_checkpoints import DDIM, MinimalUNet, save_paper

    src = save_paper(tmp_path / name, DDIM(MinimalUNet()))
    assert_refused(cli(capsys, monkeypatch, "import-checkpoint", src, "--dataset", dataset, "--out",
                       tmp_path / "out" / "i"), words)
    assert not (tmp_path / "out").exists()
    code, _, err = cli(capsys, monkeypatch, "import-checkpoint", src, "--dataset", "mnist5k", "--out",
                       tmp_path / "out" / "i")
    assert code == 0 and checkpoints.read_manifest(tmp_path / "out" / "i.json")["dataset"] == "mnist5k", err
