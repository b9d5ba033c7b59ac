"""The run store (SPEC 8): one zarr v3 group `ed.zarr` inside a run directory.

A run is a grid of cells (realization r, model m). `compute` fills cells one at a time
with `RunStore.write_cell`, which writes all of a cell's numbers first and sets
`done[r, m]` last, so a crash can never leave a cell that reads as done but is not.
Chunks hold one realization (all models), so separate processes may fill separate
realizations at once; `run_lock` keeps two processes off the same realizations.

Damaged is told from unfinished: every chunk carries a CRC32C checksum, and `RunStore.damaged`
checks that each done cell's chunks (every array in CELL_ARRAYS the run has) are present and
decode. Readers take `access_lock` shared; replacing a run (and writing its aggregate) takes
it exclusively. `.edtool-run.json` in the run directory records what edtool wrote there, so
`--overwrite` deletes only that.

    run = create_run("cache/demo", config, ["unet", "els"], seeds=[0, 1], labels=[-1, -1],
                     nsteps=20, image_shape=(1, 32, 32), maps=False)
    for r, m in run.pending():
        run.write_cell(r, m, ed_fro, jac_fro, asym, ed_stderr, final)
"""

import datetime
import fcntl
import json
import os
import time
import re
import shutil
import socket
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import zarr

from edtool import __version__
from edtool.errors import EdtoolError
from edtool.fileio import read_ledger, record_entry, record_written, refuse_foreign, write_text
from edtool.store.leftovers import clean_leftovers, leftover_name
from edtool.store.integrity import (DIGEST_ARRAY, FIXED_ARRAYS, INTEGRITY_ATTR, MISMATCH, array_digest,
                                    cell_digest, make_record, reason, record_problem)

SCHEMA_VERSION = 1
STORE_NAME = "ed.zarr"
SUMMARY_NAME = "summary_stats.json"
STORE_ENTRY = "edtool run store"  # the ledger's (fileio) record that edtool made a folder's ed.zarr
ACCESS_LOCK_NAME = ".edtool-access.lock"  # readers shared, replacing/aggregating exclusive (flock)
MAX_REALIZATIONS = 1_000_000  # one chunk file per realization and array; more is a job for several runs
STEP_ARRAYS = ("ed_fro", "jac_fro", "asym", "ed_stderr")  # (realization, model, step)
# SPEC 12, stored only in runs made with them (create_run's extra_arrays): trailing dims of each cell
LOCALITY_ARRAYS = {"loc_jac": ("step", "radius"), "loc_ed": ("step", "radius"), "loc_jac_stderr": ("step", "radius"),
                   "loc_ed_stderr": ("step", "radius"), "r90_jac": ("step",), "r90_ed": ("step",)}
ALIGN_ARRAYS = {"align_jac": ("step",), "align_ed": ("step",), "align_jac_stderr": ("step",),
                "align_ed_stderr": ("step",)}
POINT_ARRAYS = {"point": ("step", "channel", "y", "x")}  # --save-points: the x at which each step was measured
EXTRA_ARRAYS = {**LOCALITY_ARRAYS, **ALIGN_ARRAYS, **POINT_ARRAYS}


@dataclass(frozen=True)
class CellArray:
    """A per-cell array of shape (realization, model, *dims), one realization per chunk."""

    dims: tuple  # trailing dimension names; sizes come from the run (step, channel, y, x)
    required: bool = True  # False: only in runs created with it (create_run's maps / extra_arrays)
    dtype: str = "float32"


# Which arrays belong to a cell: the one list that write_cell, damage checks and repair use.
# A new per-cell measurement adds an entry here (optional ones are asked for with
# create_run(..., extra_arrays=[name])) and is then written, checked and repaired like the rest.
CELL_ARRAYS = {
    **{name: CellArray(("step",)) for name in STEP_ARRAYS},
    "final": CellArray(("channel", "y", "x")),
    "curl_map": CellArray(("step", "y", "x"), required=False),  # create_run(maps=True)
    **{name: CellArray(dims, required=False) for name, dims in EXTRA_ARRAYS.items()},  # create_run(extra_arrays=)
}


class BrokenRunError(EdtoolError):
    """A run store whose metadata edtool cannot trust (missing or edited attributes, wrong shapes)."""


def chunk_codecs() -> list:
    """Bytes-to-bytes codecs of every array edtool creates: zstd, then a CRC32C of the stored bytes,
    so a flipped bit or a truncated chunk fails to decode instead of reading as a number."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(), Crc32cCodec()]


def new_array(group: zarr.Group, name: str, shape, dims, dtype="float32", fill=np.nan, chunks=None,
              overwrite: bool = False) -> zarr.Array:
    """Create an array in a run store (the one place edtool creates arrays): checksummed chunks
    and `dimension_names` for xarray; `chunks` defaults to one chunk. Every chunk is written, even
    one equal to the fill value (seeds all 0), so a missing chunk is always damage."""
    return group.create_array(name, shape=tuple(shape), chunks=tuple(chunks or shape), dtype=dtype,
                              fill_value=fill, dimension_names=tuple(dims), compressors=chunk_codecs(),
                              overwrite=overwrite, config={"write_empty_chunks": True})


# ---------------------------------------------------------------- locations


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


def _run_location(location) -> str:
    """Accept the run directory or its ed.zarr path; return the run directory."""
    text = str(location).rstrip("/")
    return text[: -len(STORE_NAME) - 1] if text.endswith("/" + STORE_NAME) else text


# ---------------------------------------------------------------- the store


class RunStore:
    """An open run: metadata as attributes, cells written with `write_cell`, read with `read`.

    Opening checks the layout (attributes and array shapes agree); a run that fails is a
    BrokenRunError naming what is wrong.
    """

    def __init__(self, group: zarr.Group, location: str):
        self.group = group
        self.location = location
        self._arrays = {}
        try:
            members = set(group.array_keys())
        except Exception as err:  # noqa: BLE001 (an array's zarr.json edited: data type, codecs)
            raise BrokenRunError(f"run {location} is broken: array metadata does not read ({type(err).__name__}: "
                                 f"{str(err)[:80]}); recompute it with `edtool compute` and --overwrite") from err
        problem = _layout_problem(group, members)
        if problem:
            raise BrokenRunError(f"run {location} is broken: {problem}; recompute it with `edtool compute` "
                                 "and --overwrite (or move it away)")
        self.config = dict(group.attrs["config"])
        self.models = list(group.attrs["models"])
        self.cell_arrays = [name for name in CELL_ARRAYS if name in members]  # what a whole cell holds
        problem = record_problem(group.attrs.asdict(), members, self.cell_arrays,
                                 {n: tuple(group[n].shape) for n in ("done", DIGEST_ARRAY) if n in members})
        if problem:
            raise BrokenRunError(f"run {location} is broken: {problem}; recompute it with `edtool compute` "
                                 "and --overwrite (or move it away)")
        self.integrity = group.attrs.get(INTEGRITY_ATTR)  # None: a legacy run, made before digests
        self.fixed_damage = {}  # {array: why} for the arrays fixed at creation (time, seed, label, radius)
        self.time = self._read_fixed("time")
        self.seeds = self._read_fixed("seed")
        self.labels = self._read_fixed("label")
        self.nsteps = len(self.time)
        self.n_realizations = len(self.seeds)
        self.image_shape = tuple(self.array("final").shape[2:])
        self.has_maps = "curl_map" in self.cell_arrays
        self.extra_arrays = [name for name in EXTRA_ARRAYS if name in members]  # SPEC 12 arrays of this run
        self.radius = self._read_fixed("radius") if "radius" in members else None

    def _read_fixed(self, name: str) -> np.ndarray:
        """An array fixed at creation, checked: a chunk that is missing, does not decode or does not
        match its digest is noted in `fixed_damage` (read as the fill value, never used: every
        reader refuses a run with fixed_damage, and compute rewrites it from its settings)."""
        array = self.array(name)
        try:
            values = np.asarray(array[:])
        except Exception as err:  # noqa: BLE001 (checksum, length, codec)
            self.fixed_damage[name] = f"unreadable ({reason(err)})"
            return np.full(array.shape, array.fill_value, dtype=array.dtype)
        present = self._present(name, [0])
        if present is not None and not present[0] and (self.integrity or name == "time"):
            self.fixed_damage[name] = "missing"  # (a legacy run's seeds or labels may be all fill, unwritten)
        elif self.integrity and array_digest(name, values) != self.integrity["arrays"].get(name):
            self.fixed_damage[name] = MISMATCH
        return values

    def __repr__(self):
        return (f"RunStore({self.location!r}, models={self.models}, realizations={self.n_realizations}, "
                f"nsteps={self.nsteps})")

    def array(self, name: str) -> zarr.Array:
        """A stored array, opened once per RunStore (opening reads its metadata). Chunks are always
        written, even all-fill ones (a failed cell is all NaN), so a missing chunk means damage."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def cell_shape(self, name: str) -> tuple:
        """The shape of one cell of a per-cell array (its trailing dimensions)."""
        sizes = dict(zip(("channel", "y", "x"), self.image_shape), step=self.nsteps,
                     radius=0 if self.radius is None else len(self.radius))
        return tuple(sizes[d] for d in CELL_ARRAYS[name].dims)

    def model_index(self, m: Union[int, str]) -> int:
        """A model's position, from its index or its name."""
        if isinstance(m, str):
            if m not in self.models:
                raise ValueError(f"model {m!r} is not in this run (models: {', '.join(self.models)})")
            return self.models.index(m)
        if not 0 <= int(m) < len(self.models):
            raise ValueError(f"model index {m} out of range 0..{len(self.models) - 1}")
        return int(m)

    def write_cell(self, r: int, m: Union[int, str], ed_fro=None, jac_fro=None, asym=None, ed_stderr=None,
                   final=None, curl_map=None, **more):
        """Store one (realization, model) cell; `done[r, m]` is set only after every array is written.

        Every per-cell array the run has (CELL_ARRAYS) must be given: step vectors of length nsteps,
        `final` (C, H, W), `curl_map` (nsteps, H, W) exactly when the run was created with maps.
        Non-finite values are stored as NaN.
        """
        if self.group.read_only:
            raise ValueError(f"run {self.location} was opened read-only: use open_run(..., mode='r+')")
        if not 0 <= int(r) < self.n_realizations:
            raise ValueError(f"realization {r} out of range 0..{self.n_realizations - 1}")
        r, m = int(r), self.model_index(m)
        given = dict(ed_fro=ed_fro, jac_fro=jac_fro, asym=asym, ed_stderr=ed_stderr, final=final,
                     curl_map=curl_map, **more)
        for name, value in given.items():
            if name not in CELL_ARRAYS:
                raise ValueError(f"{name!r} is not a per-cell array (known: {', '.join(CELL_ARRAYS)})")
            if value is not None and name not in self.cell_arrays:
                raise ValueError("this run was created without maps: pass curl_map=None" if name == "curl_map"
                                 else f"this run was created without {name}: pass {name}=None")
        values = {}
        for name in self.cell_arrays:
            if given.get(name) is None:
                raise ValueError("this run was created with maps=True: write_cell needs curl_map"
                                 if name == "curl_map" else f"this run stores {name}: write_cell needs it")
            values[name] = _checked(given[name], self.cell_shape(name), name, CELL_ARRAYS[name].dtype)
        done = self.array("done")
        if done[r, m]:  # rewriting (a retried failure): not done until the new data is whole
            done[r, m] = False
        for name, value in values.items():
            self.array(name)[r, m] = value
        if self.integrity:  # bound to the cell's position: a moved or copied chunk does not match
            self.array(DIGEST_ARRAY)[r, m] = np.array([cell_digest(name, r, m, values[name])
                                                       for name in self.integrity["cell_arrays"]], dtype=np.uint64)
        self._set_done(r, m)

    def _set_done(self, r: int, m: int):
        """The commit point of a cell: the last write of `write_cell`."""
        self.array("done")[r, m] = True

    def done_mask(self, realizations: Optional[Sequence[int]] = None) -> np.ndarray:
        """(realization, model) bool: which cells are complete; only the given realizations' rows if any
        (reading only their chunks). A realization whose done chunk does not decode reads as not done
        (`damaged` names it)."""
        done, _, _ = self._read_rows("done", self._rows(realizations))
        return done.astype(bool)

    def pending(self, realizations: Optional[Sequence[int]] = None) -> list:
        """The (r, m) cells not yet done, realization-major; only `realizations` if given (e.g. a shard's)."""
        rows = list(range(self.n_realizations)) if realizations is None else [int(r) for r in realizations]
        done = self.done_mask(rows)
        return [(r, m) for i, r in enumerate(rows) for m in range(len(self.models)) if not done[i, m]]

    def progress(self) -> dict:
        """How complete the run is: cells done/total, per model, and fully finished realizations."""
        done = self.done_mask()
        return {"done": int(done.sum()), "total": int(done.size),
                "per_model": {name: int(done[:, i].sum()) for i, name in enumerate(self.models)},
                "realizations_complete": int(done.all(axis=1).sum()),
                "realizations_total": self.n_realizations}

    def read(self, name: str, model: Union[int, str, None] = None, realizations=None) -> np.ndarray:
        """A stored array as numpy; `model` selects one model's slab, `realizations` a slice or index list."""
        array = self.array(name)
        rows = slice(None) if realizations is None else realizations
        if isinstance(rows, slice):
            return np.asarray(array[rows] if model is None else array[rows, self.model_index(model)])
        rows = np.asarray(rows, dtype=np.int64)
        if model is None:
            return np.asarray(array.get_orthogonal_selection(rows))
        return np.asarray(array.get_orthogonal_selection((rows, self.model_index(model))))

    # ------------------------------------------------------------ damage

    def damage(self, realizations: Optional[Sequence[int]] = None, block: int = 64) -> dict:
        """What is wrong with a run's chunks: {r: {array: "missing" | "unreadable (why)"}}.

        Every chunk (done flags included) must decode (checksum, length); once any cell of a
        realization is done, its chunk of each per-cell array must exist. Reads each chunk once,
        `block` realizations at a time.
        """
        rows = self._rows(realizations)
        found = {}
        for i in range(0, len(rows), block):
            part = rows[i:i + block]
            done, bad, _ = self._read_rows("done", part)
            for r, why in bad.items():
                found.setdefault(r, {})["done"] = why
            live = set(part[done.any(axis=1)].tolist())
            digests = None
            for name in ([DIGEST_ARRAY] if self.integrity else []) + self.cell_arrays:
                values, bad, absent = self._read_rows(name, part)
                absent = self._missing_chunks(name, sorted(live)) if absent is None else absent
                for r in absent:
                    if r in live:
                        bad.setdefault(r, "missing")
                if name == DIGEST_ARRAY:
                    digests, unsure = values, set(bad) | set(absent)
                elif digests is not None:  # each done cell against the digest written with it
                    k = self.integrity["cell_arrays"].index(name)
                    for i, r in enumerate(part.tolist()):
                        if r not in bad and r not in unsure and any(
                                done[i, m] and cell_digest(name, r, m, values[i, m]) != digests[i, m, k]
                                for m in range(len(self.models))):
                            bad[r] = MISMATCH
                for r, why in bad.items():
                    found.setdefault(r, {})[name] = why
        return found

    def damaged(self, realizations: Optional[Sequence[int]] = None) -> dict:
        """Done cells whose data is not whole, {(r, m): reason}; a realization whose done flags do
        not decode counts with all its models (their state is unknown)."""
        return self._damaged_cells(self.damage(realizations))

    def _damaged_cells(self, found: dict) -> dict:
        rows = sorted(found)
        done = self.done_mask(rows) if rows else None
        out = {}
        for i, r in enumerate(rows):
            reason = "; ".join(f"{name} chunk {why}" for name, why in found[r].items())
            for m in range(len(self.models)):
                if done[i, m] or "done" in found[r]:
                    out[(r, m)] = reason
        return out

    def reset_damaged(self, realizations: Optional[Sequence[int]] = None) -> dict:
        """Make damaged cells pending again so compute recomputes them; returns them as `damaged` does.

        A chunk that does not decode is removed (its numbers are lost for every model of that
        realization, and those that were done are among the damaged cells); then the done flags
        of the damaged cells are cleared.
        """
        if self.group.read_only:
            raise ValueError(f"run {self.location} was opened read-only: use open_run(..., mode='r+')")
        found = self.damage(realizations)
        cells = self._damaged_cells(found)
        for r, names in found.items():
            for name, why in names.items():
                if why != "missing":
                    self._delete_chunk(name, r)
        done = self.array("done")
        for r, m in cells:
            done[r, m] = False
        return cells

    def _rows(self, realizations) -> np.ndarray:
        if realizations is None:
            return np.arange(self.n_realizations)
        return np.asarray(list(realizations), dtype=np.int64).reshape(-1)

    def _read_rows(self, name: str, rows: np.ndarray):
        """Array `name` at realizations `rows`, with the fill value where a chunk is absent or does not
        decode; {r: "unreadable (why)"} for the latter; the rows whose chunk is absent (None when the
        store cannot tell cheaply). One read for the lot, chunk by chunk only after an error."""
        array = self.array(name)
        present = self._present(name, rows)
        have = rows if present is None else rows[present]
        out = np.full((len(rows), *array.shape[1:]), array.fill_value, dtype=array.dtype)
        where = slice(None) if present is None else present
        bad = {}
        try:  # absent chunks are not read at all (zarr is slow to find a chunk missing)
            if len(have):
                out[where] = array.get_orthogonal_selection((have,))
        except Exception:  # noqa: BLE001 (any decoding error: checksum, length, codec)
            index = np.flatnonzero(present) if present is not None else np.arange(len(rows))
            for i in index:
                try:
                    out[i] = array[int(rows[i])]
                except Exception as err:  # noqa: BLE001
                    bad[int(rows[i])] = f"unreadable ({reason(err)})"
        return out, bad, (None if present is None else [int(r) for r in rows[~present]])

    def _chunk_key(self, name: str, r: int) -> str:
        array = self.array(name)
        return f"{array.path}/" + array.metadata.encode_chunk_key((int(r),) + (0,) * (array.ndim - 1))

    def _present(self, name: str, rows) -> Optional[np.ndarray]:
        """Which of `rows` have a chunk of `name` on disk (a stat each); None for non-local stores."""
        root = getattr(self.group.store, "root", None)
        if not isinstance(root, Path):
            return None
        return np.array([(root / self._chunk_key(name, r)).is_file() for r in rows], dtype=bool)

    def _missing_chunks(self, name: str, rows) -> list:
        """The realizations among `rows` whose chunk of `name` is absent from the store."""
        present = self._present(name, rows)
        if present is not None:
            return [int(r) for r in np.asarray(rows)[~present]]
        from zarr.core.sync import sync

        return [int(r) for r in rows if not sync(self.group.store.exists(self._chunk_key(name, r)))]

    def _delete_chunk(self, name: str, r: int):
        from zarr.core.sync import sync

        sync(self.group.store.delete(self._chunk_key(name, r)))


def describe_cells(run: RunStore, cells: dict, limit: int = 4) -> str:
    """Damaged cells {(r, m): reason} for a one-line message: the first few by name, then a count."""
    items = sorted(cells.items())
    text = ", ".join(f"realization {r} {run.models[m]} ({why})" for (r, m), why in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe_fixed(run: RunStore) -> str:
    """The damaged fixed arrays (time, seed, label, radius) for a one-line message."""
    return ", ".join(f"array {name} ({why})" for name, why in run.fixed_damage.items())


def open_finished(run, what: str) -> "RunStore":
    """`run` (a location or an open RunStore) opened, with at least one finished cell and nothing damaged;
    EdtoolError saying there is nothing to `what` otherwise."""
    run = run if isinstance(run, RunStore) else open_run(run)
    if not run.done_mask().any():
        raise EdtoolError(f"run {run.location} has no finished cells yet: nothing to {what} "
                          "(`edtool status` shows its progress)")
    require_whole(run)
    return run


def require_whole(run: RunStore):
    """Refuse (EdtoolError) a run with damaged cells or fixed arrays, naming them: its numbers are not
    what was computed."""
    if run.fixed_damage:
        raise EdtoolError(f"run {run.location} is damaged: {describe_fixed(run)}; rerun the `edtool compute` "
                          "that made it (same settings) to rewrite it")
    cells = run.damaged()
    if cells:
        raise EdtoolError(f"run {run.location} has {len(cells)} damaged cell(s): {describe_cells(run, cells)}; "
                          "rerun the `edtool compute` that made it (same settings) to recompute them "
                          f"(`edtool verify {run.location}` lists them)")


def _layout_problem(group: zarr.Group, members: set) -> Optional[str]:
    """Why a store's attributes and arrays do not form a run edtool can read, or None."""
    attrs = group.attrs.asdict()
    config, models = attrs.get("config"), attrs.get("models")
    if not isinstance(config, dict):
        return "group attribute 'config' is missing" if config is None else "group attribute 'config' is not a mapping"
    if not isinstance(models, list) or not models or not all(isinstance(x, str) for x in models):
        return "group attribute 'models' is missing" if models is None else "group attribute 'models' is not a list of names"
    needed = ["time", "seed", "label", "model", "done"] + [n for n, a in CELL_ARRAYS.items() if a.required]
    absent = [n for n in needed if n not in members]
    if absent:
        return f"array(s) {', '.join(absent)} missing"
    try:
        shapes = {n: tuple(group[n].shape) for n in members}
        stored_models = [str(x) for x in group["model"][:]]
    except Exception as err:  # noqa: BLE001 (edited or unreadable array metadata)
        return f"array metadata unreadable ({type(err).__name__}: {str(err)[:80]})"
    if stored_models != models:
        return f"group attribute 'models' {models} disagrees with the model array {stored_models}"
    r, m, n = shapes["seed"][0] if shapes["seed"] else 0, len(models), shapes["time"][0] if shapes["time"] else 0
    final = shapes["final"]
    if len(final) != 5:
        return f"array final has shape {final}, expected (realization, model, channel, y, x)"
    sizes = dict(zip(("channel", "y", "x"), final[2:]), step=n)
    if "radius" in members:
        sizes["radius"] = shapes["radius"][0] if shapes["radius"] else 0
    expected = {"time": (n,), "seed": (r,), "label": (r,), "model": (m,), "done": (r, m)}
    expected.update({name: (r, m, *(sizes[d] for d in a.dims)) for name, a in CELL_ARRAYS.items() if name in members})
    for name, shape in expected.items():
        if shapes[name] != shape:
            return f"array {name} has shape {shapes[name]}, expected {shape}"
    dtypes = {"time": "float64", "seed": "int64", "label": "int64", "done": "bool", "radius": "int64",
              DIGEST_ARRAY: "uint64", **{name: a.dtype for name, a in CELL_ARRAYS.items()}}
    for name, dtype in dtypes.items():
        if name in members and np.dtype(group[name].dtype) != np.dtype(dtype):
            return f"array {name} has data type {group[name].dtype}, expected {dtype}"
    return None


def _checked(value, shape, name, dtype="float32") -> np.ndarray:
    """A float32 numpy copy of `value` with the expected shape, non-finite entries as NaN."""
    if hasattr(value, "detach"):  # torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.asarray(value, dtype=np.float64).astype(dtype)  # float32 overflow -> inf
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    arr[~np.isfinite(arr)] = np.nan
    return arr


# ---------------------------------------------------------------- create / open


def create_run(location, config: dict, models: Sequence[str], seeds: Sequence[int], labels: Sequence[int],
               nsteps: int, image_shape, maps: bool, overwrite: bool = False, extra_arrays: Sequence[str] = (),
               radius: Optional[int] = None, times: Optional[Sequence[float]] = None) -> RunStore:
    """Create the run at `location` (a directory or fsspec URL), or reopen it if its settings match.

    `times` are the nsteps times of the run's time grid at which step j is measured (what compute
    passes: diffusion.TimeGrid.step_times), recorded as the `time` array; without them the uniform
    DDIM grid t_j = (N - j) / N is recorded. A reopened run keeps the times it recorded.

    A store with different settings is refused with a message naming them, unless `overwrite`,
    which deletes what edtool wrote there (the store, and summary_stats.json if edtool wrote it)
    and starts fresh, holding the run's access lock so no reader sees it half deleted.
    `extra_arrays` names optional per-cell arrays (EXTRA_ARRAYS); those with a radius dimension
    hold radii 0..`radius`.
    """
    location = _run_location(location)
    settings = _settings(config, models, seeds, labels, nsteps, image_shape, maps, extra_arrays, radius, times)
    if local_dir(location) is not None:
        clean_leftovers(local_dir(location))  # what killed commands left, when provably stale
    if overwrite:
        _check_deletable(location)  # refuse before touching anything (the lock file included)
        with access_lock(location, exclusive=True, doing="replacing it (--overwrite)", create=True):
            _delete_run(location)
            return _create(location, settings)
    existing = _open_existing(location, "r")
    if existing is not None:
        if existing.fixed_damage:
            return _repair_fixed(location, existing, settings)
        _require_same(location, _stored_settings(existing), settings)
        return _open_existing(location, "r+")
    return _create(location, settings)


def _create(location: str, settings: dict) -> RunStore:
    """Build a fresh store at `location` (none there yet), atomically where the disk allows."""
    url = store_url(location)
    base = local_dir(location)
    if base is None:  # object stores: build in place, attributes (the mark of a run) last
        try:
            group = zarr.open_group(url, mode="w-", zarr_format=3)
        except FileExistsError as err:
            raise EdtoolError(f"{url} already holds data that is not an edtool run: choose another --run") from err
        _build(group, settings)
        return open_run(location, mode="r+")
    if base.exists() and not base.is_dir():
        raise EdtoolError(f"run location {base} is a file, not a directory: choose another --run")
    _make_dir(base)
    partial = base / leftover_name(f".{STORE_NAME}.partial")
    try:
        _build(zarr.open_group(str(partial), mode="w-", zarr_format=3), settings)
        os.rename(partial, base / STORE_NAME)  # atomic: others see no store or a whole one
    except OSError as err:
        if not (base / STORE_NAME).exists():
            raise EdtoolError(f"cannot write the run store in {base} ({err.strerror or err}): "
                              "choose a writable --run-dir") from err
        # another process created the run at the same moment: use its store if it matches
        existing = _open_existing(location, "r")
        _require_same(location, _stored_settings(existing), settings)
        return _open_existing(location, "r+")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    record_entry(base, STORE_NAME, STORE_ENTRY)
    return open_run(location, mode="r+")


def _make_dir(base: Path):
    """Create a local run directory, or refuse an unwritable location in one clear line."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EdtoolError(f"cannot create the run directory {base} ({err.strerror or err}): "
                          "choose a writable --run-dir") from err


def open_run(location, mode: str = "r") -> RunStore:
    """Open an existing run for reading ("r") or for filling and aggregating ("r+")."""
    if mode not in ("r", "r+"):
        raise ValueError(f"open_run mode must be 'r' or 'r+', got {mode!r} (create_run makes new runs)")
    location = _run_location(location)
    if mode == "r+" and local_dir(location) is not None:
        clean_leftovers(local_dir(location))  # what killed commands left, when provably stale
    run = _open_existing(location, mode)
    if run is None:
        raise EdtoolError(f"no edtool run at {location} (no {STORE_NAME} there): run `edtool compute` "
                          "first, or `edtool status` to list runs")
    return run


def _open_existing(location: str, mode: str) -> Optional[RunStore]:
    """The run at `location`, None if there is none; EdtoolError if something else is there."""
    url = store_url(location)
    base = local_dir(location)
    if base is not None and not (base / STORE_NAME).exists():
        return None
    ours = base is not None and read_ledger(base).get(STORE_NAME) == STORE_ENTRY
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as err:
        if base is None and isinstance(err, (FileNotFoundError, zarr.errors.GroupNotFoundError)):
            return None
        if ours:
            raise BrokenRunError(f"run {location} is broken: its group metadata does not read "
                                 f"({type(err).__name__}: {str(err)[:80]}); recompute it with --overwrite") from err
        raise EdtoolError(f"{url} exists but is not an edtool run store ({type(err).__name__}: {err}); "
                          "choose another --run or remove it") from err
    attrs = group.attrs.asdict()
    if "schema_version" not in attrs or "edtool_version" not in attrs:
        if ours:
            missing = "schema_version" if "schema_version" not in attrs else "edtool_version"
            raise BrokenRunError(f"run {location} is broken: group attribute {missing!r} is missing; "
                                 "recompute it with --overwrite")
        raise EdtoolError(f"{url} is a zarr store that edtool did not write (or did not finish creating): "
                          "choose another --run or remove it")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise EdtoolError(f"{url} was written by edtool {attrs['edtool_version']} with store schema "
                          f"{attrs['schema_version']!r}; this edtool {__version__} reads schema {SCHEMA_VERSION}: "
                          "recompute it with --overwrite, or read it with that edtool version")
    return RunStore(group, location)


def _settings(config, models, seeds, labels, nsteps, image_shape, maps, extra_arrays=(), radius=None,
              times=None) -> dict:
    """Everything that must match for a rerun to continue a run, validated and JSON-normalized."""
    models = [str(m) for m in models]
    if not models or len(set(models)) != len(models):
        raise EdtoolError(f"models must be a non-empty list of distinct names, got {models}")
    if len(seeds) > MAX_REALIZATIONS:
        raise EdtoolError(f"{len(seeds)} realizations is more than one run holds (at most {MAX_REALIZATIONS}, "
                          "one chunk file per realization and array): split the work over several runs")
    seeds, labels = [int(s) for s in seeds], [int(y) for y in labels]
    if not seeds or len(seeds) != len(labels):
        raise EdtoolError(f"need one label per seed and at least one seed (got {len(seeds)} seeds, "
                          f"{len(labels)} labels)")
    shape = [int(v) for v in image_shape]
    if len(shape) != 3 or min(shape) < 1 or int(nsteps) < 1:
        raise EdtoolError(f"image_shape must be (C, H, W) and nsteps >= 1, got {tuple(image_shape)}, {nsteps}")
    n = int(nsteps)
    # the caller's grid; else the uniform one, (N - j) / N as float64 (what diffusion.TimeGrid(N).step_times holds)
    times = np.arange(n, 0, -1, dtype=np.float64) / n if times is None else np.asarray(times, dtype=np.float64)
    if times.shape != (n,) or not np.isfinite(times).all():
        raise EdtoolError(f"times must be {n} finite numbers, one per step, got shape {list(times.shape)}")
    try:
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as err:
        raise EdtoolError(f"run config must be JSON-serializable: {err}") from err
    extra = [name for name in EXTRA_ARRAYS if name in set(extra_arrays)]
    unknown = sorted(set(extra_arrays) - set(extra))
    if unknown:
        raise EdtoolError(f"unknown extra arrays {unknown}; known: {', '.join(EXTRA_ARRAYS)}")
    radial = any("radius" in EXTRA_ARRAYS[name] for name in extra)
    if radial and (radius is None or int(radius) < 0):
        raise EdtoolError(f"arrays with a radius dimension need radius >= 0, got {radius}")
    out = {"config": config, "models": models, "seeds": seeds, "labels": labels, "nsteps": int(nsteps),
           "image_shape": shape, "maps": bool(maps), "time": times.tolist()}
    if extra:  # absent when there are none, so runs made before extra arrays existed still match
        out["extra_arrays"] = extra
    if radial:
        out["radius"] = int(radius)
    return out


def _stored_settings(run: RunStore) -> dict:
    """The settings a stored run was made with, in the form `_settings` returns."""
    out = {"config": run.config, "models": run.models, "seeds": run.seeds.tolist(),
           "labels": run.labels.tolist(), "nsteps": run.nsteps, "image_shape": list(run.image_shape),
           "maps": run.has_maps, "time": run.time.tolist()}
    if run.extra_arrays:
        out["extra_arrays"] = run.extra_arrays
    if run.radius is not None:
        out["radius"] = len(run.radius) - 1
    return out


PROCESS_ONLY = ("device",)  # config entries recorded but not required to match on resume
# recorded since issue 12: a run made before has no such entry, and resumes (its estimator was `auto`)
RECORDED_LATER = re.compile(r"models\.[^.]+\.estimator")


def _require_same(location, old: dict, new: dict):
    """Refuse to continue a run whose settings differ, naming each differing setting.

    Nested config entries are compared leaf by leaf under dotted names (models.unet.sha256), so a
    changed checkpoint is named, and the layout's `models` list cannot mask the config's `models`.
    """
    def leaves(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    def layout(s):  # the times are named only when the step counts agree (else nsteps says it)
        return {k: v for k, v in s.items() if k != "config" and (k != "time" or old["nsteps"] == new["nsteps"])}

    def compared(config):  # what only describes the process (the device kind) may differ between shards
        return {k: v for k, v in config.items() if k not in PROCESS_ONLY}

    diffs = []  # (name, old, new), each named once even when config and layout both hold it
    for a, b in ((leaves(compared(old["config"])), leaves(compared(new["config"]))), (layout(old), layout(new))):
        for k in dict.fromkeys([*a, *b]):
            diff = (k, a.get(k, "<unset>"), b.get(k, "<unset>"))
            if diff[1] != diff[2] and diff not in diffs:
                diffs.append(diff)
    if diffs:
        def show(i):
            return ", ".join(f"{d[0]}={_short(d[i])}" for d in diffs)
        raise EdtoolError(f"run {location} was made with {show(1)}; you asked for {show(2)}: "
                          "use the same settings to resume, another --run name, or --overwrite")


def _short(value, limit: int = 40) -> str:
    """A setting's value for a one-line message, cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build(group: zarr.Group, s: dict):
    """Create every array of a fresh run (NaN / False filled) and, last, the group attributes with
    the digests of what the run's numbers depend on (store/integrity.py)."""
    r, m, n = len(s["seeds"]), len(s["models"]), s["nsteps"]
    c, h, w = s["image_shape"]
    sizes = {"step": n, "channel": c, "y": h, "x": w}

    fixed = _fixed_arrays(s)
    if "radius" in s:
        new_array(group, "radius", (s["radius"] + 1,), ("radius",), "int64", 0)[:] = fixed["radius"]
        sizes["radius"] = s["radius"] + 1
    new_array(group, "time", (n,), ("step",), "float64")[:] = fixed["time"]  # t_j of step j
    new_array(group, "seed", (r,), ("realization",), "int64", 0)[:] = fixed["seed"]
    new_array(group, "label", (r,), ("realization",), "int64", -1)[:] = fixed["label"]
    new_array(group, "model", (m,), ("model",), str, None)[:] = np.array(s["models"])
    new_array(group, "done", (r, m), ("realization", "model"), "bool", False, chunks=(1, m))
    wanted = set(s.get("extra_arrays", ())) | ({"curl_map"} if s["maps"] else set())
    for name, a in CELL_ARRAYS.items():
        if a.required or name in wanted:
            shape = (m, *(sizes[d] for d in a.dims))
            new_array(group, name, (r, *shape), ("realization", "model", *a.dims), a.dtype, np.nan,
                      chunks=(1, *shape))
    cell_arrays = [name for name in CELL_ARRAYS if name in group.array_keys()]
    new_array(group, DIGEST_ARRAY, (r, m, len(cell_arrays)), ("realization", "model", "cell_array"), "uint64", 0,
              chunks=(1, m, len(cell_arrays)))
    record = make_record(s["config"], s["models"], SCHEMA_VERSION, fixed, cell_arrays)
    group.attrs.update({"config": s["config"], "models": s["models"], "schema_version": SCHEMA_VERSION,
                        "edtool_version": __version__, INTEGRITY_ATTR: record})
    consolidate(group.store)


def _fixed_arrays(s: dict) -> dict:
    """The arrays a run's settings fix when it is made: {name: values} (radius only when measured)."""
    out = {"time": np.asarray(s["time"], dtype=np.float64),
           "seed": np.asarray(s["seeds"], dtype=np.int64), "label": np.asarray(s["labels"], dtype=np.int64)}
    if "radius" in s:
        out["radius"] = np.arange(s["radius"] + 1, dtype=np.int64)
    return out


def _repair_fixed(location: str, run: RunStore, settings: dict) -> RunStore:
    """Rewrite a run's damaged fixed arrays (time, seed, label, radius) from the settings of the compute
    that continues it, when those settings reproduce them: the same settings otherwise (checked
    first, so nothing is written for a different run) and, for a run with digests, the digest
    recorded when it was made. Returns the reopened run; EdtoolError when it cannot be repaired."""
    expected = _fixed_arrays(settings)
    stored = _stored_settings(run)
    for name, key in (("time", "time"), ("seed", "seeds"), ("label", "labels")):
        if name in run.fixed_damage:  # its stored values are unknown: the rest must match
            stored[key] = settings[key]
    _require_same(location, stored, settings)
    for name in run.fixed_damage:
        if run.integrity and array_digest(name, expected[name]) != run.integrity["arrays"].get(name):
            raise EdtoolError(f"run {location} is damaged: {describe_fixed(run)}, and the settings you gave do not "
                              f"reproduce its {name} array (recorded digest): rerun the exact `edtool compute` that "
                              "made it, or recompute it with --overwrite")
    fixed = _open_existing(location, "r+")
    for name in run.fixed_damage:
        fixed.array(name)[:] = expected[name]
    warnings.warn(f"run {location}: rewrote its damaged {describe_fixed(run)} from this command's settings "
                  "(they reproduce what the run was made with)")
    return _open_existing(location, "r+")


def consolidate(store):
    """Write consolidated metadata so `xarray.open_zarr` opens the run quietly and quickly.

    Only array/group metadata is consolidated, which changes only at creation and at aggregation;
    edtool itself always opens with use_consolidated=False.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(store)


def _delete_run(location: str):
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
    _check_deletable(location)
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


def _check_deletable(location: str):
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


# ---------------------------------------------------------------- sharding and locking


def shard_realizations(n_realizations: int, shard: Optional[tuple] = None) -> list:
    """The realizations shard (i, K) owns: i, i+K, i+2K, ...; all of them when shard is None."""
    if shard is None:
        return list(range(n_realizations))
    i, k = _check_shard(shard)
    return list(range(i, n_realizations, k))


def _check_shard(shard) -> tuple:
    i, k = (int(v) for v in shard)
    if not 0 <= i < k:
        raise EdtoolError(f"shard {i}/{k} is not valid: use i/K with 0 <= i < K")
    return i, k


_LOCK_NAME = re.compile(r"lock(\.shard-\d+-of-\d+)?")


def _lock_name(shard) -> str:
    if shard is None:
        return "lock"
    i, k = _check_shard(shard)
    return f"lock.shard-{i}-of-{k}"


def _conflicts(name: str, other: str) -> bool:
    """Whether two lock files guard overlapping realizations (same name is handled by O_EXCL)."""
    if name == other:
        return False
    if name == "lock" or other == "lock":
        return True
    return name.rsplit("-of-", 1)[1] != other.rsplit("-of-", 1)[1]  # different K: overlapping shards


def _read_lock(path: Path) -> Optional[dict]:
    """The holder recorded in a lock file, or None if it is unreadable (being written, or corrupt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _not_a_record(info: Optional[dict]) -> bool:
    """A lock file that reads whole but is not what run_lock writes (an integer pid and a host): no
    live edtool holds it (a lock being written does not read as JSON), so it is stale."""
    return info is not None and not (isinstance(info, dict) and type(info.get("pid")) is int
                                     and isinstance(info.get("host"), str))


def _refuse_odd_lock(path: Path):
    """A lock name taken by a folder (or anything but a file) is not edtool's: never moved or deleted."""
    if path.exists() and not path.is_file():
        raise EdtoolError(f"{path} is a folder (or not a file), not edtool's lock file; move it away or rename "
                          "it, then run the command again")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(info: Optional[dict], path: Path) -> bool:
    """A lock is stale when its holder ran on this host and is gone (or it is unreadable and old)."""
    if _not_a_record(info):
        return True
    if info is None:
        try:
            return datetime.datetime.now().timestamp() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return False
    return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def _refuse(run_dir, path: Path, info: Optional[dict]):
    if info is None or _not_a_record(info):
        raise EdtoolError(f"run {run_dir} has a lock being written ({path}); try again in a few seconds")
    what = f" (shard {info['shard']})" if info.get("shard") else ""
    raise EdtoolError(f"run {run_dir} is being computed{what} by pid {info.get('pid')} on host {info.get('host')} "
                      f"since {info.get('started')}; wait for it to finish, or if that process is gone "
                      f"delete {path}")


def lock_holders(run_dir) -> list:
    """Who holds locks on a run: one dict per lock file (pid, host, started, shard, path, stale)."""
    base = local_dir(_run_location(run_dir))
    if base is None or not base.is_dir():
        return []
    holders = []
    for path in sorted(base.glob("lock*")):
        if _LOCK_NAME.fullmatch(path.name) and path.is_file():
            info = _read_lock(path)
            info = info if isinstance(info, dict) and not _not_a_record(info) else {}
            holders.append({"pid": info.get("pid"), "host": info.get("host"), "started": info.get("started"),
                            "shard": info.get("shard"), "path": str(path), "stale": _is_stale(info or None, path)})
    return holders


@contextmanager
def run_lock(run_dir, shard: Optional[tuple] = None):
    """Hold the exclusive lock file of a run (or of one shard (i, K) of it) while computing.

    A live holder makes this raise EdtoolError; a stale one (same host, process gone) is taken
    over with a warning. Shards of one split (same K) lock independently; an unsharded lock
    excludes every shard. Non-local URLs are not locked (a warning says so). Yields the lock path.
    """
    base = local_dir(_run_location(run_dir))
    if base is None:
        warnings.warn(f"run {run_dir} is not on a local file system: no lock is taken; make sure only "
                      "one process computes each realization")
        yield None
        return
    _make_dir(base)
    name = _lock_name(shard)
    path = base / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "shard": None if shard is None else "{}/{}".format(*_check_shard(shard))}
    _acquire(base, path, me)
    try:
        for other in sorted(base.glob("lock*")):
            if _LOCK_NAME.fullmatch(other.name) and _conflicts(name, other.name) and other.is_file():
                info = _read_lock(other)
                if other.exists() and not _is_stale(info, other):
                    _refuse(run_dir, other, info)
        yield path
    finally:
        if (_read_lock(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)


def _acquire(base: Path, path: Path, me: dict):
    """Create `path` exclusively with our record; take it over once if its holder is gone."""
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_odd_lock(path)
            info = _read_lock(path)
            if attempt or not _is_stale(info, path):
                _refuse(base, path, info)
            _take_over(base, path, info)
            continue
        except OSError as err:
            raise EdtoolError(f"cannot write the lock file {path} ({err.strerror or err}): "
                              "choose a writable --run-dir") from err
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


def _take_over(base: Path, path: Path, stale: Optional[dict]):
    """Remove a stale lock, making sure it is still the stale one (not a fresh lock of a racing process)."""
    moved = path.with_name(leftover_name(f"{path.name}.stale"))
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # someone else removed it; the next O_EXCL attempt decides
    now = _read_lock(moved)
    if stale is not None and now != stale:  # (a record's token tells it from any other)
        try:  # we moved a fresh lock: put it back and give way
            os.link(moved, path)
        finally:
            moved.unlink(missing_ok=True)
        _refuse(base, path, now)
    moved.unlink(missing_ok=True)
    holder = "an unreadable lock" if stale is None or _not_a_record(stale) else (
        f"the stale lock of pid {stale.get('pid')} on {stale.get('host')} (since {stale.get('started')}; "
        "that process is gone)")
    warnings.warn(f"run {base}: taking over {holder}; finished cells are kept, the rest are recomputed")


# ---------------------------------------------------------------- readers and writers of a whole run

LOCK_WAIT = 600.0  # seconds a command waits for another's access before giving up


@contextmanager
def access_lock(location, exclusive: bool = False, doing: str = "", wait: Optional[float] = None,
                create: bool = False):
    """Hold the run's access lock: shared for readers (plot, verify, status), exclusive for whoever
    replaces the store or writes its aggregate, so nobody reads a run while it is deleted or rewritten.

    Computing cells needs no access lock (cells are committed by their done flag, and `run_lock`
    keeps writers apart). An flock on `<run>/.edtool-access.lock`, released by the kernel when its
    process dies, so it never goes stale. Waits up to `wait` seconds (LOCK_WAIT; EdtoolError after),
    warning once that it waits. Non-local runs, run directories a reader cannot write, and (unless
    `create`, which makes the directory) folders that hold no run are not locked.
    """
    base = local_dir(_run_location(location))
    if base is None or not (create or (base / ACCESS_LOCK_NAME).exists() or (base / STORE_NAME).exists()):
        yield  # not a run (yet): nothing to protect, and no lock file left in somebody's folder
        return
    if create:
        _make_dir(base)
    path = base / ACCESS_LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise EdtoolError(f"cannot write the lock file {path}: choose a writable --run-dir") from None
        yield  # a read-only run directory: nobody can replace the run from here either
        return
    try:
        _flock(fd, base, exclusive, LOCK_WAIT if wait is None else wait)
        if exclusive:  # who holds it, for the messages of those who wait
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "doing": doing}).encode(), 0)
        yield
    finally:
        if exclusive:
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def _flock(fd: int, base: Path, exclusive: bool, wait: float):
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline, warned = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, mode)
            return
        except BlockingIOError:
            pass
        holder = access_holder(base)
        if time.monotonic() >= deadline:
            raise EdtoolError(f"run {base} is busy{holder}: try again when that has finished")
        if not warned:
            warnings.warn(f"run {base} is busy{holder}: waiting for it")
            warned = True
        time.sleep(0.05)


def access_holder(base: Path) -> str:
    """Who holds a run's access lock exclusively, as ' (pid N on host: doing)', or '' if unknown
    (readers do not sign)."""
    try:
        info = json.loads((Path(base) / ACCESS_LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return ""
    if not info:
        return " (being read by another edtool process)"
    return f" (pid {info.get('pid')} on {info.get('host')}: {info.get('doing') or 'writing'})"
