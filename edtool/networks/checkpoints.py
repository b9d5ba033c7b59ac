"""Our checkpoint format (safetensors weights + JSON manifest), loading and discovery (SPEC 4).

A checkpoint is two files side by side: `NAME.safetensors` (the network's state dict) and
`NAME.json` (the manifest: architecture and its arguments, dataset, image shape, conditional
flag, padding, training recipe, final loss, edtool version). Loading never unpickles anything.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

import edtool
from edtool.errors import EdtoolError
from edtool.fileio import atomic_path, sha256_file, write_json
from edtool.networks.models import Network, build_network
from edtool.paths import search_dirs

FORMAT = "edtool-checkpoint"


def manifest_path(path) -> Path:
    return Path(path).with_suffix(".json")


def save(path, net: torch.nn.Module, manifest: dict) -> Path:
    """Write weights and manifest atomically (temp file + rename) so a crash leaves no half file."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdtoolError(f"checkpoint manifest {mpath} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or "arch" not in manifest:
        raise EdtoolError(f"{mpath} is not an edtool checkpoint manifest")
    return manifest


def file_hash(path) -> str:
    """sha256 of a file: recorded in run configs so a changed checkpoint is noticed."""
    return sha256_file(path)


def load(path, dataset: Optional[str] = None, image_shape=None, device="cpu", note=None) -> Network:
    """Load a checkpoint as a Network; refuse one made for another dataset or image shape.

    A paper checkpoint (`.pt`, a pickled DDIM) is imported on the fly through the allow-list of
    `paper_import` and cached by content hash; `note` (a callable) receives one line saying so."""
    path = Path(path)
    if path.suffix == ".pt":
        from edtool.networks.paper_import import cached_import

        path, line = cached_import(path, dataset=dataset)
        if note is not None:
            note(line)
    elif path.suffix != ".safetensors":
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


def _ours_in(directory: Path, dataset: str, arch: str, conditional: Optional[bool]) -> Optional[Path]:
    """Our checkpoint for (dataset, arch) in one folder, found by reading manifests, not names."""
    for mpath in sorted(directory.glob("*.json")):
        try:
            m = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("dataset") != dataset \
                or m.get("arch") != arch:
            continue
        if conditional is not None and bool(m.get("conditional")) != conditional:
            continue
        if mpath.with_suffix(".safetensors").exists():
            return mpath.with_suffix(".safetensors")
    return None


def _paper_in(directory: Path, dataset: str, arch: str, conditional: Optional[bool]) -> Optional[Path]:
    """A paper file backbone_<DATASET>_<UNet|ResNet>_<mode>[_conditional].pt for (dataset, arch) in one
    folder (zero padding and unconditional first, like the seed tool's defaults)."""
    from edtool.networks.paper_import import parse_paper_name

    found = []
    for path in directory.glob("backbone_*.pt"):
        info = parse_paper_name(path)
        if info is None or info["dataset"] != dataset or info["arch"] != arch:
            continue
        if conditional is not None and info["conditional"] != conditional:
            continue
        found.append((info["mode"] != "zeros", info["conditional"], path.name, path))
    return min(found)[-1] if found else None


def discover(dataset: str, arch: str, directory=None, conditional: Optional[bool] = None) -> Path:
    """The checkpoint for (dataset, arch): in `directory`, else the first of `paths.search_dirs()`
    (./checkpoints, EDTOOL_CHECKPOINTS, shipped) holding one of ours or a paper `.pt`."""
    dirs = [Path(directory)] if directory is not None else search_dirs()
    for d in dirs:
        if not d.is_dir():
            continue
        found = _ours_in(d, dataset, arch, conditional) or _paper_in(d, dataset, arch, conditional)
        if found is not None:
            return found
    where = ", ".join(str(d) for d in dirs)
    if directory is None and not dirs[-1].is_dir():  # an installation without its package data
        where += f" (the shipped folder {dirs[-1]} is missing: reinstall edtool from a complete wheel)"
    raise EdtoolError(f"no {arch} checkpoint for dataset {dataset!r} in {where}; train one with "
                      f"`edtool train --arch {arch} --dataset {dataset}`, put the paper's backbone_*.pt in "
                      f"./checkpoints, or pass its path")

