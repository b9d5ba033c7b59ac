"""The paper's network classes rebuilt from SPEC 4 with the paper's attribute names, independently of
edtool.networks.models, and `save_paper`, which pickles them under the paper's module paths only while
torch.save runs, as the paper's whole-DDIM pickles were made."""

import math
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn


def cosine_noise_schedule(t):
    return 1 - torch.cos(t / 1.008 * math.pi / 2) ** 2


def linear_noise_schedule(t):
    return 0.01 + 0.97 * t


class EmbeddingModule(nn.Module):
    def __init__(self, fdim, channels, conditional=False, num_classes=None):
        super().__init__()
        self.fdim, self.channels, self.conditional = fdim, channels, conditional
        if conditional:
            self.class_embeddings = nn.Embedding(num_classes, fdim)

    def forward(self, t, label=None):
        d = self.fdim // 2
        arg = t[:, None] / (10000 ** (torch.arange(d) / (d - 1)))[None, :]
        emb = torch.cat((torch.sin(arg), torch.cos(arg)), dim=1)
        return emb + self.class_embeddings(label) if self.conditional else emb


def _norm(kind, c):
    return {"Identity": lambda: nn.Identity(), "GroupNorm": lambda: nn.GroupNorm(8, c),
            "BatchNorm": lambda: nn.BatchNorm2d(c)}[kind]()


class UBlock(nn.Module):
    def __init__(self, fin, fout, normalization=None, padding_mode="zeros", emb_dim=32):
        super().__init__()
        self.emb = nn.Sequential(nn.ReLU(), nn.Linear(emb_dim, fin))
        layers = []
        for c in (fin, fout):
            layers.append(nn.Conv2d(c, fout, 3, padding="same", padding_mode=padding_mode))
            if normalization:
                layers.append(_norm(normalization, fout))
            layers.append(nn.ReLU())
        self.model = nn.Sequential(*layers)

    def forward(self, x, e):
        return self.model(x + self.emb(e)[:, :, None, None])


class MinimalUNet(nn.Module):
    def __init__(self, channels=1, fsizes=(8, 16, 32), mode="zeros", conditional=False, num_classes=None,
                 emb_dim=16, normalization=None):
        super().__init__()
        self.fsizes, self.channels, self.conditional, self.emb_dim = list(fsizes), channels, conditional, emb_dim
        self.kernel_size, self.lastksize = 3, 1
        self.embedding = EmbeddingModule(emb_dim, channels, conditional, num_classes)
        ins = [channels] + list(fsizes[:-1])
        blk = dict(normalization=normalization, padding_mode=mode, emb_dim=emb_dim)
        self.feature_blocks = nn.ModuleList(UBlock(ins[i], ins[i + 1], **blk) for i in range(len(fsizes) - 1))
        self.bottleneck = UBlock(fsizes[-2], fsizes[-1], **blk)
        self.output_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i in range(len(fsizes) - 1, 0, -1):
            self.upsamples.append(nn.ConvTranspose2d(fsizes[i], fsizes[i - 1], kernel_size=2, stride=2))
            self.output_blocks.append(UBlock(2 * fsizes[i - 1], fsizes[i - 1], **blk))
        self.last_emb = nn.Sequential(nn.ReLU(), nn.Linear(emb_dim, fsizes[0]))
        self.output_conv = nn.Conv2d(fsizes[0], channels, 1, padding="same", padding_mode=mode)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.last_norm = False

    def forward(self, t, x, label=None):
        e = self.embedding(t, label)
        skips = []
        for block in self.feature_blocks:
            x = block(x, e)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x, e)
        for up, block, skip in zip(self.upsamples, self.output_blocks, skips[::-1]):
            x = block(torch.cat((skip, up(x)), dim=1), e)
        return self.output_conv(x + self.last_emb(e)[:, :, None, None])


class MinimalResNet(nn.Module):
    def __init__(self, channels=1, emb_dim=16, mode="zeros", normalization=None, conditional=False,
                 num_classes=None, num_layers=2, lastksize=1, down_norm=None):
        super().__init__()
        self.channels, self.emb_dim, self.mode, self.conditional = channels, emb_dim, mode, conditional
        self.num_layers, self.num_classes, self.normalization, self.lastksize = num_layers, num_classes, \
            normalization, lastksize
        conv = dict(padding="same", padding_mode=mode)
        self.embedding = EmbeddingModule(emb_dim, channels, conditional, num_classes)
        self.up_projection = nn.Conv2d(channels, emb_dim, 3, **conv)
        self.embs = nn.ModuleList(nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.GroupNorm(8, emb_dim), nn.ReLU())
                                  for _ in range(num_layers + 1))
        mid = [_norm(normalization, emb_dim)] if normalization else []
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(emb_dim, emb_dim, 3, **conv), *mid, nn.ReLU())
                                   for _ in range(num_layers))
        down = nn.Conv2d(emb_dim, channels, lastksize, **conv)
        # down_norm: the paper's variant Sequential(norm, Conv2d); "Identity" is our plain Conv2d
        self.down_projection = nn.Sequential(_norm(down_norm, emb_dim), down) if down_norm else down

    def forward(self, t, x, label=None):
        e = self.embedding(t, label)
        state = self.up_projection(x)
        for i in range(self.num_layers):
            state = state + self.convs[i](state + self.embs[i](e)[:, :, None, None])
        return self.down_projection(state + self.embs[-1](e)[:, :, None, None])


class DDIM(nn.Module):
    def __init__(self, backbone, in_channels=1, noise_schedule=cosine_noise_schedule, default_imsize=16):
        super().__init__()
        self.in_channels, self.default_imsize = in_channels, default_imsize
        self.backbone = backbone
        self.noise_schedule = noise_schedule


class Trojan(nn.Module):
    """A harmless-looking layer that is not one of the paper's classes."""


PAPER_LAYOUTS = {  # module paths the classes are pickled under
    "flat": {"src.models": (DDIM, MinimalUNet, MinimalResNet, UBlock, EmbeddingModule, Trojan)},
    "split": {"src.models.ddim": (DDIM,), "src.models.backbones": (MinimalUNet, MinimalResNet, UBlock,
                                                                     EmbeddingModule, Trojan)},
}


def save_paper(path, obj, layout="flat"):
    """torch.save obj with the paper's classes living under the paper's module paths, then forget them."""
    modules = {**PAPER_LAYOUTS[layout], "src.utils.noise_schedules": (cosine_noise_schedule, linear_noise_schedule)}
    saved = {}
    for name, members in modules.items():
        for parent in [name.rsplit(".", i)[0] for i in range(name.count("."), 0, -1)]:
            saved.setdefault(parent, sys.modules.get(parent))
            sys.modules.setdefault(parent, types.ModuleType(parent))
        saved.setdefault(name, sys.modules.get(name))
        module = sys.modules[name] = types.ModuleType(name)
        for m in members:
            m.__module__, m.__qualname__ = name, m.__name__
            setattr(module, m.__name__, m)
    try:
        torch.save(obj, path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        for members in modules.values():
            for m in members:
                m.__module__ = __name__
    assert "src.models" not in sys.modules and "src" not in sys.modules
    return Path(path)


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)
