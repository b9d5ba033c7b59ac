"""Scale schedules: the per-step patch sizes of an ELS machine (SPEC 4, 5.1), in one place.

A schedule is a list of odd patch sizes, entry j for t = (j + 1) / N. This module checks them,
reads them (a paper `scales_*.pt`, read weights-only, or our calibration JSON), writes them, says
which entry a time uses, and words the note a user gets about them. Finding the calibration of a
network is `networks.discovery.find_scales`; building a machine from one is `factory.build_machine`.

    write_scales_json(path, [3, 5, 7], metric="cosine")
    scales = read_scales(path)
    scales[scale_index(t, len(scales))]
"""

import bisect
import functools
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from edtool.config import check_patch_size
from edtool.diffusion import TimeGrid
from edtool.errors import EdtoolError
from edtool.fileio import write_json


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


def resampling_note(name: str, scales: Sequence[int], nsteps: int, source=None) -> Optional[str]:
    """None when a schedule has one entry per DDIM step; else the line that says how it is used: the step
    at time t takes entry j with t in ((j) / N, (j + 1) / N] (machines.scale_index), so a 20-entry paper
    schedule with 10 steps uses every second entry, and a length that is no multiple of the steps lands
    between the calibrated times."""
    n = len(scales)
    if n == nsteps:
        return None
    used = [scale_index(t, n) + 1 for t in TimeGrid(nsteps).entry_times]  # 1-based, ascending t
    shown = ", ".join(map(str, used)) if len(used) <= 12 else ", ".join(map(str, used[:5] + ["..."] + used[-3:]))
    aligned = n % nsteps == 0
    return (f"{name}: {source or 'the scale schedule'} has {n} entries for {nsteps} steps; each step uses the "
            f"entry for its time t (entries {shown} of 1..{n})"
            + ("" if aligned else f"; {n} is no multiple of {nsteps}, so the steps fall between the calibrated "
                                  f"times (calibrate with --nsteps {nsteps} for an exact schedule)"))


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


def scale_index(t: float, nscales: int) -> int:
    """Entry j of a scale schedule that applies at time t: the first with t <= (j + 1) / N. The grid
    times (diffusion.TimeGrid, float64, as DDIM hands them over) get their own entry exactly."""
    return min(bisect.bisect_left(_schedule_times(nscales), t), nscales - 1)


@functools.lru_cache(maxsize=None)
def _schedule_times(nscales: int) -> tuple:
    """(1/N, 2/N, ..., 1): the times of the schedule's entries, the grid's own float64 values."""
    return TimeGrid(nscales).entry_times


def fallback_note(name: str, patch_size: int) -> str:
    """What a user is told when a machine runs with a fixed patch size for want of scales."""
    return (f"{name}: no calibrated scales found, using a fixed patch size {patch_size} "
            "(run `edtool calibrate` or pass --scales)")


def schedule_note(name: str, scales: Optional[Sequence[int]], nsteps: int, patch_size: int, source=None) -> Optional[str]:
    """The line a user needs about the schedule a machine runs with: the fixed patch size when there are
    no scales, how a schedule of another length is used, or None when nothing needs saying."""
    if scales is None:
        return fallback_note(name, patch_size)
    return resampling_note(name, scales, nsteps, source)
