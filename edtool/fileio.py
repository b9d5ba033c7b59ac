"""Writing files safely: every file edtool writes appears whole or not at all (temp file + rename),
and a file that is already there is replaced only when the user said so.

    with atomic_path(out / "figure.png") as tmp:   # tmp keeps the suffix: libraries that read the
        fig.savefig(tmp)                            # format from the name (matplotlib, np.save) work
    write_text(path, text); write_json(path, obj)
"""

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from edtool.errors import EdtoolError


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; on success it replaces `path` in one rename, on an
    error (or a kill) the old file stays as it was and the temporary one is removed (or left as a
    dot-file that nothing reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj, indent=2, **kw) -> Path:
    """JSON with a final newline, written atomically."""
    return write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def refuse_existing(path, how: str = "pass --force to replace it, or --out to write elsewhere") -> None:
    """Bad input: `path` is there already (this run did not write it); say how to go on."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise EdtoolError(f"{path} already exists; not replacing it: {how}")


def check_output(paths, force: bool = False, how: str = "pass --force to replace it, or --out to write elsewhere",
                 flag: str = "--out"):
    """Before any work: every path in `paths` can be written (its nearest existing folder is a folder
    that takes files), is not a folder, is not a file edtool ships (never replaced, --force or not),
    and is not there already unless `force`. Raises EdtoolError naming the path and `flag`, the option
    that says where to write."""
    import tempfile

    from edtool.paths import shipped_dir

    shipped = shipped_dir().resolve()
    for path in map(Path, paths):
        if path.is_dir():
            raise EdtoolError(f"{path} is a folder; give a file path to {flag}")
        if (path.exists() or path.is_symlink()) and path.resolve().parent == shipped:
            raise EdtoolError(f"{path} is a file edtool ships; not replacing it, --force or not: pass {flag} to "
                              "write elsewhere")
        if not force:
            refuse_existing(path, how)
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise EdtoolError(f"cannot write {path}: {folder} is a file, not a folder; pass {flag} to write elsewhere")
        try:  # a probe: os.access says yes to root on a read-only file system
            tempfile.TemporaryFile(dir=folder, prefix=".edtool-probe-").close()
        except OSError as e:
            raise EdtoolError(f"cannot write {path}: {folder} does not take files ({e.strerror}); pass {flag} to "
                              "write elsewhere") from None


# ------------------------------------------------------------------ what edtool wrote in a folder

LEDGER = ".edtool-written.json"  # {file name: sha256} of the files edtool wrote in this folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_ledger(folder) -> dict:
    """What edtool recorded writing in `folder` ({name: sha256, or a note for a directory}); {} if none."""
    return _ledger(Path(folder))


def record_entry(folder, name: str, value: str) -> None:
    """Record something edtool wrote that is not a plain file (a run's ed.zarr) in the folder's ledger."""
    ledger = _ledger(Path(folder))
    ledger[name] = value
    write_json(Path(folder) / LEDGER, ledger)


def _ledger(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(path: Path, root) -> tuple:
    """(folder whose ledger records `path`, the name it is recorded under): its own folder's, or with
    `root` the ledger of that folder above it, by relative path (no ledger files among the files)."""
    return (path.parent, path.name) if root is None else (Path(root), path.relative_to(root).as_posix())


def written_by_edtool(path, root=None) -> bool:
    """Whether `path` is a plain file that edtool wrote and nobody changed since (its folder's ledger,
    or `root`'s, records this content)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    folder, name = _entry(path, root)
    recorded = _ledger(folder).get(name)
    accepted = recorded if isinstance(recorded, list) else [recorded]  # a list: old or new (recorded_paths)
    return sha256_file(path) in accepted


def refuse_foreign(paths, how: str = "pass --overwrite to replace it, or write to another folder", root=None) -> None:
    """EdtoolError for the first of `paths` that exists but is not a file edtool wrote there (by the
    folder's ledger, or `root`'s, content included): another tool's file of the same name, or one edited
    since."""
    for path in map(Path, paths):
        if path.exists() or path.is_symlink():
            if not written_by_edtool(path, root):
                raise EdtoolError(f"{path} exists and edtool did not write it (or it changed since; the seed tool "
                                  f"writes files of the same names); not replacing it: {how}")


def refuse_folders(paths, flag: str = "--out") -> None:
    """EdtoolError for the first of `paths` that is a folder (or a link to one) where edtool writes a file:
    edtool never removes a folder, --overwrite or not. `flag` is the option that names another place."""
    for path in map(Path, paths):
        if path.is_dir():
            raise EdtoolError(f"{path} is a folder, where edtool writes the file {path.name}; edtool does not remove "
                              f"it, --overwrite or not: move it away, or pass {flag} another folder")


def record_written(paths) -> None:
    """Add files edtool just wrote to their folders' ledgers (name -> sha256), atomically."""
    by_folder = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, []).append(path)
    for folder, files in by_folder.items():
        ledger = _ledger(folder)
        ledger.update({p.name: sha256_file(p) for p in files})
        write_json(folder / LEDGER, ledger)


@contextmanager
def recorded_paths(paths, root=None):
    """atomic_path for several files of one folder, each recorded in the folder's ledger: yields their
    temporary names; on success all are renamed into place. The ledger accepts the old and the new
    content while the files are renamed, so a kill at any moment leaves every file whole and still
    recognised as edtool's (a rerun replaces it; refuse_foreign does not mistake it for another's).
    With `root`, the files are recorded in the ledger of that folder above them."""
    paths = [Path(p) for p in paths]
    if not paths:
        yield []
        return
    assert len({p.parent for p in paths}) == 1, "recorded_paths takes files of one folder"
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    folder = _entry(paths[0], root)[0]
    names = [_entry(p, root)[1] for p in paths]
    tmps = [p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}") for p in paths]
    try:
        yield tmps
        new = {}
        for name, tmp in zip(names, tmps):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            new[name] = sha256_file(tmp)
        ledger = _ledger(folder)
        for name, digest in new.items():
            old = ledger.get(name)
            ledger[name] = [old, digest] if isinstance(old, str) and old != digest else digest
        write_json(folder / LEDGER, ledger)
        for p, tmp in zip(paths, tmps):
            os.replace(tmp, p)
        ledger.update(new)
        write_json(folder / LEDGER, ledger)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
