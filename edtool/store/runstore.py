"""An open run (`RunStore`): write a cell with its done flag last, read arrays, and tell damaged
cells from unfinished ones by their chunks' checksums and digests; the one-line descriptions of damage."""

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import zarr

from edtool.errors import EdtoolError
from edtool.store.integrity import (DIGEST_ARRAY, INTEGRITY_ATTR, MISMATCH, array_digest, cell_digest, reason,
                                    record_problem)
from edtool.store.layout import CELL_ARRAYS, EXTRA_ARRAYS, BrokenRunError, layout_problem

NOTES_ATTR = "notes"  # group attribute: one-line notes on how cells were measured (RunStore.add_note)


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
        problem = layout_problem(group, members)
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

    def notes(self) -> list:
        """How cells were measured where it differs from the run's settings (`add_note`), oldest first."""
        return list(self.group.attrs.get(NOTES_ATTR, []))

    def add_note(self, note: str):
        """Keep a one-line note with the run (the group attribute `notes`; outside its integrity digest)."""
        notes = self.notes()
        if note not in notes:
            self.group.attrs[NOTES_ATTR] = notes + [note]

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
