"""Our checkpoint format (save/load/discover) and the safe import of the paper's pickles and scales.

The paper-like networks are tests/paper_networks.py's, written from SPEC 4 with the paper's attribute
names independently of edtool.networks.models, pickled under the paper's module paths as the paper's
whole-DDIM pickles were made.
"""

import json
import sys

import pytest
import torch
from torch import nn

from edtool.networks import checkpoints
from edtool.networks import discovery
from edtool.cli import main
from edtool.errors import EdtoolError
from edtool.networks.models import build_network
from edtool.networks.paper_import import import_checkpoint, read_paper_pickle
from edtool.els.schedule import read_scales, write_scales_json
from paper_networks import DDIM, MinimalResNet, MinimalUNet, Trojan, _RunsCode, linear_noise_schedule, save_paper
from helpers import SHARED

REFERENCE_SCALES = SHARED / "reference" / "paper_scales.json"


def _eps_pair(original: nn.Module, network, shape, conditional=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, *shape), generator=g)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    label = torch.tensor([0, 3, 1, 2]) if conditional else None
    with torch.no_grad():
        return original.eval()(t, x, label), network.eps(t, x, label)


# ---------------------------------------------------------------- importing paper checkpoints

@pytest.mark.parametrize("layout", ["flat", "split"])
def test_import_paper_unet_gives_same_eps(tmp_path, layout):
    torch.manual_seed(0)
    ddim = DDIM(MinimalUNet(channels=1, fsizes=(8, 16, 32), emb_dim=16))
    src = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", ddim, layout)
    out = import_checkpoint(src, out=tmp_path / "out" / "net")
    assert "src" not in sys.modules  # nothing from the paper's code was imported
    net = checkpoints.load(out, dataset="mnist", image_shape=[1, 16, 16])
    m = net.manifest
    assert (m["arch"], m["dataset"], m["padding"], m["conditional"]) == ("unet", "mnist", "zeros", False)
    assert m["arch_kwargs"]["fsizes"] == [8, 16, 32] and m["arch_kwargs"]["emb_dim"] == 16
    assert m["imported_from"]["file"] == src.name
    assert m["imported_from"]["sha256"] == checkpoints.file_hash(src)
    want, got = _eps_pair(ddim.backbone, net, (1, 16, 16))
    assert want.abs().mean() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("down_norm", [None, "Identity"])
def test_import_paper_resnet_circular_conditional(tmp_path, monkeypatch, down_norm):
    monkeypatch.chdir(tmp_path)  # the default output is ./checkpoints
    torch.manual_seed(0)
    backbone = MinimalResNet(channels=3, emb_dim=16, mode="circular", conditional=True, num_classes=10,
                             num_layers=3, lastksize=3, down_norm=down_norm)
    src = save_paper(tmp_path / "backbone_CIFAR10_ResNet_circular_conditional.pt", DDIM(backbone, 3, default_imsize=8))
    out = import_checkpoint(src)
    assert out == tmp_path / "checkpoints" / "cifar10_resnet_circular_conditional_paper.safetensors"
    net = checkpoints.load(out, dataset="cifar10", image_shape=[3, 8, 8])
    kw = net.manifest["arch_kwargs"]
    assert (kw["num_layers"], kw["lastksize"], kw["num_classes"], kw["mode"]) == (3, 3, 10, "circular")
    want, got = _eps_pair(backbone, net, (3, 8, 8), conditional=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_read_paper_pickle_reports_settings_and_our_key_names(tmp_path):
    ddim = DDIM(MinimalResNet(channels=1, emb_dim=16, num_layers=2, down_norm="Identity"))
    paper = read_paper_pickle(save_paper(tmp_path / "backbone_MNIST_ResNet_zeros.pt", ddim))
    assert paper.arch == "resnet" and paper.image_size == 16
    assert paper.settings["emb_dim"] == 16 and paper.settings["num_layers"] == 2
    # Sequential(Identity, Conv2d) is our plain down_projection conv
    want = {k.replace("down_projection.1.", "down_projection."): v for k, v in ddim.backbone.state_dict().items()}
    assert set(paper.state_dict) == set(want)
    assert all(torch.equal(paper.state_dict[k], want[k]) for k in want)


@pytest.mark.parametrize("backbone, words", [
    (lambda: MinimalResNet(normalization="GroupNorm", down_norm="GroupNorm"), ["normalization", "GroupNorm"]),
    (lambda: MinimalUNet(normalization="BatchNorm"), ["'bottleneck.model.1' is BatchNorm2d", "ReLU"]),
])
def test_import_refuses_normalized_networks(tmp_path, backbone, words):
    src = save_paper(tmp_path / "backbone_MNIST_X_zeros.pt", DDIM(backbone()))
    with pytest.raises(EdtoolError) as e:
        import_checkpoint(src, out=tmp_path / "o", dataset="mnist")
    assert all(w in str(e.value) for w in words) and str(src) in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_import_refuses_a_norm_layer_our_architecture_lacks(tmp_path):
    """Without the normalization attribute, the layer-by-layer comparison names the layer."""
    backbone = MinimalResNet(down_norm="BatchNorm")
    del backbone.normalization
    src = save_paper(tmp_path / "backbone_MNIST_ResNet_zeros.pt", DDIM(backbone))
    with pytest.raises(EdtoolError, match=r"'down_projection'.*Sequential.*Conv2d"):
        import_checkpoint(src, out=tmp_path / "o")


def test_import_refuses_settings_that_contradict_the_layers(tmp_path):
    lying = MinimalResNet(num_layers=2)
    lying.num_layers = 3  # the paper's forward would loop 3 times over 2 convs
    src = save_paper(tmp_path / "backbone_MNIST_ResNet_zeros.pt", DDIM(lying))
    with pytest.raises(EdtoolError, match=r"'convs.2' is absent in the paper's network"):
        import_checkpoint(src, out=tmp_path / "o")
    odd = MinimalUNet()
    odd.fsizes = "abc"
    src = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", DDIM(odd))
    with pytest.raises(EdtoolError, match="not a paper checkpoint edtool can import"):
        import_checkpoint(src, out=tmp_path / "o")


def test_import_refuses_other_noise_schedule(tmp_path):
    src = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", DDIM(MinimalUNet(), noise_schedule=linear_noise_schedule))
    with pytest.raises(EdtoolError, match="linear_noise_schedule"):
        import_checkpoint(src, out=tmp_path / "o")


def test_import_refuses_unknown_class_without_unpickling(tmp_path):
    ddim = DDIM(MinimalUNet())
    ddim.extra = Trojan()
    src = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", ddim)
    with pytest.raises(EdtoolError, match=r"src\.models\.Trojan"):
        import_checkpoint(src, out=tmp_path / "o")


@pytest.mark.parametrize("where", ["inside", "whole"])
def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, where):
    target = tmp_path / "pwned"
    ddim = DDIM(MinimalUNet())
    ddim.__dict__["payload"] = _RunsCode(target)
    src = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", ddim if where == "inside" else _RunsCode(target))
    with pytest.raises(EdtoolError, match="system") as e:
        import_checkpoint(src, out=tmp_path / "o")
    assert str(src) in str(e.value)
    assert not target.exists()
    with pytest.raises(EdtoolError):
        read_scales(src)
    assert not target.exists()
    if where == "whole":  # the payload is real: an ordinary unpickling runs it
        torch.load(src, weights_only=False)
        assert target.exists()


def test_import_refuses_non_checkpoints_and_unknown_dataset(tmp_path):
    junk = tmp_path / "backbone_MNIST_UNet_zeros.pt"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(EdtoolError, match="torch.save"):
        import_checkpoint(junk)
    sd = save_paper(tmp_path / "backbone_MNIST_ResNet_zeros.pt", MinimalResNet().state_dict())
    with pytest.raises(EdtoolError, match="not a pickled DDIM"):
        import_checkpoint(sd)
    odd = save_paper(tmp_path / "mynet.pt", DDIM(MinimalUNet()))
    with pytest.raises(EdtoolError, match="--dataset"):
        import_checkpoint(odd)
    with pytest.raises(EdtoolError, match="does not exist"):
        import_checkpoint(tmp_path / "backbone_MNIST_UNet_zeros_missing.pt")
    out = import_checkpoint(odd, out=tmp_path / "o", dataset="fashionmnist")
    assert checkpoints.read_manifest(out)["dataset"] == "fashionmnist"


def test_cli_import_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output is ./checkpoints
    src = save_paper(tmp_path / "backbone_FashionMNIST_UNet_zeros_conditonal.pt",
                     DDIM(MinimalUNet(conditional=True, num_classes=10)))
    monkeypatch.setattr(sys, "argv", ["edtool", "import-checkpoint", str(src)])
    main()
    out = tmp_path / "checkpoints" / "fashionmnist_unet_conditional_paper.safetensors"
    assert str(out) in capsys.readouterr().out
    assert out.exists() and checkpoints.read_manifest(out)["conditional"] is True
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:  # a second import does not replace it without --force
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(out) in err and "--force" in err
    assert out.read_bytes() == before
    monkeypatch.setattr(sys, "argv", ["edtool", "import-checkpoint", str(src), "--force"])
    main()
    assert str(out) in capsys.readouterr().out

    bad = tmp_path / "backbone_MNIST_UNet_zeros.pt"
    bad.write_bytes(b"garbage")
    monkeypatch.setattr(sys, "argv", ["edtool", "import-checkpoint", str(bad)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edtool: error:") and str(bad) in err


# ---------------------------------------------------------------- scales

def _reference_scales():
    """The paper's ten scale lists (../shared/reference/paper_scales.json); skip when absent."""
    if not REFERENCE_SCALES.exists():
        pytest.skip(f"{REFERENCE_SCALES} not found (set EDTOOL_SHARED to the shared folder)")
    return json.loads(REFERENCE_SCALES.read_text())["scales"]


def test_reference_scales_read_back_from_pt_and_json(tmp_path):
    lists = _reference_scales()
    assert len(lists) == 10
    for name, scales in lists.items():
        assert len(scales) == 20
        torch.save(scales, tmp_path / f"{name}.pt")
        assert read_scales(tmp_path / f"{name}.pt") == scales
        write_scales_json(tmp_path / f"{name}.json", scales, network="paper", nsteps=20)
        assert read_scales(tmp_path / f"{name}.json") == scales
        assert json.loads((tmp_path / f"{name}.json").read_text())["network"] == "paper"
    torch.save(torch.tensor([3, 5, 7]), tmp_path / "t.pt")
    assert read_scales(tmp_path / "t.pt") == [3, 5, 7]


@pytest.mark.parametrize("value, words", [
    ([3, 4, 5], "entry 1 is 4"), ([], "non-empty"), ([0, 3], "entry 0"), ([-3], "entry 0"), ([3.0], "entry 0"),
    ([True], "entry 0"), (torch.tensor([3.0, 5.0]), "float"), (torch.ones(2, 2, dtype=torch.long), "shape"),
    ({"scales": [3]}, "non-empty list"), (nn.Linear(2, 2), "not a plain list"),
])
def test_invalid_scales_refused(tmp_path, value, words):
    path = tmp_path / "scales_bad.pt"
    torch.save(value, path)
    with pytest.raises(EdtoolError, match=words) as e:
        read_scales(path)
    assert str(path) in str(e.value)


def test_invalid_scales_json_refused(tmp_path):
    for text, words in [('{"k": [3]}', "no \"scales\""), ("[3, 5]", "no \"scales\""), ("{oops", "not valid JSON"),
                        ('{"scales": [3, 6]}', "odd")]:
        path = tmp_path / "s.json"
        path.write_text(text)
        with pytest.raises(EdtoolError, match=words):
            read_scales(path)
    with pytest.raises(EdtoolError, match="odd"):
        write_scales_json(tmp_path / "w.json", [3, 2])


# ---------------------------------------------------------------- our format

MANIFEST = {"arch": "unet", "arch_kwargs": {"fsizes": [8, 16], "emb_dim": 16}, "dataset": "mnist5k",
            "image_shape": [1, 16, 16], "conditional": False, "padding": "zeros"}


def _saved(tmp_path, name="net", manifest=MANIFEST):
    torch.manual_seed(0)
    net = build_network(manifest["arch"], **manifest["arch_kwargs"])
    return net, checkpoints.save(tmp_path / name, net, manifest)


def test_save_load_round_trip(tmp_path):
    net, path = _saved(tmp_path)
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    loaded = checkpoints.load(path, dataset="mnist5k", image_shape=[1, 16, 16])
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(loaded.eps(t, x), net.eval()(x, t))
    assert loaded.manifest["format"] == "edtool-checkpoint" and loaded.manifest["dataset"] == "mnist5k"
    assert checkpoints.load(tmp_path / "net").manifest["arch"] == "unet"  # suffix optional


def test_load_refuses_mismatch_and_broken_files(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(EdtoolError, match=r"'mnist5k'.*'cifar10'"):
        checkpoints.load(path, dataset="cifar10")
    with pytest.raises(EdtoolError, match=r"\[1, 16, 16\].*\[3, 32, 32\]"):
        checkpoints.load(path, image_shape=(3, 32, 32))
    with pytest.raises(EdtoolError, match="paper checkpoint.*does not exist"):
        discovery.load(tmp_path / "backbone_MNIST_UNet_zeros.pt")
    with pytest.raises(EdtoolError, match="does not exist"):
        checkpoints.load(tmp_path / "nothere.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    path.with_suffix(".json").replace(corrupt.with_suffix(".json"))
    with pytest.raises(EdtoolError, match="could not be loaded"):
        checkpoints.load(corrupt)
    with pytest.raises(EdtoolError, match="manifest.*missing"):
        checkpoints.load(path)  # its manifest moved away
    _, other = _saved(tmp_path, "other", dict(MANIFEST, arch_kwargs={"fsizes": [8, 32], "emb_dim": 16}))
    path.with_suffix(".json").write_text(other.with_suffix(".json").read_text())
    with pytest.raises(EdtoolError, match="does not hold the weights of the unet") as e:  # weights that do not
        checkpoints.load(path)                                                               # fit the manifest
    assert "5 of other shapes, e.g. 'bottleneck.model.0.weight'" in str(e.value) and len(str(e.value)) < 300


def test_discover_reads_manifests_not_names(tmp_path):
    resnet = dict(MANIFEST, arch="resnet", arch_kwargs={"emb_dim": 16, "num_layers": 1})
    _saved(tmp_path, "mnist5k_unet", resnet)  # a misleading name: it is a resnet
    _, unet = _saved(tmp_path, "weights_a", MANIFEST)
    _, cond = _saved(tmp_path, "weights_b", dict(MANIFEST, conditional=True))
    (tmp_path / "notes.json").write_text("{not json")
    assert discovery.discover("mnist5k", "unet", tmp_path, conditional=False) == unet
    assert discovery.discover("mnist5k", "unet", tmp_path, conditional=True) == cond
    assert discovery.discover("mnist5k", "resnet", tmp_path) == tmp_path / "mnist5k_unet.safetensors"
    with pytest.raises(EdtoolError, match=r"edtool train --arch unet --dataset cifar10"):
        discovery.discover("cifar10", "unet", tmp_path)
    cond.unlink()  # a manifest without its weights is not a checkpoint
    with pytest.raises(EdtoolError, match="no unet checkpoint"):
        discovery.discover("mnist5k", "unet", tmp_path, conditional=True)


def test_a_damaged_cached_import_is_rebuilt_not_used(tmp_path, monkeypatch):
    """Flipped bytes in cache/checkpoints/*.safetensors (an on-the-fly paper import) are noticed by the
    weights' hash recorded at import and the import is redone, with one line saying so."""
    from edtool.networks.paper_import import cached_import

    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    ddim = DDIM(MinimalUNet(channels=1, fsizes=(8, 16, 32), emb_dim=16))
    src = save_paper(tmp_path / "backbone_MNIST_UNet_zeros.pt", ddim)
    out, line = cached_import(src)
    good = out.read_bytes()
    assert "imported through the allow-list" in line and "was damaged" not in line
    assert "using its import cached" in cached_import(src)[1]
    data = bytearray(good)
    data[-8] ^= 0x40  # a weight's bits, not the header: still a loadable file, with other numbers
    out.write_bytes(bytes(data))
    again, line = cached_import(src)
    assert again == out and "was damaged" in line and out.read_bytes() == good


def test_a_damaged_data_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    from edtool import data

    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 16)
    prepare = lambda paths: (torch.tensor(list(paths[0].read_bytes()), dtype=torch.float32).view(16, 16, 4, 4),
                             torch.arange(16) % 10)
    images, labels = data.cached("toy", "train", [src], prepare)
    entry = next((tmp_path / "cache" / "data").glob("toy-train-*.pt"))
    raw = bytearray(entry.read_bytes())
    at = raw.find(torch.tensor(200.0).numpy().tobytes())  # one stored pixel's float32 bytes
    raw[at + 3] ^= 0x01
    entry.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        again, again_labels = data.cached("toy", "train", [src], prepare)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
