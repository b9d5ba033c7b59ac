"""Where a run lives: the run directory (a local path or an fsspec URL) and its `ed.zarr` store."""

from pathlib import Path
from typing import Optional

from edtool.errors import EdtoolError

STORE_NAME = "ed.zarr"


def local_dir(location) -> Optional[Path]:
    """The run directory as a local Path, or None for a non-local fsspec URL (s3://, memory://)."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def store_url(location) -> str:
    """Where the zarr group of the run at `location` lives: `<location>/ed.zarr`."""
    base = local_dir(location)
    return str(base / STORE_NAME) if base is not None else str(location).rstrip("/") + "/" + STORE_NAME


def run_location(location) -> str:
    """Accept the run directory or its ed.zarr path; return the run directory."""
    text = str(location).rstrip("/")
    return text[: -len(STORE_NAME) - 1] if text.endswith("/" + STORE_NAME) else text


def make_dir(base: Path):
    """Create a local run directory, or refuse an unwritable location (or a file in its place) in one clear line."""
    for part in (base, *base.parents):
        if part.exists() and not part.is_dir():
            raise EdtoolError(f"the run directory {base} cannot be made: {part} is a file, not a folder; "
                              "choose another --run-dir")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EdtoolError(f"cannot create the run directory {base} ({err.strerror or err}): "
                          "choose a writable --run-dir") from err
