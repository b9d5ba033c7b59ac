"""Training: the paper's recipe runs, writes our format, and resumes to the same weights."""

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edtool import checkpoints
from edtool.cli import app
from edtool.train import TrainConfig, train


def _tiny_data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _cfg(**kw):
    return TrainConfig(**{"arch": "unet", "dataset": "tiny", "steps": 6, "batch": 4, "fsizes": [8, 16],
                          "emb_dim": 16, **kw})


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    images, labels = _tiny_data()
    straight = train(_cfg(), images, labels, tmp_path / "a", tmp_path / "wa", ckpt_every=1)
    assert train(_cfg(), images, labels, tmp_path / "b", tmp_path / "wb", ckpt_every=1, stop_after=3) is None
    assert not (tmp_path / "b.safetensors").exists()
    resumed = train(_cfg(), images, labels, tmp_path / "b", tmp_path / "wb", ckpt_every=1)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_training_writes_manifest_loss_curve_and_samples(tmp_path):
    images, labels = _tiny_data()
    path = train(_cfg(conditional=True), images, labels, tmp_path / "m", tmp_path / "w", command="edtool train x")
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["arch"] == "unet" and manifest["conditional"] and manifest["num_classes"] == 3
    assert manifest["image_shape"] == [1, 8, 8] and manifest["training"]["command"] == "edtool train x"
    assert manifest["final_loss"] > 0
    for suffix in ("_loss.png", "_samples.png"):
        assert (tmp_path / f"m{suffix}").stat().st_size > 1000
    net = checkpoints.load(path, dataset="tiny", image_shape=[1, 8, 8])
    x = torch.randn(2, 1, 8, 8)
    assert net.eps(torch.tensor([0.5, 0.5]), x, torch.tensor([0, 2])).shape == x.shape


def test_train_command_on_mnist5k(tmp_path, monkeypatch):
    monkeypatch.setenv("EDTOOL_CHECKPOINTS", str(tmp_path))
    result = CliRunner().invoke(app, ["train", "--arch", "resnet", "--steps", "2", "--batch", "2", "--width", "16",
                                      "--layers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert checkpoints.discover("mnist5k", "resnet", tmp_path).name == "mnist5k_resnet.safetensors"
    bad = CliRunner().invoke(app, ["train", "--arch", "resnet", "--width", "12"])
    assert bad.exit_code != 0


def test_shipped_weights_are_the_moving_average(tmp_path):
    """One step: EMA = d * initial + (1 - d) * trained, with the warm-up decay d = min(decay, 2/11)."""
    from edtool.models import build_network
    from edtool.train import arch_kwargs, ema_decay

    images, labels = _tiny_data()
    cfg_raw, cfg_ema = _cfg(steps=1, ema_decay=0.0), _cfg(steps=1, ema_decay=0.999)
    raw = load_file(str(train(cfg_raw, images, labels, tmp_path / "raw", tmp_path / "wr")))
    ema = load_file(str(train(cfg_ema, images, labels, tmp_path / "ema", tmp_path / "we")))
    torch.manual_seed(0)
    init = build_network("unet", **arch_kwargs(cfg_raw, 1, None)).state_dict()
    d = ema_decay(0.999, 1)
    assert abs(d - 2 / 11) < 1e-12
    changed = 0
    for k in raw:
        assert torch.allclose(ema[k], d * init[k] + (1 - d) * raw[k], atol=1e-6), k
        changed += int(not torch.equal(raw[k], init[k]))
    assert changed > 0  # the step moved the weights, so the check above compares different tensors
    manifest = json.loads((tmp_path / "ema.json").read_text())
    assert manifest["weights"] == "ema" and set(manifest["eval_loss"]) == {"raw", "ema"}
