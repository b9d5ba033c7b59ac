"""The ScoreModel contract (edtool.model), run on every kind of source through the same test: edtool's networks
(built in code and loaded from a checkpoint, the path paper imports end on), a diffusers UNet2DModel, a `py:` entry
point and the ELS machines. Each kind is a tiny instance at 1 x 6 x 6 (machines) or 1 x 8 x 8 (networks), in
float64, so that autograd's dense Jacobian is the independent truth for a closed form."""

import json
import math
import sys
import textwrap

import pytest
import torch

from edtool.diffusion import alpha_bar
from edtool.els.factory import make_machine
from edtool.jacobian.operators import FieldJacobian, closed_form_operator, jacobian_operator
from edtool.model import MANIFEST_KEYS, ScoreField, ScoreModel
from edtool.networks import checkpoints, discovery
from edtool.networks.models import Network, build_network
from edtool.networks.sources import load_source

f64 = torch.float64

ENTRY_MODULE = """
import torch


class Quadratic:
    '''s(x) = -(x - m_label) / v + A (x - m_label) / 10 on 1 x 8 x 8 images, per class: not a gradient.'''

    image_shape = (1, 8, 8)
    num_classes = 3

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.means = torch.randn(3, 64, generator=g, dtype=torch.float64)
        self.A = torch.randn(64, 64, generator=g, dtype=torch.float64)

    def score(self, t, x, label=None):
        d = x.flatten(1) - self.means[label].to(x.dtype)
        return (-d + d @ self.A.T.to(x.dtype) / 10).reshape(x.shape)
"""


def _tiny_net(arch, conditional):
    torch.manual_seed(0)
    kw = dict(in_channels=1, out_channels=1, conditional=conditional, num_classes=3 if conditional else None)
    kw.update(dict(emb_dim=16, num_layers=1) if arch == "resnet" else dict(fsizes=(8, 16), emb_dim=16))
    return build_network(arch, **kw), kw


def network(tmp_path, monkeypatch):
    return Network(_tiny_net("resnet", conditional=True)[0], {"image_shape": [1, 8, 8]})  # the rest read off it


def checkpoint(tmp_path, monkeypatch):
    net, kw = _tiny_net("unet", conditional=False)
    path = checkpoints.save(tmp_path / "tiny_unet", net, {
        "arch": "unet", "arch_kwargs": kw, "dataset": "mnist", "image_shape": [1, 8, 8], "conditional": False,
        "num_classes": None, "padding": "zeros"})
    return discovery.load(path)


def diffusers_unet(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3)
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(
        tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return load_source(str(tmp_path))[0]


def entry_point(tmp_path, monkeypatch):
    (tmp_path / "contract_mod.py").write_text(textwrap.dedent(ENTRY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("contract_mod", None)
    return load_source("py:contract_mod:Quadratic")[0]


def _images():
    g = torch.Generator().manual_seed(2)
    return torch.rand(24, 1, 6, 6, generator=g, dtype=f64) * 2 - 1, torch.arange(24) % 3


def ideal(tmp_path, monkeypatch):
    return make_machine("is", *_images())


def els_borders(tmp_path, monkeypatch):
    return make_machine("els-borders", *_images(), scales=[3, 5])


def els_circular(tmp_path, monkeypatch):
    return make_machine("els-circular", _images()[0], patch_size=3)


KINDS = [network, checkpoint, diffusers_unet, entry_point, ideal, els_borders, els_circular]


@pytest.fixture(params=KINDS, ids=[k.__name__ for k in KINDS])
def model(request, tmp_path, monkeypatch):
    return request.param(tmp_path, monkeypatch).to(dtype=f64)


def _inputs(model):
    C, H, W = model.manifest["image_shape"]
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(4), dtype=f64)
    label = torch.tensor([0, 2, 1]) if model.conditional else None
    return torch.full((3,), 0.6, dtype=f64), x, label


def test_the_model_says_what_it_is(model):
    assert ScoreModel in type(model).__mro__  # satisfied explicitly, not by coincidence of names
    assert isinstance(model.name, str) and model.name and isinstance(model.conditional, bool)
    assert set(MANIFEST_KEYS) <= set(model.manifest)
    assert model.manifest["padding"] in ("zeros", "circular")
    C, H, W = model.manifest["image_shape"]
    assert min(C, H, W) > 0
    n = model.manifest["num_classes"]
    assert (n is None) != model.conditional and (n is None or (isinstance(n, int) and n > 1))


def test_score_is_minus_eps_over_the_noise_level(model):
    t, x, label = _inputs(model)
    with torch.no_grad():
        eps, score = model.eps(t, x, label), model.score(t, x, label)
    assert eps.shape == score.shape == x.shape and eps.dtype == score.dtype == f64
    assert bool(torch.isfinite(score).all()) and score.abs().max() > 0
    sigma = (1 - alpha_bar(t)).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(score, -eps / sigma, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.score(0.6, x, label), score, rtol=1e-12, atol=1e-12)  # a float t is every t


def test_a_conditional_model_takes_the_label(model):
    t, x, label = _inputs(model)
    if not model.conditional:
        pytest.skip("unconditional: callers pass label=None")
    with torch.no_grad():
        s, other = model.score(t, x, label), model.score(t, x, (label + 1) % model.manifest["num_classes"])
        alone = model.score(t[1:2], x[1:2], label[1:2])
    assert not torch.allclose(s, other)  # the label is really used, sample by sample
    torch.testing.assert_close(alone, s[1:2], rtol=1e-10, atol=1e-10)


def test_to_moves_the_model_and_returns_it(model):
    t, x, label = _inputs(model)
    assert model.to(dtype=torch.float32) is model
    with torch.no_grad():
        s32 = model.score(t, x.float(), label)
    assert s32.dtype == torch.float32
    model.to(dtype=f64)
    with torch.no_grad():
        torch.testing.assert_close(s32.double(), model.score(t, x, label), rtol=1e-3, atol=1e-3)


def test_field_is_the_score_and_its_closed_form_is_autograds_jacobian(model):
    """field(t)(x) == score(t, x); a closed form (the machines') equals autograd's dense Jacobian and brings
    the score or nothing; without one, jacobian_operator differentiates the field."""
    t, x, label = _inputs(model)
    field = model.field(t, label)
    assert isinstance(field, ScoreField)
    with torch.no_grad():
        torch.testing.assert_close(field(x), model.score(t, x, label), rtol=0, atol=0)
    rows = [torch.func.jacrev(lambda v: model.score(t[b:b + 1], v[None], None if label is None else label[b:b + 1])[0])
            (x[b]).reshape(x[0].numel(), -1) for b in range(3)]
    truth = torch.stack(rows)
    closed = field.closed_form(x)
    machine = model.name in ("is", "els-borders", "els-circular")
    assert (closed is not None) == machine  # exactly the machines bring a closed form
    op = jacobian_operator(field, x)
    if closed is None:
        assert isinstance(op, FieldJacobian)
    else:
        assert closed.padding == model.manifest["padding"]
        if closed.score is not None:
            torch.testing.assert_close(closed.score, model.score(t, x, label), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(closed_form_operator(closed, x.shape[1:]).dense(), truth, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(op.dense(), truth, rtol=1e-8, atol=1e-8)
    assert math.prod(op.shape) == x[0].numel() and op.batch == 3
