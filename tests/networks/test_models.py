"""The networks of SPEC 4: parameter names (so the paper's checkpoints load), shapes, padding
symmetry, conditioning and the eps -> score conversion."""

import math

import pytest
import torch

from edtool.networks.models import EmbeddingModule, Network, build_network


def unet(**kw):
    return build_network("unet", **{"fsizes": [8, 16, 32], "emb_dim": 16, **kw})


def resnet(**kw):
    return build_network("resnet", **{"emb_dim": 16, "num_layers": 4, **kw})


def _eps(net, x, t=0.4, label=None):
    with torch.no_grad():
        return Network(net).eps(torch.tensor(t), x, label)


def test_resnet_state_dict_keys_follow_spec():
    C, W, L = 3, 16, 2
    net = build_network("resnet", in_channels=C, out_channels=C, emb_dim=W, num_layers=L, lastksize=3)
    want = {"up_projection.weight": (W, C, 3, 3), "up_projection.bias": (W,),
            "down_projection.weight": (C, W, 3, 3), "down_projection.bias": (C,)}
    for i in range(L):
        want.update({f"convs.{i}.0.weight": (W, W, 3, 3), f"convs.{i}.0.bias": (W,)})
    for i in range(L + 1):  # one extra embedding added after the loop
        want.update({f"embs.{i}.0.weight": (W, W), f"embs.{i}.0.bias": (W,),
                     f"embs.{i}.1.weight": (W,), f"embs.{i}.1.bias": (W,)})
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == want
    assert "embs.4.0.weight" in resnet().state_dict()


def test_unet_state_dict_keys_follow_spec():
    C, E, f = 1, 16, [8, 16, 32]
    net = build_network("unet", in_channels=C, out_channels=C, fsizes=f, emb_dim=E)

    def ublock(name, cin, cout):
        return {f"{name}.emb.1.weight": (cin, E), f"{name}.emb.1.bias": (cin,),
                f"{name}.model.0.weight": (cout, cin, 3, 3), f"{name}.model.0.bias": (cout,),
                f"{name}.model.2.weight": (cout, cout, 3, 3), f"{name}.model.2.bias": (cout,)}

    want = {**ublock("feature_blocks.0", C, f[0]), **ublock("feature_blocks.1", f[0], f[1]),
            **ublock("bottleneck", f[1], f[2]),
            "upsamples.0.weight": (f[2], f[1], 2, 2), "upsamples.0.bias": (f[1],),
            "upsamples.1.weight": (f[1], f[0], 2, 2), "upsamples.1.bias": (f[0],),
            **ublock("output_blocks.0", 2 * f[1], f[1]), **ublock("output_blocks.1", 2 * f[0], f[0]),
            "last_emb.1.weight": (f[0], E), "last_emb.1.bias": (f[0],),
            "output_conv.weight": (C, f[0], 1, 1), "output_conv.bias": (C,)}
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == want
    cond = unet(conditional=True, num_classes=10).state_dict()
    assert tuple(cond["embedding.class_embeddings.weight"].shape) == (10, 16)


def test_time_embedding_matches_spec_formula():
    E, t = 8, torch.tensor([0.0, 0.25, 1.0])
    d = E // 2
    want = torch.tensor([[f(ti / 10000 ** (j / (d - 1))) for f in (math.sin, math.cos) for j in range(d)]
                         for ti in t.tolist()])
    torch.testing.assert_close(EmbeddingModule(E, 1)(t), want)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32), (1, 28, 28)])
@pytest.mark.parametrize("make", [unet, resnet])
def test_output_shape_equals_input_shape(make, shape):
    net = make(in_channels=shape[0], out_channels=shape[0])
    assert _eps(net, torch.randn(2, *shape)).shape == (2, *shape)


def test_unet_needs_sizes_divisible_by_its_pooling():
    """With L levels the UNet pools L-1 times: H and W must be divisible by 2**(L-1).
    28 works with 3 levels (28 -> 14 -> 7) but not with 4 (7 does not halve)."""
    net = build_network("unet", fsizes=[8, 16, 32, 64], emb_dim=16)
    assert _eps(net, torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises((RuntimeError, ValueError)):
        _eps(net, torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("make, shift", [(resnet, (3, -2)), (unet, (4, -8))])
def test_circular_padding_is_equivariant_under_circular_shifts(make, shift):
    """ResNet: any shift. UNet: shifts by multiples of 2**(levels-1) = 4 (its pooling grid)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    roll = lambda v: torch.roll(v, shifts=shift, dims=(-2, -1))  # noqa: E731
    circ, zero = make(mode="circular"), make(mode="zeros")
    zero.load_state_dict(circ.state_dict())  # same weights, only the padding differs
    out = _eps(circ, x)
    torch.testing.assert_close(_eps(circ, roll(x)), roll(out), rtol=0, atol=1e-5)
    assert (_eps(zero, roll(x)) - roll(_eps(zero, x))).abs().max() > 1e-3
    assert (out - _eps(zero, x)).abs().max() > 1e-3


@pytest.mark.parametrize("make", [unet, resnet])
def test_conditional_networks_require_a_label(make):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    net = make(conditional=True, num_classes=10)
    with pytest.raises(ValueError, match="label"):
        _eps(net, x)
    a, b = _eps(net, x, label=torch.tensor([1, 1])), _eps(net, x, label=torch.tensor([2, 7]))
    assert (a - b).abs().max() > 1e-4
    plain = make()  # an unconditional network ignores labels
    torch.testing.assert_close(_eps(plain, x, label=torch.tensor([1, 2])), _eps(plain, x), rtol=0, atol=0)


def test_score_is_minus_eps_over_sqrt_beta():
    torch.manual_seed(0)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.05, 0.5, 0.97])
    net = Network(unet())
    beta = 1 - torch.cos((t / 1.008) * math.pi / 2) ** 2  # SPEC 2, written out
    with torch.no_grad():
        torch.testing.assert_close(net.score(t, x), -net.eps(t, x) / beta.sqrt()[:, None, None, None])
        # a scalar t is broadcast over the batch
        beta_half = 1 - math.cos(0.5 / 1.008 * math.pi / 2) ** 2
        torch.testing.assert_close(net.score(0.5, x), -net.eps(0.5, x) / math.sqrt(beta_half))
