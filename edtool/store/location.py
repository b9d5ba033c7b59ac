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


def run_location(path=None, *, name: Optional[str] = None, existing: bool = False) -> str:
    """Where a run lives, as a string (a local path or an fsspec URL): the one answer for every command.

    path: the run directory or URL, or the path of its ed.zarr (`--run-dir`), taken as given.
    name: a plain name (`--run NAME`): the folder of that name under the cache (edtool.paths.cache_dir).
    existing: `path` is what a command that reads a run was given (`edtool aggregate RUN`): a URL or a path
      that exists, else a name under the cache; EdtoolError when there is no such run.
    """
    from edtool.paths import cache_dir

    if existing:
        text = str(path)
        if "://" in text or Path(text).exists():
            return run_location(text)
        if (cache_dir() / text).exists():
            return str(cache_dir() / text)
        raise EdtoolError(f"no run {text!r} (neither a directory nor a name under {cache_dir()}); "
                          "`edtool status` lists runs")
    if path is not None:
        text = str(path).rstrip("/")
        return text[: -len(STORE_NAME) - 1] if text.endswith("/" + STORE_NAME) else text
    if not name or "/" in name or name in (".", ".."):
        raise EdtoolError(f"--run must be a plain name (got {name!r}); use --run-dir for a path")
    return str(cache_dir() / name)


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
