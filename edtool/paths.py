"""Where edtool keeps things: checkpoint folders (searched in SPEC 4's order) and the runtime cache."""

import os
from pathlib import Path
from typing import List

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DATA = Path(__file__).resolve().parent / "_shipped"  # the repo's checkpoints/ inside a wheel


def shipped_dir() -> Path:
    """The checkpoints and scales shipped with edtool: package data `edtool/_shipped` in an installed
    wheel, the repository's `checkpoints/` in a checkout (or an editable install)."""
    return PACKAGE_DATA if PACKAGE_DATA.is_dir() else REPO_ROOT / "checkpoints"


def search_dirs() -> List[Path]:
    """Folders searched for checkpoints and scales, first match wins (SPEC 4): ./checkpoints of the
    working directory, EDTOOL_CHECKPOINTS (unless empty), the shipped ones. A ./checkpoints that is the shipped
    folder itself (running inside the repository) keeps the shipped folder's place, last."""
    env = os.environ.get("EDTOOL_CHECKPOINTS")
    shipped = shipped_dir()
    dirs: List[Path] = []
    for d in (Path.cwd() / "checkpoints", Path(env) if env else None):
        if d is not None and not _same(d, shipped) and not any(_same(d, seen) for seen in dirs):
            dirs.append(d)
    return dirs + [shipped]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def local_checkpoints_dir() -> Path:
    """./checkpoints in the working directory: where train, calibrate and import-checkpoint write by
    default, and the first place searched (SPEC 4); never the shipped folder unless run from there."""
    return Path.cwd() / "checkpoints"


def cache_dir() -> Path:
    """Runtime output (runs, prepared data); EDTOOL_CACHE overrides, default ./cache (an empty EDTOOL_CACHE
    counts as unset, as an empty EDTOOL_CHECKPOINTS does)."""
    env = os.environ.get("EDTOOL_CACHE")
    path = Path(env) if env else Path.cwd() / "cache"
    if path.exists() and not path.is_dir():
        from edtool.errors import EdtoolError

        where = f"EDTOOL_CACHE={env}" if env else str(path)
        raise EdtoolError(f"{where} is a file, not a folder: point EDTOOL_CACHE at a folder (or unset it for "
                          "./cache)")
    return path
