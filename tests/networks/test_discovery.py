"""The seed tool's workflow (SPEC 4 and 6): paper files found in ./checkpoints or given
directly, imported on the fly through the allow-list and cached by content hash; the search order
./checkpoints -> EDTOOL_CHECKPOINTS -> shipped for networks and scales; networks measured without
any training data; --max-samples; the estimator each model used and the device recorded.

Paper files are pickled here with the paper's classes rebuilt in tests/paper_networks.py (not edtool's).
"""

import gzip
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edtool import data
from edtool.networks import checkpoints
from edtool.networks import discovery
from edtool.diffusion import ddim_sample, initial_noise, seed_labels
from edtool.errors import EdtoolError
from edtool.els.factory import make_machine
from edtool.networks.paper_import import import_checkpoint
from edtool.paths import search_dirs, shipped_dir
from edtool.config import ComputeConfig
from edtool.study.compute import compute
from edtool.store.run import open_run
from helpers import cli, edtool_in_process, REPO, save_tiny, small_mnist, snapshot, write_idx_root
from paper_networks import _RunsCode, DDIM, MinimalResNet, MinimalUNet, save_paper

PAPER_SCALES = [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15]  # scales_MNIST_ResNet_zeros


def paper_pair(folder: Path, seed: int = 0) -> dict:
    """backbone_MNIST_{UNet,ResNet}_zeros.pt (32x32, tiny) and scales_MNIST_ResNet_zeros.pt in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = save_paper(folder / "backbone_MNIST_UNet_zeros.pt",
                      DDIM(MinimalUNet(channels=1, fsizes=(8, 16), emb_dim=16), default_imsize=32))
    resnet = save_paper(folder / "backbone_MNIST_ResNet_zeros.pt",
                        DDIM(MinimalResNet(channels=1, emb_dim=16, num_layers=1), default_imsize=32))
    torch.save(PAPER_SCALES, folder / "scales_MNIST_ResNet_zeros.pt")
    return {"unet": unet, "resnet": resnet, "scales": folder / "scales_MNIST_ResNet_zeros.pt"}


def mnist_root(root: Path, n: int = 60) -> Path:
    """A tiny MNIST data root in the real IDX layout (random digits: the plumbing is under test)."""
    images, labels = small_mnist(n, seed=3)
    write_idx_root(root, images, labels)
    return root


@pytest.fixture
def offline(monkeypatch):
    """No network: a missing data set must be reported, not fetched."""
    def fail(url, dest, timeout=None):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(data, "fetch", fail)


def one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edtool: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


# ------------------------------------------------------------------ the seed's own command


def test_seed_command_with_paper_files_in_cwd_checkpoints(tmp_path, monkeypatch):
    """`edtool analyze --dataset mnist` in a folder holding the paper's files, as a user types it: the
    .pt files are found, imported once (one line each), cached by hash, the paper scales feed els."""
    work = tmp_path / "project"
    files = paper_pair(work / "checkpoints")
    mnist_root(work / "data")
    monkeypatch.delenv("EDTOOL_CHECKPOINTS", raising=False)
    env = {"EDTOOL_CACHE": str(work / "cache")}
    cmd = ["analyze", "--dataset", "mnist", "--data-root", "data", "--nsteps", "2", "--probes", "2", "--max-samples",
           "30", "--device", "cpu", "--quiet"]
    first = edtool_in_process(*cmd, cwd=work, env=env)
    assert first.returncode == 0, first.stderr
    run_dir = work / "results" / "exterior_derivative" / "mnist" / "single_realization"
    cfg = open_run(run_dir).config
    for arch in ("unet", "resnet"):
        assert cfg["models"][arch]["path"] == str(Path("checkpoints") / files[arch].name) or \
            Path(cfg["models"][arch]["path"]).resolve() == files[arch].resolve()
        assert cfg["models"][arch]["sha256"] == checkpoints.file_hash(files[arch])
    assert cfg["models"]["els"]["scales"] == PAPER_SCALES
    assert Path(cfg["models"]["els"]["scales_file"]).resolve() == files["scales"].resolve()
    assert cfg["max_samples"] == 30 and cfg["device"] == "cpu"
    cached = sorted((work / "cache" / "checkpoints").glob("*.safetensors"))
    assert len(cached) == 2 and all(p.with_suffix(".json").exists() for p in cached)
    assert "src" not in sys.modules

    again = edtool_in_process(*cmd[:-1], cwd=work, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("using its import cached at") == 2, again.stdout
    assert sorted((work / "cache" / "checkpoints").glob("*.safetensors")) == cached

    # the numbers are those of the same networks converted with import-checkpoint (independent path)
    converted = {a: import_checkpoint(files[a], out=tmp_path / "conv" / a) for a in ("unet", "resnet")}
    ref = tmp_path / "ref"
    os.environ.pop("EDTOOL_CHECKPOINTS", None)
    compute(ComputeConfig(dataset="mnist", models=["unet", "resnet"], unet=str(converted["unet"]),
                          resnet=str(converted["resnet"]), nsteps=2, probes=2, device="cpu", run_dir=str(ref)))
    a, b = open_run(run_dir), open_run(ref)
    for name in ("ed_fro", "asym", "final"):  # the subprocess ran with 1 thread, this process may use more:
        np.testing.assert_allclose(a.read(name)[:, :2], b.read(name), rtol=1e-5, atol=1e-7, err_msg=name)


def test_paper_pt_given_directly_and_a_malicious_one_refused_unrun(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    files = paper_pair(tmp_path / "elsewhere")
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, monkeypatch, "compute", "--dataset", "mnist", "--models", "unet,resnet",
                         "--unet", files["unet"], "--resnet_path", files["resnet"],
                         "--nsteps", "2", "--probes", "2", "--device", "cpu", "--run-dir", run_dir, "--quiet")
    assert code == 0, err
    before = snapshot(run_dir)

    target = tmp_path / "pwned"
    ddim = DDIM(MinimalUNet(fsizes=(8, 16), emb_dim=16), default_imsize=32)
    ddim.__dict__["payload"] = _RunsCode(target)
    evil = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", ddim)
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"these are not weights")
    state = save_paper(tmp_path / "backbone_MNIST_ResNet_zeros.pt", MinimalResNet().state_dict())
    torch.save(PAPER_SCALES, tmp_path / "scales20.pt")
    cases = [
        (["--unet", evil], [str(evil), "system"]),
        (["--unet", junk], [str(junk), "torch.save"]),
        (["--resnet", state], ["not a pickled DDIM"]),
        (["--models", "unet,resnet,is", "--scales", tmp_path / "scales20.pt", "--nsteps", "3"],
         ["20 patch sizes", "--nsteps 3"]),
        (["--max-samples", "0"], ["--max-samples"]),
    ]
    for extra, words in cases:
        args = {"--unet": files["unet"], "--resnet": files["resnet"], "--models": "unet,resnet", "--nsteps": "2"}
        for k, v in zip(extra[::2], extra[1::2]):
            args[k] = v
        flat = [x for kv in args.items() for x in kv]
        code, _, err = cli(capsys, monkeypatch, "compute", "--dataset", "mnist", *flat, "--probes", "2",
                           "--device", "cpu", "--run-dir", run_dir, "--quiet")
        one_line_error(code, err, *words)
        assert snapshot(run_dir) == before
    assert not target.exists()
    # a scales file that does not serve the steps is refused by sample too
    code, _, err = cli(capsys, monkeypatch, "sample", "--checkpoint", files["resnet"], "--dataset", "mnist",
                       "--data-root", mnist_root(tmp_path / "d"), "--scales", tmp_path / "scales20.pt", "--nsteps", "3",
                       "--seeds", "1", "--out", tmp_path / "s", "--device", "cpu")
    one_line_error(code, err, "--nsteps 3")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ search order


def test_network_search_order(tmp_path, monkeypatch):
    cwd, env = tmp_path / "work", tmp_path / "env"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDTOOL_CHECKPOINTS", raising=False)
    assert discovery.discover("mnist5k", "unet") == shipped_dir() / "mnist5k_unet.safetensors"
    env.mkdir()
    in_env = save_tiny(env / "env_unet", "unet")
    monkeypatch.setenv("EDTOOL_CHECKPOINTS", str(env))
    assert discovery.discover("mnist5k", "unet") == in_env
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "checkpoints").mkdir()
    here = save_tiny(cwd / "checkpoints" / "here_unet", "unet", seed=5)
    assert search_dirs()[:2] == [Path.cwd() / "checkpoints", env]
    assert discovery.discover("mnist5k", "unet") == here
    # paper files are found by name; ours before them in one folder; mnist5k does not take MNIST files
    files = paper_pair(cwd / "checkpoints")
    assert discovery.discover("mnist", "unet") == files["unet"]
    with pytest.raises(EdtoolError, match="no resnet checkpoint for dataset 'mnist'"):
        discovery.discover("mnist", "resnet", conditional=True)
    with pytest.raises(EdtoolError, match="no resnet checkpoint for dataset 'cifar10'.*backbone_"):
        discovery.discover("cifar10", "resnet")
    # inside the repository ./checkpoints is the shipped folder and keeps the shipped place, last
    monkeypatch.chdir(REPO)
    assert search_dirs() == [env, shipped_dir()]


def test_scales_search_order_and_steps(tmp_path, monkeypatch):
    """A calibration written to ./checkpoints (where `calibrate` writes) wins over EDTOOL_CHECKPOINTS,
    which wins over the shipped one beside the shipped ResNet; schedules that do not serve the steps
    are passed over with a note."""
    from edtool.els.schedule import read_scales, write_scales_json
    from edtool.networks.discovery import find_scales

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDTOOL_CHECKPOINTS", raising=False)
    resnet = [shipped_dir() / "mnist5k_resnet.safetensors"]
    shipped = shipped_dir() / "mnist5k_resnet_scales_els-borders.json"
    assert find_scales("els-borders", None, resnet, 20) == (read_scales(shipped), str(shipped))
    env = tmp_path / "env"
    sha = checkpoints.file_hash(resnet[0])  # a calibration away from the weights counts when it records them
    write_scales_json(env / "mnist5k_resnet_scales_els-borders.json", [5] * 20, checkpoint_sha256=sha)
    monkeypatch.setenv("EDTOOL_CHECKPOINTS", str(env))
    assert find_scales("els-borders", None, resnet, 10)[0] == [5] * 20
    write_scales_json(tmp_path / "checkpoints" / "mnist5k_resnet_scales_els-borders.json", [7] * 3,
                      checkpoint_sha256=sha)
    notes = []
    assert find_scales("els-borders", None, resnet, 3, notes)[0] == [7] * 3
    assert find_scales("els-borders", None, resnet, 20, notes)[0] == [5] * 20
    assert any("3 patch sizes do not serve --nsteps 20" in n for n in notes)
    notes = []
    assert find_scales("els-borders", None, resnet, 7, notes) == (None, None)
    assert len(notes) == 3  # each file named once, none used
    assert find_scales("els-circular", None, resnet, 20) == (None, None)
    # one in ./checkpoints calibrated for other weights is not this network's: the next folder's is used
    write_scales_json(tmp_path / "checkpoints" / "mnist5k_resnet_scales_els-borders.json", [9] * 20,
                      checkpoint_sha256="0" * 64)
    assert find_scales("els-borders", None, resnet, 20)[0] == [5] * 20
    write_scales_json(tmp_path / "three.json", [7] * 3)
    with pytest.raises(EdtoolError, match="3 patch sizes.*--nsteps 20"):
        find_scales("els-borders", tmp_path / "three.json", resnet, 20)


# ------------------------------------------------------------------ only what needs data loads it


def conditional_cifar_resnet(path: Path, padding="zeros") -> Path:
    torch.manual_seed(0)
    kw = dict(in_channels=3, out_channels=3, mode=padding, emb_dim=16, num_layers=1, conditional=True, num_classes=10)
    from edtool.networks.models import build_network

    return checkpoints.save(path, build_network("resnet", **kw), {
        "arch": "resnet", "arch_kwargs": kw, "dataset": "cifar10", "image_shape": [3, 32, 32],
        "conditional": True, "num_classes": 10, "padding": padding})


def test_networks_alone_need_no_data(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    net = conditional_cifar_resnet(tmp_path / "nets" / "cifar_resnet")
    empty = tmp_path / "no-data"
    empty.mkdir()
    code, _, err = cli(capsys, monkeypatch, "compute", "--dataset", "cifar10", "--data-root", empty, "--models",
                       "resnet", "--resnet", net, "--realizations", "3", "--nsteps", "2", "--probes", "2",
                       "--device", "cpu", "--run-dir", tmp_path / "run", "--quiet")
    assert code == 0, err
    run = open_run(tmp_path / "run")
    assert run.done_mask().all() and run.image_shape == (3, 32, 32)
    assert run.labels.tolist() == seed_labels([0, 1, 2], None, None, True, n_classes=10).tolist()
    assert not list(empty.iterdir())  # nothing was fetched or written
    code, _, err = cli(capsys, monkeypatch, "compute", "--dataset", "cifar10", "--data-root", empty, "--models",
                       "resnet,is", "--resnet", net, "--nsteps", "2", "--device", "cpu", "--run-dir",
                       tmp_path / "run2", "--quiet")
    one_line_error(code, err, "CIFAR-10 files not found")
    assert not (tmp_path / "run2" / "ed.zarr").exists()


def test_max_samples_gives_the_machines_the_first_images(tmp_path):
    images, labels = data.load_dataset("mnist5k")
    compute(ComputeConfig(models=["is"], max_samples=20, nsteps=2, device="cpu", run_dir=str(tmp_path / "r")))
    run = open_run(tmp_path / "r")
    assert run.config["max_samples"] == 20
    machine = make_machine("is", images[:20], labels[:20])  # the reference, built independently
    with torch.no_grad():
        want = ddim_sample(lambda t, x: machine.eps(t, x).to(x.dtype), initial_noise(0, (1, 1, 32, 32)), 2)
    np.testing.assert_allclose(run.read("final")[0, 0], want[0].numpy(), rtol=1e-5, atol=1e-6)


def test_first_samples_per_class_against_a_loop():
    labels = torch.tensor([3, 1, 3, 3, 0, 1, 1, 3, 0, 2])
    images = torch.arange(10.0)[:, None]
    for n in (1, 2, 3, 20):
        kept = [i for i in range(10) if sum(1 for j in range(i) if labels[j] == labels[i]) < n]
        x, y = data.first_samples(images, labels, n, per_class=True)
        assert x.flatten().long().tolist() == kept and y.tolist() == labels[kept].tolist()
        assert data.first_samples(images, labels, n)[0].flatten().long().tolist() == list(range(min(n, 10)))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(EdtoolError, match="--max-samples"):
            data.first_samples(images, labels, bad)


# ------------------------------------------------------------------ GPU-ready: what was used is recorded


def test_estimator_and_device_recorded_and_another_resolution_refused(tmp_path, monkeypatch):
    import edtool.jacobian.ed as ed

    monkeypatch.setenv("EDTOOL_CHECKPOINTS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "tiny_resnet", "resnet")
    cfg = dict(models=["resnet", "is"], nsteps=2, probes=2, device="cpu", run_dir=str(tmp_path / "r"))
    compute(ComputeConfig(**cfg))
    config = open_run(tmp_path / "r").config
    assert config["device"] == "cpu" and config["estimator"] == "auto"
    assert config["models"]["resnet"]["estimator"] == "hutchinson"  # 1024 numbers > the CPU's exact limit
    assert config["models"]["is"]["estimator"] == "analytic"
    before = snapshot(tmp_path / "r")
    with monkeypatch.context() as mp:  # what `auto` means on a CUDA device (exact up to 4096 numbers), here
        mp.setitem(ed.EXACT_MAX_N, "cpu", ed.EXACT_MAX_N["cuda"])
        with pytest.raises(EdtoolError, match=r"models\.resnet\.estimator=hutchinson.*models\.resnet\.estimator=exact"):
            compute(ComputeConfig(**cfg))
        with pytest.raises(EdtoolError, match=r"estimator=hutchinson.*exact"):
            compute(ComputeConfig(**cfg, shard=(0, 2)))
    assert snapshot(tmp_path / "r") == before
    # an explicit estimator resolves the same everywhere: that run resumes on the other device kind
    one = {**cfg, "models": ["resnet"], "run_dir": str(tmp_path / "h"), "estimator": "hutchinson", "realizations": 2}
    compute(ComputeConfig(**one, shard=(0, 2)))
    with monkeypatch.context() as mp:
        mp.setitem(ed.EXACT_MAX_N, "cpu", ed.EXACT_MAX_N["cuda"])
        compute(ComputeConfig(**one, shard=(1, 2)))
    run = open_run(tmp_path / "h")
    assert run.done_mask().all() and run.config["models"]["resnet"]["estimator"] == "hutchinson"


def test_shipped_folder_is_package_data_when_installed_and_missing_data_says_so(tmp_path, capsys, monkeypatch):
    from edtool import paths

    assert paths.shipped_dir() == REPO / "checkpoints"  # a checkout (or editable install)
    monkeypatch.setattr(paths, "PACKAGE_DATA", tmp_path / "site" / "edtool" / "_shipped")
    paths.PACKAGE_DATA.mkdir(parents=True)
    assert paths.shipped_dir() == paths.PACKAGE_DATA  # a wheel: edtool/_shipped beside the modules
    shutil.rmtree(paths.PACKAGE_DATA)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "site")  # and no checkout around it: data missing
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDTOOL_CHECKPOINTS", raising=False)
    code, _, err = cli(capsys, monkeypatch, "analyze", "--nsteps", "2", "--models", "unet", "--device", "cpu")
    one_line_error(code, err, "no unet checkpoint", "shipped folder", "reinstall edtool")
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------ full MNIST (../shared/data/mnist)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # the genuine histogram
UNCOMPRESSED_MD5 = {"train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",  # SPEC 6
                    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624"}


def shared_mnist() -> Path:
    """The 70,000-digit data root beside the checkout (or under $EDTOOL_SHARED); skip, saying so, when absent."""
    shared = Path(os.environ.get("EDTOOL_SHARED", REPO.parent / "shared"))
    root = shared / "data" / "mnist"
    if not all((root / "MNIST" / "raw" / name).is_file() for name in UNCOMPRESSED_MD5):
        pytest.skip(f"full MNIST not found in {root} (a copy of shared/ beside the clone, or set EDTOOL_SHARED)")
    return root


def test_full_mnist_from_the_shared_data_root(tmp_path):
    root = shared_mnist()
    for name, md5 in UNCOMPRESSED_MD5.items():  # recompressed files: the uncompressed bytes are the originals
        with gzip.open(root / "MNIST" / "raw" / name) as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, name
    images, labels = data.load_dataset("mnist", root=root, download=False)
    assert images.shape == (60000, 1, 32, 32) and labels.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert -1 <= float(images.min()) < -0.99 and 0.99 < float(images.max()) <= 1
    test_images, _ = data.load_dataset("mnist", root=root, split="test", download=False)
    assert test_images.shape == (10000, 1, 32, 32)
    compute(ComputeConfig(dataset="mnist", data_root=str(root), models=["is"], max_samples=300, nsteps=2,
                          device="cpu", run_dir=str(tmp_path / "r")))
    run = open_run(tmp_path / "r")
    machine = make_machine("is", images[:300])
    with torch.no_grad():
        want = ddim_sample(lambda t, x: machine.eps(t, x).to(x.dtype), initial_noise(0, (1, 1, 32, 32)), 2)
    np.testing.assert_allclose(run.read("final")[0, 0], want[0].numpy(), rtol=1e-5, atol=1e-6)
