"""Our checkpoint format (safetensors weights + JSON manifest), and loading it.

A checkpoint is two files side by side: `NAME.safetensors` (the network's state dict) and
`NAME.json` (the manifest: architecture and its arguments, dataset, image shape, conditional
flag, padding, training recipe, final loss, edtool version). Loading never unpickles anything.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save as safetensors_bytes

import edtool
from edtool.errors import EdtoolError
from edtool.fileio import atomic_path, sha256_file, write_json
from edtool.networks.models import Network, build_network

FORMAT = "edtool-checkpoint"
CONV_PADDINGS = ("zeros", "reflect", "replicate", "circular")  # torch.nn.Conv2d padding_mode


def manifest_path(path) -> Path:
    return Path(path).with_suffix(".json")


def save(path, net: torch.nn.Module, manifest: dict) -> Path:
    """Write weights and manifest atomically (temp file + rename) so a crash leaves no half file."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_bytes(state))  # an OSError (a full disk: one line), where save_file's is not one
        digest = sha256_file(tmp)
    write_json(manifest_path(path), {"format": FORMAT, "edtool_version": edtool.__version__, **manifest,
                                     "weights_sha256": digest})
    return path


def read_manifest(path) -> dict:
    mpath = manifest_path(path)
    if not mpath.exists():
        raise EdtoolError(f"checkpoint manifest {mpath} is missing; an edtool checkpoint is NAME.safetensors "
                          "plus NAME.json (convert paper checkpoints with `edtool import-checkpoint`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdtoolError(f"checkpoint manifest {mpath} is not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "arch" not in manifest:
        raise EdtoolError(f"{mpath} is not an edtool checkpoint manifest")
    shape = manifest.get("image_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and
                                  all(type(v) is int and v > 0 for v in shape)):
        raise EdtoolError(f"{mpath}: image_shape {shape!r} is not [channels, height, width] of positive ints")
    if manifest.get("padding", "zeros") not in CONV_PADDINGS:
        raise EdtoolError(f"{mpath}: padding {manifest.get('padding')!r} is not one of {', '.join(CONV_PADDINGS)} "
                          "(torch's convolution padding modes, what edtool writes)")
    if not isinstance(manifest.get("conditional", False), bool):
        raise EdtoolError(f"{mpath}: conditional {manifest.get('conditional')!r} is not true or false")
    return manifest


def file_hash(path) -> str:
    """sha256 of a file: recorded in run configs so a changed checkpoint is noticed."""
    return sha256_file(path)


def load(path, dataset: Optional[str] = None, image_shape=None, device="cpu") -> Network:
    """Load one of our checkpoints as a Network; refuse one made for another dataset or image shape.
    (A paper `.pt` loads through `discovery.load`, which imports it first.)"""
    path = Path(path)
    if path.suffix == ".pt":
        raise EdtoolError(f"{path} is a paper checkpoint: load it with edtool.networks.discovery.load, or convert "
                          "it with `edtool import-checkpoint`")
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.exists():
        raise EdtoolError(f"checkpoint {path} does not exist")
    manifest = read_manifest(path)
    if dataset is not None and manifest.get("dataset") not in (dataset, None):
        raise EdtoolError(f"checkpoint {path} was trained on {manifest.get('dataset')!r}, not {dataset!r}; "
                          "pass a checkpoint for this dataset")
    if image_shape is not None and list(manifest.get("image_shape", image_shape)) != list(image_shape):
        raise EdtoolError(f"checkpoint {path} expects images of shape {manifest.get('image_shape')}, "
                          f"the data has {list(image_shape)}")
    try:
        net = build_network(manifest["arch"], **manifest.get("arch_kwargs", {}))
        state = load_file(str(path))
    except Exception as e:  # corrupt file or a manifest no network can be built from
        raise EdtoolError(f"checkpoint {path} could not be loaded: {' '.join(str(e).split())[:300]}") from None
    channels = manifest.get("arch_kwargs", {}).get("in_channels")
    if channels is not None and manifest.get("image_shape") and manifest["image_shape"][0] != channels:
        raise EdtoolError(f"checkpoint {path}: its manifest gives images of {manifest['image_shape'][0]} channels to "
                          f"a network that takes {channels}; keep each .safetensors beside its own .json")
    mismatch = _weights_mismatch(net.state_dict(), state)
    if mismatch:
        raise EdtoolError(f"checkpoint {path} does not hold the weights of the {manifest['arch']} its manifest "
                          f"{manifest_path(path).name} describes ({mismatch}); keep each .safetensors beside its "
                          "own .json")
    net.load_state_dict(state)
    return Network(net, manifest).to(device)


def _weights_mismatch(expected: dict, found: dict) -> str:
    """'' when `found` has exactly the names and shapes of `expected`; else a short account (counts and
    the first name of each kind, never whole key lists)."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(names)} {what}, e.g. {names[0]!r}" for names, what in
             ((missing, "weights missing"), (extra, "unexpected weights"), (shapes, "of other shapes")) if names]
    return "; ".join(parts)
