"""What a run store holds: its arrays (dimensions, data types, which belong to a cell), how edtool
creates them (checksummed chunks), and the check that a store on disk has that layout."""

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import zarr

from edtool.errors import EdtoolError
from edtool.store.integrity import DIGEST_ARRAY

SCHEMA_VERSION = 1
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


def layout_problem(group: zarr.Group, members: set) -> Optional[str]:
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


def consolidate(store):
    """Write consolidated metadata so `xarray.open_zarr` opens the run quietly and quickly.

    Only array/group metadata is consolidated, which changes only at creation and at aggregation;
    edtool itself always opens with use_consolidated=False.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(store)
