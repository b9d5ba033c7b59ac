"""Calibration and sampling of the ELS machines (SPEC 5.2, 5.4) against independent truth: a
"network" that IS a machine with a known schedule must be recovered exactly, a machine agrees
with itself (r^2 = 1), and r^2 is numpy's squared Pearson correlation."""

import json
import math
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.els.calibrate import (
    agreement_stats,
    calibrate,
    median_size,
    merge_calibrations,
    pearson_r,
    r2,
    sample,
)
from edtool.cli import main
from edtool.diffusion import ddim_sample, initial_noise
from edtool.errors import EdtoolError
from edtool.model import ScoreModel
from edtool.els.machine import make_machine
from edtool.els.sample_folder import samples_figure
from edtool.networks.models import build_network
from edtool.els.schedule import read_scales
from edtool.networks.discovery import scales_path


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


# ------------------------------------------------------------------ pure helpers


def test_r_is_numpys_pearson_and_r2_its_square():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 8, 8))
    b = 0.6 * a + rng.normal(size=(1, 8, 8))
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], rel=1e-12)
    assert pearson_r(a, -b) == pytest.approx(np.corrcoef(a.ravel(), -b.ravel())[0, 1], rel=1e-12)  # sign kept
    assert r2(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1] ** 2, rel=1e-12)
    assert pearson_r(torch.tensor(a), torch.tensor(-3 * a + 2)) == pytest.approx(-1, abs=1e-12)
    assert r2(torch.tensor(a), torch.tensor(-3 * a + 2)) == pytest.approx(1, abs=1e-12)  # affine-invariant
    assert r2(a, rng.normal(size=(1, 8, 8))) < 0.2
    with pytest.warns(UserWarning, match="constant"):
        assert math.isnan(r2(a, np.ones_like(a)))


def test_agreement_stats_median_iqr_and_wins_against_numpy():
    rng = np.random.default_rng(1)
    r = rng.uniform(-0.3, 1, size=11)
    base = rng.uniform(-0.3, 1, size=11)
    r[3], base[5] = np.nan, np.nan  # a failed seed on either side is left out of the comparison
    got = agreement_stats(r, base)
    ok = r[np.isfinite(r)]
    assert got["median_r"] == pytest.approx(np.median(ok)) and got["n_seeds"] == 10
    assert got["median_r2"] == pytest.approx(np.median(ok ** 2))
    assert got["iqr_r"] == pytest.approx([np.quantile(ok, 0.25), np.quantile(ok, 0.75)])
    assert got["iqr_r2"] == pytest.approx([np.quantile(ok ** 2, 0.25), np.quantile(ok ** 2, 0.75)])
    wins = sum(1 for a, b in zip(r, base) if a == a and b == b and a > b)
    wins2 = sum(1 for a, b in zip(r, base) if a == a and b == b and a * a > b * b)
    assert got["beats_is"]["wins"] == wins and got["beats_is"]["seeds"] == 9
    assert got["beats_is"]["fraction"] == pytest.approx(wins / 9)
    assert got["beats_is"]["by_r2"]["wins"] == wins2
    assert "beats_is" not in agreement_stats(r)
    empty = agreement_stats([math.nan, math.nan])
    assert math.isnan(empty["median_r"]) and empty["n_seeds"] == 0


def test_median_size_rounds_to_a_candidate():
    assert median_size([3, 5, 5], [3, 5, 7]) == 5
    assert median_size([3, 7], [3, 5, 7]) == 5  # median 5 is a candidate
    assert median_size([3, 7], [3, 7, 11]) == 3  # median 5: equally near 3 and 7, the smaller wins
    assert median_size([7, 11, 11, 11], [3, 7, 11]) == 11


# ------------------------------------------------------------------ calibration


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_calibration_recovers_the_schedule_of_a_machine_network(metric):
    images, labels = toy_images()
    nsteps, truth = 6, [1, 3, 3, 5, 7, 7]  # entry i for t = (i + 1) / 6
    net = MachineNetwork(make_machine("els-borders", images, labels, scales=truth), nsteps)
    res = calibrate(net, images, labels, sizes=(1, 3, 5, 7), seeds=[0, 1, 2], nsteps=nsteps, metric=metric, batch=7)
    assert res["scales"] == truth
    assert all(choice == truth for choice in res["choices"].values())
    table = np.array(res["similarity"])  # (steps, sizes), rows in schedule order
    assert table.shape == (nsteps, 4)
    at_truth = table[np.arange(nsteps), [res["sizes"].index(k) for k in truth]]
    if metric == "cosine":
        assert np.all(at_truth > 1 - 1e-9) and np.all(np.delete(table, res["sizes"].index(1), 1)[0] < 1 - 1e-9)
    else:
        assert np.all(at_truth < 1e-5)


def test_calibration_against_a_fixed_size_picks_it_everywhere_and_writes_discoverable_json(tmp_path):
    from edtool.els.calibrate import calibration_meta
    from edtool.els.schedule import write_scales_json

    images, labels = toy_images(seed=1)
    net = MachineNetwork(make_machine("els-borders", images, labels, patch_size=5), 4)
    res = calibrate(net, images, labels, sizes=(3, 5, 7), seeds=[3, 4], nsteps=4)
    assert res["scales"] == [5, 5, 5, 5] and res["seeds"] == [3, 4] and res["labels"] is None
    path = write_scales_json(scales_path(tmp_path / "net.safetensors", res["machine"]), res["scales"],
                             **calibration_meta(res))
    assert path.name == "net_scales_els-borders.json" and read_scales(path) == [5, 5, 5, 5]
    assert json.loads(path.read_text())["choices"] == {"3": [5] * 4, "4": [5] * 4}


def test_calibrations_of_disjoint_sizes_merge_into_the_one_run_over_all_sizes():
    images, labels = toy_images(seed=2)
    nsteps = 5
    net = MachineNetwork(make_machine("els-borders", images, labels, scales=[1, 3, 5, 5, 7]), nsteps)
    run = lambda sizes: calibrate(net, images, labels, sizes=sizes, seeds=[0, 1, 2], nsteps=nsteps, batch=4)
    whole, low, high = run((1, 3, 5, 7)), run((3, 7)), run((1, 5))
    merged = merge_calibrations([low, high])
    assert merged["sizes"] == [1, 3, 5, 7]
    for key in ("scales", "choices", "similarity", "similarity_per_seed", "seeds", "nsteps", "machine", "metric"):
        assert merged[key] == whole[key], key
    # a part alone picks only among its own sizes: merging is not the same as either part
    assert low["scales"] != whole["scales"] and high["scales"] != whole["scales"]

    other_seeds = calibrate(net, images, labels, sizes=(5,), seeds=[0, 1], nsteps=nsteps)
    legacy = {k: v for k, v in high.items() if k != "similarity_per_seed"}
    for parts, match in [([low], "at least two"), ([low, low], "size 3 was scored by more than one"),
                         ([low, other_seeds], "seeds"), ([low, legacy], "no per-seed similarities"),
                         ([low, {**high, "metric": "l2"}], "metric")]:
        with pytest.raises(EdtoolError, match=match):
            merge_calibrations(parts)


def test_calibrate_bad_input():
    images, labels = toy_images(n=6)
    net = MachineNetwork(make_machine("els-borders", images, labels, patch_size=3), 2)
    for kw, match in [({"metric": "dot"}, "metric"), ({"sizes": [4]}, "odd"), ({"machine": "is"}, "is"),
                      ({"seeds": []}, "seed"), ({"machine": "elsx"}, "unknown machine"), ({"nsteps": 0}, "nsteps")]:
        with pytest.raises(EdtoolError, match=match):
            calibrate(net, images, labels, **{"sizes": [3], "seeds": [0], "nsteps": 2, **kw})


# ------------------------------------------------------------------ sampling and r^2


def test_sample_writes_the_layout_and_a_machine_agrees_with_itself(tmp_path):
    images, labels = toy_images()
    nsteps, schedule = 5, [3, 3, 5, 5, 7]
    net = MachineNetwork(make_machine("els-borders", images, labels, scales=schedule), nsteps)
    out = tmp_path / "s"
    summary = sample(["els", "is"], net, images, labels, seeds=[0, 1, 2], nsteps=nsteps, scales=schedule, out_dir=out)
    for folder in ("seeds", "els_outputs", "is_outputs", "network_outputs"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["seed_0.npy", "seed_1.npy", "seed_2.npy"]
    assert not (out / "labels").exists()
    grid = matplotlib.image.imread(out / "samples_grid.png")
    assert grid.shape[0] >= 3 * 100 and grid.shape[1] >= 3 * 100  # three rows, three seeds: each image ~110 px
    np.testing.assert_array_equal(np.load(out / "seeds" / "seed_1.npy"), initial_noise(1, (1, 1, 8, 8))[0].numpy())
    x0 = torch.stack([initial_noise(s, (1, 8, 8)) for s in [0, 1, 2]])
    with torch.no_grad():
        expected = ddim_sample(net.eps, x0, nsteps)
    np.testing.assert_allclose(np.load(out / "network_outputs" / "seed_2.npy"), expected[2].numpy(), atol=1e-5)

    on_disk = json.loads((out / "r2_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    els = summary["machines"]["els-borders"]
    assert els["dir"] == "els_outputs" and els["scales"] == schedule
    assert all(v > 1 - 1e-6 for v in els["r2"].values()) and els["median_r2"] > 1 - 1e-6
    assert els["median_r"] > 1 - 1e-6
    ideal = summary["machines"]["is"]
    assert ideal["median_r2"] == pytest.approx(np.median(list(ideal["r2"].values())))
    # r, r2 and beats_is from the saved images, with numpy alone
    net_r = {}
    for folder, name in (("is_outputs", "is"), ("els_outputs", "els-borders")):
        rs = []
        for s in (0, 1, 2):
            a, b = np.load(out / folder / f"seed_{s}.npy"), np.load(out / "network_outputs" / f"seed_{s}.npy")
            rs.append(np.corrcoef(a.ravel(), b.ravel())[0, 1])
            assert on_disk["machines"][name]["r"][str(s)] == pytest.approx(rs[-1], rel=1e-9)
            assert on_disk["machines"][name]["r2"][str(s)] == pytest.approx(rs[-1] ** 2, rel=1e-9)
        net_r[name] = rs
        assert on_disk["machines"][name]["median_r"] == pytest.approx(np.median(rs), rel=1e-9)
        assert on_disk["machines"][name]["iqr_r"] == pytest.approx(np.percentile(rs, [25, 75]), rel=1e-9)
    wins = sum(e > i for e, i in zip(net_r["els-borders"], net_r["is"]))
    assert els["beats_is"] == {"wins": wins, "seeds": 3, "fraction": wins / 3, "by_r2": els["beats_is"]["by_r2"]}
    assert wins == 3  # the machine is the network; is is not
    assert "beats_is" not in ideal and "baseline" not in ideal and "0.94" in on_disk["definitions"]["r"]


def test_conditional_sample_writes_labels_and_uses_them(tmp_path):
    images, labels = toy_images()
    net = MachineNetwork(make_machine("els-borders", images, labels, patch_size=3), 3, conditional=True)
    summary = sample(["els-borders"], net, images, labels, seeds=[5, 6], nsteps=3, out_dir=tmp_path, label=2,
                     patch_size=3)
    assert summary["labels"] == [2, 2] and int(np.load(tmp_path / "labels" / "seed_6.npy")) == 2
    assert summary["machines"]["els-borders"]["patch_size"] == 3 and summary["notes"]
    assert summary["machines"]["els-borders"]["median_r2"] > 1 - 1e-6
    # is was not asked for: sampled as the baseline of beats_is, said so; --no-baseline leaves it out
    assert summary["machines"]["is"]["baseline"] is True and (tmp_path / "is_outputs" / "seed_6.npy").exists()
    assert summary["machines"]["els-borders"]["beats_is"]["seeds"] == 2 and any("baseline" in n for n in summary["notes"])
    alone = sample(["els-borders"], net, images, labels, seeds=[5], nsteps=3, out_dir=tmp_path / "alone", label=2,
                   patch_size=3, baseline=False)
    assert list(alone["machines"]) == ["els-borders"] and "beats_is" not in alone["machines"]["els-borders"]
    with pytest.raises(EdtoolError, match="label 7"):
        sample(["els-borders"], net, images, labels, seeds=[5], nsteps=3, out_dir=tmp_path, label=7)
    with pytest.raises(EdtoolError, match="twice"):
        sample(["els", "els-borders"], net, images, labels, seeds=[5], nsteps=3, out_dir=tmp_path)


def test_sample_into_an_existing_folder_checks_its_settings(tmp_path):
    """Same settings redo the same files; other settings are refused by name (or --overwrite deletes the old
    run's files first); a folder of unrecorded samples is refused; an interrupted redo leaves no summary."""
    images, labels = toy_images()
    net = MachineNetwork(make_machine("els-borders", images, labels, patch_size=3), 3)
    out = tmp_path / "out"
    first = sample(["els-borders"], net, images, labels, seeds=[0, 1], nsteps=3, out_dir=out, patch_size=3)
    recorded = json.loads((out / "sample_settings.json").read_text())
    assert recorded["seeds"] == [0, 1] and recorded["machines"]["els-borders"] == {"patch_size": 3}
    again = sample(["els-borders"], net, images, labels, seeds=[0, 1], nsteps=3, out_dir=out, patch_size=3)
    assert again["machines"]["els-borders"]["r"] == first["machines"]["els-borders"]["r"]
    for kw, setting in (({"nsteps": 4}, "nsteps"), ({"seeds": [0, 1, 2]}, "seeds"), ({"patch_size": 5}, "machines")):
        with pytest.raises(EdtoolError, match=f"other settings \\({setting}"):
            sample(["els-borders"], net, images, labels, **{"seeds": [0, 1], "nsteps": 3, "patch_size": 3, **kw},
                   out_dir=out)
    assert json.loads((out / "sample_settings.json").read_text()) == recorded  # the refusals wrote nothing
    with pytest.raises(EdtoolError, match="other settings \\(images"):
        sample(["els-borders"], net, images[:-1], labels[:-1], seeds=[0, 1], nsteps=3, out_dir=out, patch_size=3)

    sample(["els-borders"], net, images, labels, seeds=[0], nsteps=4, out_dir=out, patch_size=3, overwrite=True)
    assert not (out / "els_outputs" / "seed_1.npy").exists() and not (out / "seeds" / "seed_1.npy").exists()
    assert json.loads((out / "r2_summary.json").read_text())["nsteps"] == 4

    class Failing(MachineNetwork):  # the same network, killed in the middle of a redo
        def eps(self, t, x, label=None):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        sample(["els-borders"], Failing(net.machine, 3), images, labels, seeds=[0], nsteps=4, out_dir=out,
               patch_size=3)
    assert not (out / "r2_summary.json").exists()  # never a summary of other images than those beside it
    assert not list(out.rglob(".*.tmp*"))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "r2_summary.json").write_text("{}")
    with pytest.raises(EdtoolError, match="did not record"):
        sample(["els-borders"], net, images, labels, seeds=[0], nsteps=3, out_dir=foreign, patch_size=3)
    assert (foreign / "r2_summary.json").read_text() == "{}"
    with pytest.raises(EdtoolError, match="edtool did not write it"):  # --overwrite replaces only edtool's files
        sample(["els-borders"], net, images, labels, seeds=[0], nsteps=3, out_dir=foreign, patch_size=3,
               overwrite=True)
    assert (foreign / "r2_summary.json").read_text() == "{}"
    (foreign / "r2_summary.json").unlink()
    sample(["els-borders"], net, images, labels, seeds=[0], nsteps=3, out_dir=foreign, patch_size=3)
    assert json.loads((foreign / "r2_summary.json").read_text())["seeds"] == [0]


# ------------------------------------------------------------------ the commands


def run_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["edtool", *map(str, args)])
    main()


def test_calibrate_and_sample_commands(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    net = build_network("resnet", emb_dim=16, num_layers=1)
    ckpt = checkpoints.save(tmp_path / "tiny_resnet.safetensors", net, {
        "arch": "resnet", "arch_kwargs": {"emb_dim": 16, "num_layers": 1}, "dataset": "mnist5k",
        "image_shape": [1, 32, 32], "conditional": False, "num_classes": None, "padding": "zeros"})
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # calibrate writes to ./checkpoints, never beside the checkpoint
    calibrate = ["calibrate", "--checkpoint", ckpt, "--sizes", 3, 5, "--seeds", 2, "--nsteps", 2, "--n-images", 12,
                 "--quiet"]
    run_cli(monkeypatch, *calibrate)
    found = tmp_path / "work" / "checkpoints" / "tiny_resnet_scales_els-borders.json"
    schedule = read_scales(found)
    assert len(schedule) == 2 and set(schedule) <= {3, 5} and not scales_path(ckpt, "els-borders").exists()
    assert json.loads(found.read_text())["checkpoint_sha256"] == checkpoints.file_hash(ckpt)
    assert "schedule (els-borders" in capsys.readouterr().out
    before = found.read_bytes()
    with pytest.raises(SystemExit) as e:  # an existing calibration is replaced only with --force
        run_cli(monkeypatch, *calibrate[:-2], 8, "--quiet")  # --n-images 8
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(found) in err and "--force" in err
    assert found.read_bytes() == before

    # the same calibration split over two runs by --sizes, then merged: the same schedule and table
    for sizes, name in (("3", "a.json"), ("5", "b.json")):
        run_cli(monkeypatch, *calibrate[:4], sizes, *calibrate[6:12], "--out", tmp_path / name, "--quiet")
    merged_path = tmp_path / "merged.json"
    run_cli(monkeypatch, "calibrate", "--checkpoint", ckpt, "--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
            "--out", merged_path)
    merged, whole = json.loads(merged_path.read_text()), json.loads(found.read_text())
    for key in ("scales", "choices", "similarity_per_seed", "sizes", "checkpoint_sha256"):
        assert merged[key] == whole[key], key
    assert len(merged["part_commands"]) == 2 and "--sizes 3" in merged["part_commands"][0]
    capsys.readouterr()
    other = checkpoints.save(tmp_path / "other.safetensors", build_network("resnet", emb_dim=16, num_layers=1),
                             json.loads(ckpt.with_suffix(".json").read_text()))
    (tmp_path / "junk.json").write_text("{not json")
    for merge, match in ((f"{tmp_path / 'a.json'},{tmp_path / 'a.json'}", "more than one"),
                         (f"{tmp_path / 'a.json'},{tmp_path / 'junk.json'}", "cannot read"),
                         (f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "already exists")):
        with pytest.raises(SystemExit) as e:
            run_cli(monkeypatch, "calibrate", "--checkpoint", ckpt, "--merge", merge, "--out", merged_path)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    with pytest.raises(SystemExit) as e:  # parts made for other weights
        run_cli(monkeypatch, "calibrate", "--checkpoint", other, "--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                "--out", tmp_path / "m2.json")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "other weights" in err and not (tmp_path / "m2.json").exists()

    run_cli(monkeypatch, "sample", "--machine", "els-borders,is", "--checkpoint", ckpt, "--seeds", 2, "--nsteps", 2,
            "--n-images", 12, "--out", tmp_path / "out", "--quiet")
    summary = json.loads((tmp_path / "out" / "r2_summary.json").read_text())
    assert summary["machines"]["els-borders"]["scales_file"] == str(found)
    assert summary["machines"]["els-borders"]["scales"] == schedule
    printed = capsys.readouterr().out
    # the summary says which number is the paper's (its "r^2" 0.94 is our r) and how often the machine beats is
    assert "the number the paper calls r^2" in printed and "0.94" in printed
    r = summary["machines"]["els-borders"]["median_r"]
    assert f"els-borders   median r {r:.3f}" in printed and "beats is on" in printed

    for bad in (["calibrate", "--checkpoint", ckpt, "--sizes", 4], ["calibrate", "--checkpoint", ckpt, "--metric", "x"],
                ["calibrate", "--checkpoint", tmp_path / "missing.safetensors"],
                ["sample", "--checkpoint", ckpt, "--machine", "nope", "--out", tmp_path / "o2", "--n-images", 4]):
        with pytest.raises(SystemExit) as e:
            run_cli(monkeypatch, *bad, "--quiet")
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("edtool: error:"), err


def test_is_on_a_one_image_training_set_samples_that_image(tmp_path):
    """With one training image y the ideal score's posterior is y itself, so deterministic DDIM lands on
    y from any noise (the last step is x_0 = (x - sqrt(beta) eps_hat) / sqrt(alpha_bar) = y)."""
    images, labels = toy_images(n=1)
    net = MachineNetwork(make_machine("els-borders", images, labels, patch_size=3), 4)
    summary = sample(["is"], net, images, labels, seeds=[0, 1, 2], nsteps=4, out_dir=tmp_path, baseline=False)
    assert list(summary["machines"]) == ["is"]
    for s in (0, 1, 2):
        np.testing.assert_allclose(np.load(tmp_path / "is_outputs" / f"seed_{s}.npy"), images[0].numpy(), atol=1e-5)


@pytest.mark.slow  # two full ELS trajectories on 5,000 digits: minutes of CPU
def test_els_agrees_with_the_shipped_resnet_better_than_the_ideal_score(tmp_path):
    """The paper's headline on our shipped pair: with its calibrated scales, the ELS machine's sample is
    closer (Pearson r) to the shipped ResNet's than the ideal score machine's is, seed by seed."""
    from edtool.data import load_dataset
    from edtool.paths import shipped_dir

    ckpt = shipped_dir() / "mnist5k_resnet.safetensors"
    images, labels = load_dataset("mnist5k")
    net = checkpoints.load(ckpt)
    summary = sample(["els-borders", "is"], net, images, labels, seeds=[100, 101], nsteps=20, out_dir=tmp_path,
                     scales={"els-borders": read_scales(scales_path(ckpt, "els-borders"))})
    els, ideal = summary["machines"]["els-borders"]["r"], summary["machines"]["is"]["r"]
    for s in ("100", "101"):
        assert els[s] > ideal[s], (s, els[s], ideal[s])
    assert summary["machines"]["els-borders"]["beats_is"]["wins"] == 2


def test_samples_grid_names_rows_seeds_and_r_per_image():
    """samples_grid.png tells a reader without the code which row is the network and which each machine,
    the seed of each column and each machine image's r with the network's sample (and the row's median)."""
    g = torch.Generator().manual_seed(0)
    rows = {name: torch.rand(3, 1, 8, 8, generator=g) * 2 - 1 for name in ("network", "els-borders", "is")}
    r = {"els-borders": [0.91, 0.5, 0.7], "is": [0.2, float("nan"), 0.4]}
    fig = samples_figure("unet", rows, [7, 8, 9], r)
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["network\n(unet)", "ELS machine\n(els-borders)\nmedian r 0.70",
                                                     "IS machine\n(ideal score)\nmedian r 0.30"]
    assert [ax.get_title() for ax in axes[0]] == ["seed 7", "seed 8", "seed 9"]
    assert [[ax.get_xlabel() for ax in row] for row in axes[1:]] == [["r = 0.91", "r = 0.50", "r = 0.70"],
                                                                     ["r = 0.20", "r = nan", "r = 0.40"]]
    shown = axes[2, 1].get_images()[0].get_array()
    np.testing.assert_allclose(shown, (rows["is"][1, 0].numpy() + 1) / 2, atol=1e-6)
