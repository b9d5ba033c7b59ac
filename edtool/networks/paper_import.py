"""Import the paper's checkpoints safely (SPEC 4); its scale lists are read by `edtool.els.schedule`.

A paper checkpoint `backbone_<DATASET>_<UNet|ResNet>_<mode>[_conditional].pt` is a pickle of a
whole `DDIM` module. Unpickling it normally would import the paper's code and could run
anything the file asks for. Here it is read with torch's weights-only unpickler, which only
builds tensors and plain containers, plus inert stand-ins for an explicit allow-list of class
names (the paper's DDIM, MinimalUNet, MinimalResNet, UBlock, EmbeddingModule and the torch.nn
layers they use). A stand-in only collects the pickled attributes; nothing else is unpickled
and no code from the file runs. The backbone's weights are then matched layer by layer onto
`edtool.networks.models` and written in our format (safetensors + manifest).
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from edtool.networks import checkpoints
from edtool.errors import EdtoolError
from edtool.fileio import check_output
from edtool.networks.models import build_network
from edtool.paths import cache_dir, local_checkpoints_dir

PAPER_CLASSES = ("DDIM", "MinimalUNet", "MinimalResNet", "UBlock", "EmbeddingModule")
TORCH_LAYERS = ("Conv2d", "ConvTranspose2d", "Linear", "Sequential", "ModuleList", "GroupNorm", "ReLU",
                "MaxPool2d", "Embedding", "Identity",
                # read so that the refusal can name them; edtool's networks have no such layers
                "BatchNorm2d", "LayerNorm", "LocalResponseNorm")
NOISE_SCHEDULES = ("cosine_noise_schedule", "linear_noise_schedule", "exponential_schedule")
PAPER_DATASETS = {"MNIST": "mnist", "FashionMNIST": "fashionmnist", "CIFAR10": "cifar10", "CelebA": "celeba"}
_NAME = re.compile(r"backbone_(?P<dataset>[A-Za-z0-9]+)_(?P<arch>UNet|ResNet)_(?P<mode>zeros|circular)")
# the paper's names, conditional spelled as in its files (some read "conditonal")
_FULL_NAME = re.compile(r"(?P<kind>backbone|scales)_(?P<dataset>[A-Za-z0-9]+)_(?P<arch>UNet|ResNet)_"
                        r"(?P<mode>zeros|circular)(?P<conditional>_conditi?onal)?\.pt")

# Per-layer settings that change the computation; they must equal those of our layer.
_LAYER_SETTINGS = {
    "Conv2d": ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    "ConvTranspose2d": ("kernel_size", "stride", "padding", "output_padding", "dilation", "groups"),
    "GroupNorm": ("num_groups", "num_channels", "eps", "affine"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "EmbeddingModule": ("fdim", "conditional"),
}


class _Inert:
    """Stand-in for an allow-listed pickled class: keeps the pickled attributes, runs nothing."""

    pickled_as = "?"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state for {self.pickled_as}")
        self.__dict__.update(state)


class PaperBackbone(NamedTuple):
    """What a paper checkpoint holds: its backbone's architecture, weights and settings."""

    arch: str  # "unet" or "resnet"
    state_dict: dict  # our key names (edtool.networks.models), i.e. the pickled keys without "backbone."
    settings: dict  # our constructor arguments, from the pickled attributes or else the weight shapes
    layers: dict  # our module path -> pickled layer (an inert stand-in); "" is the backbone
    image_size: Optional[int]  # the DDIM's default_imsize, if pickled


def _allowed(full_name: str) -> bool:
    module, _, name = full_name.rpartition(".")
    if name in TORCH_LAYERS:
        return module.startswith("torch.nn.modules.")
    return name in PAPER_CLASSES or name in NOISE_SCHEDULES


def _stand_ins(path: Path) -> list:
    """One inert stand-in class per global the file names; refuse any global outside the allow-list."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a zip written by torch.save, or a torchscript archive
        raise EdtoolError(f"{path} is not a checkpoint written by torch.save ({e})") from None
    refused = sorted(n for n in names if not _allowed(n))
    if refused:
        raise EdtoolError(f"{path} refers to {', '.join(refused)}, which is not part of the paper's networks; refusing "
                          f"to unpickle it (only {', '.join(PAPER_CLASSES)} and torch.nn layers are read)")
    return [(type(n.rpartition(".")[2], (_Inert,), {"pickled_as": n}), n) for n in names]


def _load_pickle(path: Path):
    """torch's weights-only unpickler (tensors and plain containers), extended by the stand-ins only."""
    with torch.serialization.safe_globals(_stand_ins(path)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            raise EdtoolError(f"{path} could not be read safely: {lines[0]}") from None


def _class_name(obj) -> Optional[str]:
    """The pickled name behind a stand-in instance or a bare global like a function (else None)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.pickled_as.rpartition(".")[2] if issubclass(cls, _Inert) else None


def _submodules(module) -> list:
    return [(n, c) for n, c in module.__dict__.get("_modules", {}).items() if c is not None]


def _our_layers(module, prefix=""):
    """(our module path, pickled layer) for a pickled module tree. Identity layers inside a
    Sequential are dropped (the rest renumbered), and a down_projection Sequential left with one
    layer is that layer: the paper's norm-less variants of our plain layers."""
    children = _submodules(module)
    if _class_name(module) == "Sequential":
        kept = [c for _, c in children if _class_name(c) != "Identity"]
        if prefix.rpartition(".")[2] == "down_projection" and len(kept) == 1:
            yield from _our_layers(kept[0], prefix)
            return
        children = [(str(i), c) for i, c in enumerate(kept)]
    yield prefix, module
    for name, child in children:
        yield from _our_layers(child, f"{prefix}.{name}" if prefix else name)


def _state_dict(layers: dict, path: Path) -> dict:
    """Parameters and persistent buffers of the pickled layers under our key names."""
    state = {}
    for prefix, module in layers.items():
        if _class_name(module) is None:
            raise EdtoolError(f"{path}: backbone submodule {prefix!r} is a {type(module).__name__}, not a layer")
        skip = module.__dict__.get("_non_persistent_buffers_set", set())
        buffers = {k: v for k, v in module.__dict__.get("_buffers", {}).items() if k not in skip}
        for name, value in {**module.__dict__.get("_parameters", {}), **buffers}.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise EdtoolError(f"{path}: {prefix}.{name} is a {type(value).__name__}, not a tensor")
            state[f"{prefix}.{name}" if prefix else name] = value.detach()
    return state


def _settings(arch: str, attrs: dict, state: dict, layers: dict, path: Path) -> dict:
    """Our constructor arguments: the pickled attributes where present, else read off the weights."""

    def shape(key, dim):
        if key not in state:
            raise EdtoolError(f"{path}: the backbone has no {key!r}; it is not one of the paper's networks")
        return int(state[key].shape[dim])

    def setting(name, key, dim):
        return int(attrs[name]) if name in attrs else shape(key, dim)

    def count(pattern):
        return sum(1 for k in state if re.fullmatch(pattern, k))

    conditional = bool(attrs.get("conditional", "embedding.class_embeddings.weight" in state))
    num_classes = setting("num_classes", "embedding.class_embeddings.weight", 0) if conditional else None
    first_conv = "up_projection" if arch == "resnet" else "output_conv"
    mode = attrs.get("mode", layers.get(first_conv, _Inert()).__dict__.get("padding_mode", "zeros"))
    if arch == "resnet":
        channels = setting("channels", "up_projection.weight", 1)
        return dict(in_channels=channels, out_channels=channels, mode=mode, conditional=conditional,
                    num_classes=num_classes, emb_dim=setting("emb_dim", "up_projection.weight", 0),
                    kernel_size=shape("up_projection.weight", -1),
                    num_layers=int(attrs.get("num_layers", count(r"convs\.\d+\.0\.weight"))),
                    lastksize=setting("lastksize", "down_projection.weight", -1))
    if "fsizes" in attrs:
        fsizes = [int(f) for f in attrs["fsizes"]]
    else:
        levels = count(r"feature_blocks\.\d+\.model\.0\.weight")
        fsizes = [shape(f"feature_blocks.{i}.model.0.weight", 0) for i in range(levels)]
        fsizes.append(shape("bottleneck.model.0.weight", 0))
    channels = setting("channels", "feature_blocks.0.model.0.weight", 1)
    return dict(in_channels=channels, out_channels=channels, fsizes=fsizes, mode=mode, conditional=conditional,
                num_classes=num_classes, emb_dim=setting("emb_dim", "last_emb.1.weight", 1),
                kernel_size=setting("kernel_size", "feature_blocks.0.model.0.weight", -1),
                lastksize=setting("lastksize", "output_conv.weight", -1))


def _malformed(path: Path, e: Exception) -> EdtoolError:
    """Odd pickled contents (a tensor where a setting belongs, ...) as one clear error."""
    return EdtoolError(f"{path} is not a paper checkpoint edtool can import ({type(e).__name__}: {e})")


def read_paper_pickle(path) -> PaperBackbone:
    """Read a paper checkpoint (a pickled DDIM) without running it: backbone weights and settings."""
    path = Path(path)
    if not path.is_file():
        raise EdtoolError(f"paper checkpoint {path} does not exist")
    try:
        return _read_paper_pickle(path)
    except EdtoolError:
        raise
    except Exception as e:
        raise _malformed(path, e) from None


def _read_paper_pickle(path: Path) -> PaperBackbone:
    ddim = _load_pickle(path)
    if _class_name(ddim) != "DDIM":
        raise EdtoolError(f"{path} holds a {_class_name(ddim) or type(ddim).__name__}, not a pickled DDIM module; "
                          "it is not one of the paper's checkpoints")
    schedule = ddim.__dict__.get("noise_schedule")
    if schedule is not None and _class_name(schedule) != "cosine_noise_schedule":
        raise EdtoolError(f"{path} was trained with noise schedule {_class_name(schedule) or schedule!r}; edtool uses "
                          "the paper's cosine schedule (SPEC 2), so this network cannot be imported")
    backbone = dict(_submodules(ddim)).get("backbone")
    arch = {"MinimalUNet": "unet", "MinimalResNet": "resnet"}.get(_class_name(backbone))
    if arch is None:
        raise EdtoolError(f"{path}: the DDIM's backbone is not a MinimalUNet or MinimalResNet")
    attrs = {k: v for k, v in backbone.__dict__.items() if not k.startswith("_")}
    if attrs.get("normalization") is not None:
        raise EdtoolError(f"{path} was trained with normalization={attrs['normalization']!r}; edtool's {arch} has "
                          "no normalization layers, so this network cannot be represented")
    layers = dict(_our_layers(backbone))
    state = _state_dict(layers, path)
    image_size = ddim.__dict__.get("default_imsize")
    return PaperBackbone(arch, state, _settings(arch, attrs, state, layers, path), layers,
                         int(image_size) if image_size else None)


def _check_layers(paper: PaperBackbone, net: torch.nn.Module, path: Path) -> None:
    """Refuse unless every pickled layer is the same kind, with the same settings, as ours."""
    ours = dict(net.named_modules())
    for key in sorted(set(ours) | set(paper.layers), key=lambda k: (k.count("."), k)):
        theirs = _class_name(paper.layers[key]) if key in paper.layers else None
        mine = type(ours[key]).__name__ if key in ours else None
        if key and theirs != mine:
            raise EdtoolError(f"{path}: layer {key!r} is {theirs or 'absent'} in the paper's network but "
                              f"{mine or 'absent'} in edtool's {paper.arch}; this network cannot be represented")
        pickled = paper.layers.get(key, _Inert()).__dict__
        for name in _LAYER_SETTINGS.get(theirs, ()):
            if name in pickled and pickled[name] != getattr(ours[key], name):
                raise EdtoolError(f"{path}: layer {key!r} has {name}={pickled[name]!r}, edtool's {paper.arch} "
                                  f"has {getattr(ours[key], name)!r}; this network cannot be represented")


def paper_network(paper: PaperBackbone, path) -> torch.nn.Module:
    """Our network with the paper's weights, after checking it computes what the pickled one did."""
    try:
        net = build_network(paper.arch, **paper.settings)
        _check_layers(paper, net, Path(path))
    except EdtoolError:
        raise
    except Exception as e:
        raise _malformed(path, e) from None
    try:
        net.load_state_dict(paper.state_dict, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise EdtoolError(f"{path}: the weights do not fit edtool's {paper.arch} ({detail})") from None
    return net


def dataset_from_name(path) -> Optional[str]:
    """The dataset in a paper file name (backbone_CIFAR10_ResNet_zeros.pt -> cifar10), or None."""
    m = _NAME.search(Path(path).name)
    return PAPER_DATASETS.get(m["dataset"]) if m else None


def parse_paper_name(path) -> Optional[dict]:
    """What a paper file name says: backbone_MNIST_UNet_zeros.pt -> kind backbone, dataset mnist, arch unet,
    mode zeros, conditional False (scales_*.pt likewise); None for other names."""
    m = _FULL_NAME.fullmatch(Path(path).name)
    if m is None or m["dataset"] not in PAPER_DATASETS:
        return None
    return {"kind": m["kind"], "dataset": PAPER_DATASETS[m["dataset"]], "arch": m["arch"].lower(),
            "mode": m["mode"], "conditional": m["conditional"] is not None,
            "stem": Path(path).name[len(m["kind"]) + 1:-3]}


def cached_import(path, dataset: Optional[str] = None):
    """A paper `.pt` imported on the fly (same allow-list as import_checkpoint) into
    cache/checkpoints/, keyed by the file's sha256 so a second use reads the cached copy:
    (our weights path, one line saying what happened)."""
    path = Path(path)
    if not path.is_file():
        raise EdtoolError(f"paper checkpoint {path} does not exist")
    sha = checkpoints.file_hash(path)
    dataset = dataset_from_name(path) or dataset  # the file's own name wins: a mismatch is then refused
    folder = cache_dir() / "checkpoints"
    out = folder / f"{path.stem}-{dataset}-{sha[:16]}.safetensors"
    damaged = ""
    if out.exists() and checkpoints.manifest_path(out).exists():
        try:
            recorded = json.loads(checkpoints.manifest_path(out).read_text()).get("weights_sha256")
        except (OSError, ValueError):
            recorded = None
        if recorded == checkpoints.file_hash(out):
            return out, f"{path}: paper checkpoint, using its import cached at {out}"
        damaged = f"its cached import {out} was damaged (its hash differs from the recorded one); "
    # build beside, then move in (manifest first, weights last): a concurrent rank sees all or nothing
    work = folder / f".import-{os.getpid()}-{sha[:16]}"
    try:
        made = import_checkpoint(path, out=work / out.name, dataset=dataset)
        os.replace(checkpoints.manifest_path(made), checkpoints.manifest_path(out))
        os.replace(made, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, (f"{path}: {damaged}paper checkpoint imported through the allow-list (no code run) into "
                 f"{out}; `edtool import-checkpoint` keeps a copy where you want it")


def default_import_path(dataset: str, arch: str, padding: str, conditional: bool) -> Path:
    """./checkpoints/<dataset>_<arch>[_circular][_conditional]_paper.safetensors in the working directory."""
    name = f"{dataset}_{arch}" + (f"_{padding}" if padding != "zeros" else "") + ("_conditional" if conditional else "")
    return local_checkpoints_dir() / f"{name}_paper.safetensors"


CHANNELS = {"mnist5k": 1, "mnist": 1, "fashionmnist": 1, "cifar10": 3, "celeba": 3}  # image channels per dataset


def _check_dataset(dataset: str, named: Optional[str], channels: int, path: Path) -> None:
    """--dataset must be one edtool knows, agree with the file's name (MNIST serves mnist and its mnist5k
    subset) and have as many image channels as the network."""
    if dataset not in CHANNELS:
        raise EdtoolError(f"unknown --dataset {dataset!r}; choose one of {', '.join(CHANNELS)}")
    if named is not None and dataset != named and not (named, dataset) == ("mnist", "mnist5k"):
        raise EdtoolError(f"--dataset {dataset}: {path.name} is a network for {named}; drop --dataset (the file "
                          "name says it)")
    if CHANNELS[dataset] != channels:
        raise EdtoolError(f"--dataset {dataset} has {CHANNELS[dataset]}-channel images, {path.name} takes "
                          f"{channels}-channel ones; give the dataset it was trained on")


def import_checkpoint(path, out=None, dataset: Optional[str] = None, force: bool = False) -> Path:
    """Convert a paper checkpoint into our format (safetensors + manifest); returns the weights path.
    An existing output is replaced only with `force`."""
    path = Path(path)
    dataset = dataset or dataset_from_name(path)
    if dataset is None:
        raise EdtoolError(f"cannot tell the dataset from the file name {path.name!r} (expected "
                          f"backbone_<{'|'.join(PAPER_DATASETS)}>_<UNet|ResNet>_<mode>...); pass --dataset")
    paper = read_paper_pickle(path)
    net = paper_network(paper, path)
    s = paper.settings
    _check_dataset(dataset, dataset_from_name(path), s["in_channels"], path)
    size = paper.image_size or 32  # the paper resizes MNIST/FashionMNIST to 32x32 (SPEC 2)
    manifest = {
        "arch": paper.arch, "arch_kwargs": s, "dataset": dataset, "image_shape": [s["in_channels"], size, size],
        "conditional": s["conditional"], "num_classes": s["num_classes"], "padding": s["mode"],
        "imported_from": {"file": path.name, "sha256": checkpoints.file_hash(path)},
        "training": {"source": "paper checkpoint (Kamb & Ganguli, arXiv 2412.20292), imported with "
                               "`edtool import-checkpoint`"},
    }
    out = Path(out) if out is not None else default_import_path(dataset, paper.arch, s["mode"], s["conditional"])
    if out.is_dir():
        raise EdtoolError(f"--out {out} is a folder; give the checkpoint's file name, e.g. {out / 'net.safetensors'}")
    out = out.with_suffix(".safetensors")
    check_output([out, checkpoints.manifest_path(out)], force)
    return checkpoints.save(out, net, manifest)
