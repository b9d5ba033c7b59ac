"""The paper's score networks (SPEC 4), with its parameter names so its checkpoints load.

Both networks predict the noise eps_hat(x, t, label); `Network` wraps one with the
diffusion conventions as an `edtool.model.ScoreModel`, like every other source of scores.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from edtool.diffusion import eps_to_score
from edtool.model import ScoreModel


class EmbeddingModule(nn.Module):
    """Sinusoidal time embedding of dimension E (+ a learned class embedding if conditional)."""

    def __init__(self, fdim: int, channels: int, conditional: bool = False, num_classes: Optional[int] = None):
        super().__init__()
        self.fdim, self.channels, self.conditional = fdim, channels, conditional
        if conditional:
            self.class_embeddings = nn.Embedding(num_classes, fdim)

    def forward(self, t: Tensor, label: Optional[Tensor] = None) -> Tensor:
        d = self.fdim // 2
        freqs = 10000 ** (torch.arange(d, device=t.device, dtype=t.dtype) / (d - 1))
        targ = t[:, None] / freqs[None, :]
        emb = torch.cat((torch.sin(targ), torch.cos(targ)), dim=1)
        if self.conditional:
            if label is None:
                raise ValueError("this network is class-conditional: pass a label")
            emb = emb + self.class_embeddings(label)
        return emb


class MinimalResNet(nn.Module):
    """Residual stack of same-size convs with the time embedding added before each layer."""

    def __init__(self, in_channels=1, out_channels=1, emb_dim=128, mode="zeros", conditional=False,
                 num_classes=None, kernel_size=3, num_layers=6, lastksize=1):
        super().__init__()
        assert in_channels == out_channels
        C, W = in_channels, emb_dim
        self.channels, self.emb_dim, self.mode, self.num_layers = C, W, mode, num_layers
        self.conditional = conditional
        self.embedding = EmbeddingModule(W, C, conditional=conditional, num_classes=num_classes)
        self.up_projection = nn.Conv2d(C, W, kernel_size, padding="same", padding_mode=mode)
        self.embs = nn.ModuleList(
            nn.Sequential(nn.Linear(W, W), nn.GroupNorm(8, W), nn.ReLU()) for _ in range(num_layers + 1)
        )
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(W, W, kernel_size, padding="same", padding_mode=mode), nn.ReLU())
            for _ in range(num_layers)
        )
        self.down_projection = nn.Conv2d(W, C, lastksize, padding="same", padding_mode=mode)

    def forward(self, x: Tensor, t: Tensor, label: Optional[Tensor] = None) -> Tensor:
        e = self.embedding(t, label)
        state = self.up_projection(x)
        for i in range(self.num_layers):
            state = state + self.convs[i](state + self.embs[i](e)[:, :, None, None])
        state = state + self.embs[self.num_layers](e)[:, :, None, None]
        return self.down_projection(state)


class UBlock(nn.Module):
    """Two 3x3 conv + ReLU layers applied to x plus a projected time embedding."""

    def __init__(self, infeatures, outfeatures, kernel_size=3, padding_mode="zeros", emb_dim=256):
        super().__init__()
        self.emb = nn.Sequential(nn.ReLU(), nn.Linear(emb_dim, infeatures))
        self.model = nn.Sequential(
            nn.Conv2d(infeatures, outfeatures, kernel_size, padding="same", padding_mode=padding_mode), nn.ReLU(),
            nn.Conv2d(outfeatures, outfeatures, kernel_size, padding="same", padding_mode=padding_mode), nn.ReLU(),
        )

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        return self.model(x + self.emb(e)[:, :, None, None])


class MinimalUNet(nn.Module):
    """Encoder (UBlock + 2x2 max-pool), bottleneck, decoder (transposed conv + skip + UBlock)."""

    def __init__(self, in_channels=1, out_channels=1, fsizes: Sequence[int] = (32, 64, 128), mode="zeros",
                 conditional=False, num_classes=None, emb_dim=256, kernel_size=3, lastksize=1):
        super().__init__()
        assert in_channels == out_channels
        C, fsizes = in_channels, list(fsizes)
        self.channels, self.fsizes, self.conditional = C, fsizes, conditional
        self.embedding = EmbeddingModule(emb_dim, C, conditional=conditional, num_classes=num_classes)
        block = dict(kernel_size=kernel_size, padding_mode=mode, emb_dim=emb_dim)
        chans = [C] + fsizes[:-1]
        self.feature_blocks = nn.ModuleList(UBlock(chans[i], chans[i + 1], **block) for i in range(len(fsizes) - 1))
        self.bottleneck = UBlock(fsizes[-2], fsizes[-1], **block)
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose2d(fsizes[i], fsizes[i - 1], kernel_size=2, stride=2) for i in range(len(fsizes) - 1, 0, -1)
        )
        self.output_blocks = nn.ModuleList(
            UBlock(2 * fsizes[i - 1], fsizes[i - 1], **block) for i in range(len(fsizes) - 1, 0, -1)
        )
        self.last_emb = nn.Sequential(nn.ReLU(), nn.Linear(emb_dim, fsizes[0]))
        self.output_conv = nn.Conv2d(fsizes[0], C, lastksize, padding="same", padding_mode=mode)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: Tensor, t: Tensor, label: Optional[Tensor] = None) -> Tensor:
        e = self.embedding(t, label)
        skips = []
        for down in self.feature_blocks:
            x = down(x, e)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x, e)
        for up, block, skip in zip(self.upsamples, self.output_blocks, reversed(skips)):
            x = block(torch.cat((skip, up(x)), dim=1), e)
        return self.output_conv(x + self.last_emb(e)[:, :, None, None])


ARCHITECTURES = {"unet": MinimalUNet, "resnet": MinimalResNet}


def build_network(arch: str, **kwargs) -> nn.Module:
    """Instantiate an architecture by name ('unet' or 'resnet') with its keyword arguments."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


class Network(ScoreModel):
    """A trained noise predictor (MinimalUNet or MinimalResNet) as a ScoreModel. `manifest` is its
    checkpoint's; without one (a network built in code) the keys every ScoreModel has are read off the
    network, image_shape None."""

    def __init__(self, net: nn.Module, manifest: Optional[dict] = None):
        self.net = net.eval()
        self.conditional = net.conditional
        embedding = net.embedding.class_embeddings if net.conditional else None
        padding = next(m.padding_mode for m in net.modules() if isinstance(m, nn.Conv2d))
        own = {"arch": type(net).__name__, "image_shape": None, "padding": padding,
               "num_classes": None if embedding is None else embedding.num_embeddings}
        self.manifest = {**own, **(manifest or {})}

    @property
    def name(self) -> str:
        return self.manifest["arch"]

    def to(self, device=None, dtype=None) -> "Network":
        self.net.to(device=device, dtype=dtype)
        return self

    def eps(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.net(x, t, label if self.conditional else None)

    def score(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return eps_to_score(self.eps(t, x, label), t)
