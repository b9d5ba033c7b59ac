"""Scale schedules: the per-step patch sizes of an ELS machine (SPEC 4, 5.1), in one place.

A schedule is a list of odd patch sizes, entry j for t = (j + 1) / N. This module checks them,
reads them (a paper `scales_*.pt`, read weights-only, or our calibration JSON), writes them,
finds the calibration that belongs to a checkpoint, and builds a machine from "a schedule, or
else a fixed patch size".

    path = scales_path("checkpoints/mnist5k_resnet.safetensors", "els-borders")
    write_scales_json(path, [3, 5, 7], metric="cosine")
    scales, source = find_scales("els-borders", checkpoints=["checkpoints/mnist5k_resnet.safetensors"])
    machine, info = build_machine("els-borders", images, labels, scales=scales, source=source)
"""

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from edtool.errors import EdtoolError
from edtool.fileio import write_json


def check_patch_size(k, what: str = "patch size") -> int:
    """An odd int >= 1, else EdtoolError (a ValueError) naming `what`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise EdtoolError(f"{what} is {k!r}; patch sizes must be odd integers >= 1 (3, 5, 7, ...)")
    return k


def check_fits(sizes: Sequence[int], image_shape, what: str = "patch size", whole: bool = False) -> list:
    """Patch sizes no larger than the images (H, W last in image_shape), else EdtoolError naming the
    largest allowed: what the commands accept (k = 101 on 32x32 ran for 10 minutes, and no calibration
    picks a window wider than the image). `whole` allows up to 2 * side - 1, where every pixel's window
    already covers the whole image and a larger one changes nothing but the cost (what make_machine takes)."""
    H, W = image_shape[-2:]
    side = max(H, W)
    largest = 2 * side - 1 if whole else (side if side % 2 else side - 1)
    too_big = [k for k in sizes if k > largest]
    if too_big:
        raise EdtoolError(f"{what} {max(too_big)} is larger than the {H}x{W} images allow; patch sizes go up to "
                          f"{largest}" + (" (a window of that size already covers the whole image from every pixel)"
                                          if whole else ""))
    return list(sizes)


def check_schedule(scales, what: str = "scales") -> list:
    """A non-empty list of odd patch sizes (a 1-D integer tensor is accepted), else EdtoolError."""
    if isinstance(scales, torch.Tensor):
        if scales.dtype.is_floating_point or scales.dtype.is_complex or scales.dtype == torch.bool or scales.dim() != 1:
            raise EdtoolError(f"{what} holds a {scales.dtype} tensor of shape {list(scales.shape)}; "
                              "expected a 1-D list of odd integer patch sizes")
        scales = scales.tolist()
    if not isinstance(scales, (list, tuple)) or not scales:
        raise EdtoolError(f"{what} must hold a non-empty list of odd patch sizes, "
                          f"got {type(scales).__name__ if scales else 'an empty list'}")
    return [check_patch_size(k, f"{what}: entry {j}") for j, k in enumerate(scales)]


# ------------------------------------------------------------------ files


def read_scales(path) -> list:
    """Per-step patch sizes from a paper `scales_*.pt` (read weights-only) or our calibration JSON."""
    path = Path(path)
    what = f"scales file {path}"
    if not path.is_file():
        raise EdtoolError(f"{what} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdtoolError(f"{what} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or "scales" not in data:
            raise EdtoolError(f"{what} has no \"scales\" list (write it with write_scales_json)")
        return check_schedule(data["scales"], what)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise EdtoolError(f"{what} is not a plain list saved by torch.save ({lines[0]})") from None
    return check_schedule(data, what)


def write_scales_json(path, scales, **meta) -> Path:
    """Write a scale schedule as JSON {"scales": [...], **meta}, readable by read_scales."""
    path = Path(path)
    scales = check_schedule([int(k) if isinstance(k, torch.Tensor) else k for k in scales], f"scales file {path}")
    return write_json(path, {"scales": scales, **meta}, indent=1)


# ------------------------------------------------------------------ discovery


def scales_path(checkpoint, machine: str) -> Path:
    """Where a calibration of `machine` against `checkpoint` lives: `<stem>_scales_<machine>.json` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_scales_{machine}.json")


def local_scales_path(checkpoint, machine: str) -> Path:
    """Where `edtool calibrate` writes by default: ./checkpoints/<stem>_scales_<machine>.json in the working
    directory (never beside a shipped checkpoint)."""
    from edtool.paths import local_checkpoints_dir

    return local_checkpoints_dir() / scales_path(checkpoint, machine).name


def _calibrated_for(candidate: Path, checkpoint) -> bool:
    """Whether the calibration file belongs to this checkpoint: one beside it does unless it records the
    sha256 of other weights; one elsewhere (./checkpoints/) only when it records this checkpoint's."""
    from edtool.networks.checkpoints import file_hash

    beside = candidate.parent.resolve() == Path(checkpoint).parent.resolve()
    try:
        recorded = json.loads(candidate.read_text()).get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError):
        return beside  # read_scales reports what is wrong with the file
    weights = Path(checkpoint) if Path(checkpoint).suffix == ".pt" else Path(checkpoint).with_suffix(".safetensors")
    if recorded is None or not weights.is_file():
        return beside
    return recorded == file_hash(weights)


def fits_steps(scales: list, nsteps: int) -> bool:
    """A schedule of M entries (entry j for t = (j + 1) / M) serves N DDIM steps when every step's
    time t = k / N is one of its grid times, i.e. when N divides M."""
    return len(scales) % nsteps == 0


def check_steps(scales: list, nsteps: int, source) -> list:
    """The schedule, or an EdtoolError saying it was calibrated for other steps."""
    if not fits_steps(scales, nsteps):
        fits = [n for n in range(1, len(scales) + 1) if len(scales) % n == 0]
        raise EdtoolError(f"scales file {source} has {len(scales)} patch sizes (one per step of a {len(scales)}-step "
                          f"schedule), which do not serve --nsteps {nsteps}: use --nsteps "
                          f"{', '.join(map(str, fits))}, or calibrate for {nsteps} steps")
    return scales


def _names_for(machine: str, network: Path) -> tuple:
    """What a schedule for `machine` next to this network is called: our `<stem>_scales_<machine>.json`,
    and for a paper network (its .pt, or our import of one) with the machine of its padding, the
    paper's scales_<DATASET>_<arch>_<mode>[_conditional].pt, as the key (dataset, arch, mode, conditional)."""
    from edtool.networks import checkpoints
    from edtool.networks.paper_import import parse_paper_name

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
    from edtool.networks.paper_import import parse_paper_name

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
    from edtool.paths import search_dirs

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


def resampling_note(name: str, scales: Sequence[int], nsteps: int, source=None) -> Optional[str]:
    """None when a schedule has one entry per DDIM step; else the line that says how it is used: the step
    at time t takes entry j with t in ((j) / N, (j + 1) / N] (machines.scale_index), so a 20-entry paper
    schedule with 10 steps uses every second entry, and a length that is no multiple of the steps lands
    between the calibrated times."""
    from edtool.els.machine import scale_index

    n = len(scales)
    if n == nsteps:
        return None
    used = [scale_index((i + 1) / nsteps, n) + 1 for i in range(nsteps)]  # 1-based, ascending t
    shown = ", ".join(map(str, used)) if len(used) <= 12 else ", ".join(map(str, used[:5] + ["..."] + used[-3:]))
    aligned = n % nsteps == 0
    return (f"{name}: {source or 'the scale schedule'} has {n} entries for {nsteps} steps; each step uses the "
            f"entry for its time t (entries {shown} of 1..{n})"
            + ("" if aligned else f"; {n} is no multiple of {nsteps}, so the steps fall between the calibrated "
                                  f"times (calibrate with --nsteps {nsteps} for an exact schedule)"))


def fallback_note(name: str, patch_size: int) -> str:
    """What a user is told when a machine runs with a fixed patch size for want of scales."""
    return (f"{name}: no calibrated scales found, using a fixed patch size {patch_size} "
            "(run `edtool calibrate` or pass --scales)")


# ------------------------------------------------------------------ the machine


def build_machine(kind: str, images, labels=None, scales: Optional[Sequence[int]] = None, patch_size: int = 5,
                  source: Optional[str] = None):
    """The machine `kind` with its schedule: `is` takes none; the others `scales` when given, else
    the fixed `patch_size`. Returns (machine, info), info being what a run records about it."""
    from edtool.els.machine import make_machine

    if kind == "is":
        return make_machine("is", images, labels), {}
    if scales is not None:
        scales = check_schedule(scales, f"scales for {kind}")
        return make_machine(kind, images, labels, scales=scales), {"scales": scales, "scales_file": source}
    check_patch_size(patch_size, "patch_size")
    return make_machine(kind, images, labels, patch_size=patch_size), {"patch_size": patch_size}
