"""What edtool wrote in a run directory (by the folder's ledger): deleting a run for --overwrite, and
writing summary_stats.json, never touching what edtool did not write."""

import json
import os
import shutil
import warnings
from pathlib import Path

import zarr

from edtool.errors import EdtoolError
from edtool.fileio import read_ledger, record_written, refuse_foreign, write_text
from edtool.store.leftovers import leftover_name
from edtool.store.location import STORE_NAME, local_dir, store_url

SUMMARY_NAME = "summary_stats.json"
STORE_ENTRY = "edtool run store"  # the ledger's (fileio) record that edtool made a folder's ed.zarr


def delete_run(location: str):
    """Remove what edtool wrote of a run: its store and its summary (figures are simply re-rendered).

    Refuses (EdtoolError) to delete a store edtool cannot tell it wrote, or a symbolic link (its
    target may be somebody else's data). A summary_stats.json edtool did not write is kept, with
    a warning. The store is renamed away first, so no reader ever sees it half deleted.
    """
    base = local_dir(location)
    if base is None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(store_url(location))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    check_deletable(location)
    store = base / STORE_NAME
    if store.exists():
        doomed = base / leftover_name(f".{STORE_NAME}.deleting")
        os.rename(store, doomed)
        shutil.rmtree(doomed)
    summary = base / SUMMARY_NAME
    if summary.exists():
        if summary.is_file() and not summary.is_symlink() and summary_is_ours(base):
            summary.unlink()
        else:
            warnings.warn(f"kept {summary}: edtool did not write it (or it was changed since); it does not "
                          "describe the new run")


def check_deletable(location: str):
    """Refuse (EdtoolError) to delete a run store that is a symbolic link or that edtool cannot tell it wrote."""
    base = local_dir(location)
    if base is None:
        return
    store = base / STORE_NAME
    if store.is_symlink():
        raise EdtoolError(f"{store} is a symbolic link: --overwrite deletes only what edtool wrote and does not "
                          "follow links; remove the link yourself (or choose another --run)")
    if store.exists() and (not store.is_dir() or not _store_is_ours(base)):
        raise EdtoolError(f"{store} was not written by edtool (not in the folder's ledger, no edtool attributes): "
                          "--overwrite deletes only what edtool wrote; move it away or choose another --run")


# ---------------------------------------------------------------- what edtool wrote (the folder's ledger)


def _store_is_ours(base: Path) -> bool:
    """Whether the ed.zarr in `base` is edtool's: the ledger names it, or (runs from before the
    ledger) its group carries edtool's attributes."""
    if read_ledger(base).get(STORE_NAME) == STORE_ENTRY:
        return True
    try:
        attrs = zarr.open_group(str(base / STORE_NAME), mode="r", zarr_format=3, use_consolidated=False).attrs
        return "schema_version" in attrs and "edtool_version" in attrs
    except Exception:  # noqa: BLE001 (unreadable: not recognizably ours)
        return False


def summary_is_ours(base: Path) -> bool:
    """Whether `base/summary_stats.json` is one edtool's aggregate wrote there, unchanged (by the
    folder's ledger). Runs from before the ledger: the file must carry edtool's own keys."""
    ledger = read_ledger(base)
    if SUMMARY_NAME in ledger or STORE_NAME in ledger:
        try:
            refuse_foreign([Path(base) / SUMMARY_NAME])
            return True
        except EdtoolError:
            return False
    try:
        data = json.loads((Path(base) / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "edtool_version" in data and "cells_done" in data


def write_summary(base: Path, summary: dict) -> Path:
    """Write summary_stats.json atomically, refusing to replace one edtool did not write."""
    path = Path(base) / SUMMARY_NAME
    if path.is_symlink() or (path.exists() and not (path.is_file() and summary_is_ours(base))):
        raise EdtoolError(f"{path} exists and was not written by edtool for this run (or was changed since): "
                          "aggregate does not replace it; move it away and run aggregate again")
    write_text(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    record_written([path])
    return path
