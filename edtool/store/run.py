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

This module makes and opens runs and decides whether a rerun continues one; the store's other
concerns have their own modules: layout (the arrays), runstore (RunStore: cells, damage), locks
(shards, run and access locks), ownership (deleting what edtool wrote), location.

    run = create_run("cache/demo", config, ["unet", "els"], seeds=[0, 1], labels=[-1, -1],
                     nsteps=20, image_shape=(1, 32, 32), maps=False)
    for r, m in run.pending():
        run.write_cell(r, m, ed_fro, jac_fro, asym, ed_stderr, final)
"""

import json
import os
import shutil
import warnings
from typing import Optional, Sequence

import numpy as np
import zarr

from edtool import __version__
from edtool.errors import EdtoolError
from edtool.fileio import read_ledger, record_entry
from edtool.store.integrity import DIGEST_ARRAY, INTEGRITY_ATTR, array_digest, make_record
from edtool.store.leftovers import clean_leftovers, leftover_name
from edtool.config import MAX_REALIZATIONS
from edtool.store.layout import CELL_ARRAYS, EXTRA_ARRAYS, SCHEMA_VERSION, BrokenRunError, consolidate, new_array
from edtool.store.location import STORE_NAME, local_dir, make_dir, run_location, store_url
from edtool.store.locks import access_lock
from edtool.store.ownership import STORE_ENTRY, check_deletable, delete_run
from edtool.store.runstore import RunStore, describe_fixed, require_whole


def open_finished(run, what: str) -> "RunStore":
    """`run` (a location or an open RunStore) opened, with at least one finished cell and nothing damaged;
    EdtoolError saying there is nothing to `what` otherwise."""
    run = run if isinstance(run, RunStore) else open_run(run)
    if not run.done_mask().any():
        raise EdtoolError(f"run {run.location} has no finished cells yet: nothing to {what} "
                          "(`edtool status` shows its progress)")
    require_whole(run)
    return run


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
    location = run_location(location)
    settings = _settings(config, models, seeds, labels, nsteps, image_shape, maps, extra_arrays, radius, times)
    if local_dir(location) is not None:
        clean_leftovers(local_dir(location))  # what killed commands left, when provably stale
    if overwrite:
        check_deletable(location)  # refuse before touching anything (the lock file included)
        with access_lock(location, exclusive=True, doing="replacing it (--overwrite)", create=True):
            delete_run(location)
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
    make_dir(base)
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


def open_run(location, mode: str = "r") -> RunStore:
    """Open an existing run for reading ("r") or for filling and aggregating ("r+")."""
    if mode not in ("r", "r+"):
        raise ValueError(f"open_run mode must be 'r' or 'r+', got {mode!r} (create_run makes new runs)")
    location = run_location(location)
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


PROCESS_ONLY = ("device", "platform")  # config entries recorded but not required to match on resume


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
