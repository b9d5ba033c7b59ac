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
    return Path(os.environ.get("EDTOOL_CACHE", Path.cwd() / "cache"))
