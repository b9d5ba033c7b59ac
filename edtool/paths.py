"""Where edtool keeps things: the shipped checkpoints and the runtime cache."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def checkpoints_dir() -> Path:
    """Shipped checkpoints; EDTOOL_CHECKPOINTS overrides."""
    return Path(os.environ.get("EDTOOL_CHECKPOINTS", REPO_ROOT / "checkpoints"))


def local_checkpoints_dir() -> Path:
    """./checkpoints in the working directory: where train, calibrate and import-checkpoint write by
    default, and the first place searched (SPEC 4); never the shipped folder unless run from there."""
    return Path.cwd() / "checkpoints"


def cache_dir() -> Path:
    """Runtime output (runs, prepared data); EDTOOL_CACHE overrides, default ./cache."""
    path = Path(os.environ.get("EDTOOL_CACHE", Path.cwd() / "cache"))
    if path.exists() and not path.is_dir():
        from edtool.errors import EdtoolError

        where = f"EDTOOL_CACHE={os.environ['EDTOOL_CACHE']}" if "EDTOOL_CACHE" in os.environ else str(path)
        raise EdtoolError(f"{where} is a file, not a folder: point EDTOOL_CACHE at a folder (or unset it for "
                          "./cache)")
    return path
