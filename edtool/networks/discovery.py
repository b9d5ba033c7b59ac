"""Finding a network and the ELS schedule that belongs to it (./checkpoints, EDTOOL_CHECKPOINTS, beside the
network, the shipped folder: docs/data-and-checkpoints.md#where-checkpoints-and-scales-are-found), and loading any
network file: ours, or a paper `.pt` imported on the fly.

    path = discover("mnist5k", "resnet")
    net = load(path)
    kind = resolve_machine_name("els", padding_of(path))  # els.factory
    scales, source = schedule_for(kind, None, [path], nsteps=20, patch_size=5, notes=notes)
"""

import json
from pathlib import Path
from typing import Iterable, Optional

from edtool.els.schedule import check_steps, fits_steps, read_scales, schedule_note
from edtool.errors import EdtoolError
from edtool.networks import checkpoints
from edtool.networks.models import Network
from edtool.networks.paper_import import cached_import, parse_paper_name
from edtool.paths import local_checkpoints_dir, search_dirs


def load(path, dataset: Optional[str] = None, image_shape=None, device="cpu", note=None) -> Network:
    """Any network file as a Network: ours (checkpoints.load), or a paper checkpoint (`.pt`, a pickled
    DDIM) imported on the fly through the allow-list of `paper_import` and cached by content hash;
    `note` (a callable) receives one line saying so."""
    path = Path(path)
    if path.suffix == ".pt":
        path, line = cached_import(path, dataset=dataset)
        if note is not None:
            note(line)
    return checkpoints.load(path, dataset=dataset, image_shape=image_shape, device=device)


def padding_of(path: Path) -> Optional[str]:
    """A network file's padding, from our manifest or a paper file's name (without loading it)."""
    path = Path(path)
    if path.suffix == ".pt":
        info = parse_paper_name(path)
        return info["mode"] if info else None
    try:
        return checkpoints.read_manifest(path).get("padding")
    except EdtoolError:
        return None


def schedule_for(kind: str, explicit, networks: Iterable, nsteps: int, patch_size: int, notes: list,
                 name: Optional[str] = None):
    """(scales, source) for machine `kind` (`name` as the user wrote it, for the notes): the `explicit`
    file, else the calibration found for `networks` (find_scales); (None, None) means the fixed
    `patch_size`. Either way `notes` gets the line a user needs: the fallback, or how a schedule of
    another length is used."""
    name = name or kind
    if kind == "is":
        return None, None
    scales, source = find_scales(kind, explicit, networks, nsteps, notes)
    note = schedule_note(name, scales, nsteps, patch_size, source)
    if note:
        notes.append(note)
    return scales, source


def scales_path(checkpoint, machine: str) -> Path:
    """Where a calibration of `machine` against `checkpoint` lives: `<stem>_scales_<machine>.json` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_scales_{machine}.json")


def local_scales_path(checkpoint, machine: str) -> Path:
    """Where `edtool calibrate` writes by default: ./checkpoints/<stem>_scales_<machine>.json in the working
    directory (never beside a shipped checkpoint)."""
    return local_checkpoints_dir() / scales_path(checkpoint, machine).name


def _calibrated_for(candidate: Path, checkpoint) -> bool:
    """Whether the calibration file belongs to this checkpoint: one beside it does unless it records the
    sha256 of other weights; one elsewhere (./checkpoints/) only when it records this checkpoint's."""
    beside = candidate.parent.resolve() == Path(checkpoint).parent.resolve()
    try:
        recorded = json.loads(candidate.read_text()).get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError):
        return beside  # read_scales reports what is wrong with the file
    weights = Path(checkpoint) if Path(checkpoint).suffix == ".pt" else Path(checkpoint).with_suffix(".safetensors")
    if recorded is None or not weights.is_file():
        return beside
    return recorded == checkpoints.file_hash(weights)




def _names_for(machine: str, network: Path) -> tuple:
    """What a schedule for `machine` next to this network is called: our `<stem>_scales_<machine>.json`,
    and for a paper network (its .pt, or our import of one) with the machine of its padding, the
    paper's scales_<DATASET>_<arch>_<mode>[_conditional].pt, as the key (dataset, arch, mode, conditional)."""
    paper = parse_paper_name(network)
    if paper is None and network.suffix != ".pt" and checkpoints.manifest_path(network).exists():
        try:
            imported = checkpoints.read_manifest(network).get("imported_from") or {}
            paper = parse_paper_name(imported.get("file", "x"))
        except EdtoolError:
            pass
    key = None
    if paper is not None and machine == ("els-circular" if paper["mode"] == "circular" else "els-borders"):
        key = (paper["dataset"], paper["arch"], paper["mode"], paper["conditional"])
    return scales_path(network, machine).name, key


def _paper_scales_in(directory: Path, key: tuple) -> list:
    """The paper's scales_*.pt in a folder whose name says (dataset, arch, mode, conditional) = key."""
    found = []
    for path in sorted(directory.glob("scales_*.pt")):
        info = parse_paper_name(path)
        if info is not None and (info["dataset"], info["arch"], info["mode"], info["conditional"]) == key:
            found.append(path)
    return found


def find_scales(machine: str, explicit=None, checkpoints: Iterable = (), nsteps: Optional[int] = None,
                notes: Optional[list] = None):
    """(schedule, source) for a machine, or (None, None).

    The `explicit` file when given (refused if it does not serve `nsteps`). Else, for the networks
    in `checkpoints` (most wanted first), their calibration `<stem>_scales_<machine>.json` or, for
    paper networks, the paper's `scales_*.pt`, searched in SPEC 4's order: ./checkpoints,
    EDTOOL_CHECKPOINTS, beside each network, the shipped folder. A schedule that does not serve
    `nsteps`, or a calibration that records other weights than the network's, is passed over
    (the first with a line in `notes`)."""
    if explicit is not None:
        scales = read_scales(explicit)
        return (check_steps(scales, nsteps, explicit) if nsteps else scales), str(explicit)
    networks = [Path(c) for c in checkpoints if c is not None]
    names = [(n, *_names_for(machine, n)) for n in networks]
    dirs = search_dirs()
    for parent in dict.fromkeys(n.parent for n in networks):
        if parent.is_dir() and not any(d.is_dir() and parent.resolve() == d.resolve() for d in dirs):
            dirs.insert(len(dirs) - 1, parent)  # beside the networks, before the shipped folder
    for d in dirs:
        if not d.is_dir():
            continue
        for network, json_name, paper_key in names:
            for path in [d / json_name] + ([] if paper_key is None else _paper_scales_in(d, paper_key)):
                if not path.is_file() or (path.suffix == ".json" and not _calibrated_for(path, network)):
                    continue
                scales = read_scales(path)
                if not nsteps or fits_steps(scales, nsteps):
                    return scales, str(path)
                if notes is not None:
                    notes.append(f"{machine}: passing over {path} ({len(scales)} patch sizes do not serve "
                                 f"--nsteps {nsteps})")
    return None, None




def _ours_in(directory: Path, dataset: str, arch: str, conditional: Optional[bool]) -> Optional[Path]:
    """Our checkpoint for (dataset, arch) in one folder, found by reading manifests, not names."""
    for mpath in sorted(directory.glob("*.json")):
        try:
            m = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(m, dict) or m.get("format") != checkpoints.FORMAT or m.get("dataset") != dataset \
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
