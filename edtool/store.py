"""The run store (SPEC 8): one zarr v3 group `ed.zarr` inside a run directory.

A run is a grid of cells (realization r, model m). `compute` fills cells one at a time
with `RunStore.write_cell`, which writes all of a cell's numbers first and sets
`done[r, m]` last, so a crash can never leave a cell that reads as done but is not.
Chunks hold one realization (all models), so separate processes may fill separate
realizations at once; `run_lock` keeps two processes off the same realizations.

    run = create_run("cache/demo", config, ["unet", "els"], seeds=[0, 1], labels=[-1, -1],
                     nsteps=20, image_shape=(1, 32, 32), maps=False)
    for r, m in run.pending():
        run.write_cell(r, m, ed_fro, jac_fro, asym, ed_stderr, final)
"""

import datetime
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import zarr

from edtool import __version__
from edtool.errors import EdtoolError

SCHEMA_VERSION = 1
STORE_NAME = "ed.zarr"
STEP_ARRAYS = ("ed_fro", "jac_fro", "asym", "ed_stderr")  # (realization, model, step)
# SPEC 12, stored only in runs made with them (create_run's extra_arrays): trailing dims of each cell
LOCALITY_ARRAYS = {"loc_jac": ("step", "radius"), "loc_ed": ("step", "radius"), "loc_jac_stderr": ("step", "radius"),
                   "loc_ed_stderr": ("step", "radius"), "r90_jac": ("step",), "r90_ed": ("step",)}
ALIGN_ARRAYS = {"align_jac": ("step",), "align_ed": ("step",), "align_jac_stderr": ("step",),
                "align_ed_stderr": ("step",)}
EXTRA_ARRAYS = {**LOCALITY_ARRAYS, **ALIGN_ARRAYS}


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
    """An open run: metadata as attributes, cells written with `write_cell`, read with `read`."""

    def __init__(self, group: zarr.Group, location: str):
        self.group = group
        self.location = location
        self.config = dict(group.attrs["config"])
        self.models = list(group.attrs["models"])
        self.time = np.asarray(group["time"][:])
        self.seeds = np.asarray(group["seed"][:])
        self.labels = np.asarray(group["label"][:])
        self.nsteps = len(self.time)
        self.n_realizations = len(self.seeds)
        self.image_shape = tuple(group["final"].shape[2:])
        self.has_maps = "curl_map" in group
        self.extra_arrays = [name for name in EXTRA_ARRAYS if name in group]
        self.radius = np.asarray(group["radius"][:]) if "radius" in group else None

    def __repr__(self):
        return (f"RunStore({self.location!r}, models={self.models}, realizations={self.n_realizations}, "
                f"nsteps={self.nsteps})")

    def model_index(self, m: Union[int, str]) -> int:
        """A model's position, from its index or its name."""
        if isinstance(m, str):
            if m not in self.models:
                raise ValueError(f"model {m!r} is not in this run (models: {', '.join(self.models)})")
            return self.models.index(m)
        if not 0 <= int(m) < len(self.models):
            raise ValueError(f"model index {m} out of range 0..{len(self.models) - 1}")
        return int(m)

    def write_cell(self, r: int, m: Union[int, str], ed_fro, jac_fro, asym, ed_stderr, final, curl_map=None,
                   **extra):
        """Store one (realization, model) cell; `done[r, m]` is set only after every array is written.

        Step vectors have length nsteps, `final` is (C, H, W), `curl_map` (nsteps, H, W) and is
        required exactly when the run was created with maps; `extra` holds the run's EXTRA_ARRAYS, all
        of them and no others. Non-finite values are stored as NaN.
        """
        if self.group.read_only:
            raise ValueError(f"run {self.location} was opened read-only: use open_run(..., mode='r+')")
        if not 0 <= int(r) < self.n_realizations:
            raise ValueError(f"realization {r} out of range 0..{self.n_realizations - 1}")
        r, m = int(r), self.model_index(m)
        n, (_, h, w) = self.nsteps, self.image_shape
        values = {"ed_fro": _checked(ed_fro, (n,), "ed_fro"), "jac_fro": _checked(jac_fro, (n,), "jac_fro"),
                  "asym": _checked(asym, (n,), "asym"), "ed_stderr": _checked(ed_stderr, (n,), "ed_stderr"),
                  "final": _checked(final, self.image_shape, "final")}
        if self.has_maps:
            if curl_map is None:
                raise ValueError("this run was created with maps=True: write_cell needs curl_map")
            values["curl_map"] = _checked(curl_map, (n, h, w), "curl_map")
        elif curl_map is not None:
            raise ValueError("this run was created without maps: pass curl_map=None")
        if sorted(extra) != sorted(self.extra_arrays):
            raise ValueError(f"this run stores {self.extra_arrays or 'no extra arrays'}: write_cell got "
                             f"{sorted(extra) or 'none'}")
        sizes = {"step": n, "radius": 0 if self.radius is None else len(self.radius)}
        for name, value in extra.items():
            values[name] = _checked(value, tuple(sizes[d] for d in EXTRA_ARRAYS[name]), name)
        if self.group["done"][r, m]:  # rewriting (a retried failure): not done until the new data is whole
            self.group["done"][r, m] = False
        for name, value in values.items():
            self.group[name][r, m] = value
        self._set_done(r, m)

    def _set_done(self, r: int, m: int):
        """The commit point of a cell: the last write of `write_cell`."""
        self.group["done"][r, m] = True

    def done_mask(self) -> np.ndarray:
        """(realization, model) bool: which cells are complete."""
        return np.asarray(self.group["done"][:], dtype=bool)

    def pending(self, realizations: Optional[Sequence[int]] = None) -> list:
        """The (r, m) cells not yet done, realization-major; only `realizations` if given (e.g. a shard's)."""
        done = self.done_mask()
        rows = range(self.n_realizations) if realizations is None else realizations
        return [(int(r), m) for r in rows for m in range(len(self.models)) if not done[r, m]]

    def progress(self) -> dict:
        """How complete the run is: cells done/total, per model, and fully finished realizations."""
        done = self.done_mask()
        return {"done": int(done.sum()), "total": int(done.size),
                "per_model": {name: int(done[:, i].sum()) for i, name in enumerate(self.models)},
                "realizations_complete": int(done.all(axis=1).sum()),
                "realizations_total": self.n_realizations}

    def read(self, name: str, model: Union[int, str, None] = None, realizations=None) -> np.ndarray:
        """A stored array as numpy; `model` selects one model's slab, `realizations` a slice or index list."""
        array = self.group[name]
        rows = slice(None) if realizations is None else realizations
        if isinstance(rows, slice):
            return np.asarray(array[rows] if model is None else array[rows, self.model_index(model)])
        rows = np.asarray(rows, dtype=np.int64)
        if model is None:
            return np.asarray(array.get_orthogonal_selection(rows))
        return np.asarray(array.get_orthogonal_selection((rows, self.model_index(model))))


def _checked(value, shape, name) -> np.ndarray:
    """A float32 numpy copy of `value` with the expected shape, non-finite entries as NaN."""
    if hasattr(value, "detach"):  # torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.asarray(value, dtype=np.float64).astype(np.float32)  # float32 overflow -> inf
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    arr[~np.isfinite(arr)] = np.nan
    return arr


# ---------------------------------------------------------------- create / open


def create_run(location, config: dict, models: Sequence[str], seeds: Sequence[int], labels: Sequence[int],
               nsteps: int, image_shape, maps: bool, overwrite: bool = False, extra_arrays: Sequence[str] = (),
               radius: Optional[int] = None) -> RunStore:
    """Create the run at `location` (a directory or fsspec URL), or reopen it if its settings match.

    A store with different settings is refused with a message naming them, unless `overwrite`,
    which deletes it (and its summary_stats.json) and starts fresh. `extra_arrays` names optional
    per-cell arrays (EXTRA_ARRAYS); those with a radius dimension hold radii 0..`radius`.
    """
    location = _run_location(location)
    settings = _settings(config, models, seeds, labels, nsteps, image_shape, maps, extra_arrays, radius)
    url = store_url(location)
    existing = _open_existing(location, "r")
    if existing is not None and overwrite:
        _delete_run(location)
        existing = None
    if existing is not None:
        _require_same(location, _stored_settings(existing), settings)
        return _open_existing(location, "r+")
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
    partial = base / f".{STORE_NAME}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build(zarr.open_group(str(partial), mode="w-", zarr_format=3), settings)
        os.rename(partial, base / STORE_NAME)  # atomic: others see no store or a whole one
    except OSError as err:
        if not (base / STORE_NAME).exists():
            raise EdtoolError(f"cannot write the run store in {base} ({err.strerror or err}): "
                              "choose a writable --run-dir") from err
        # another process created the run at the same moment: use its store if it matches
        return create_run(location, config, models, seeds, labels, nsteps, image_shape, maps,
                          extra_arrays=extra_arrays, radius=radius)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
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
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as err:
        if base is None and isinstance(err, (FileNotFoundError, zarr.errors.GroupNotFoundError)):
            return None
        raise EdtoolError(f"{url} exists but is not an edtool run store ({type(err).__name__}: {err}); "
                          "choose another --run or remove it") from err
    attrs = group.attrs.asdict()
    if "schema_version" not in attrs or "edtool_version" not in attrs:
        raise EdtoolError(f"{url} is a zarr store that edtool did not write (or did not finish creating): "
                          "choose another --run or remove it")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise EdtoolError(f"{url} was written by edtool {attrs['edtool_version']} with store schema "
                          f"{attrs['schema_version']}; this edtool {__version__} reads schema {SCHEMA_VERSION}: "
                          "recompute it with --overwrite, or read it with that edtool version")
    return RunStore(group, location)


def _settings(config, models, seeds, labels, nsteps, image_shape, maps, extra_arrays=(), radius=None) -> dict:
    """Everything that must match for a rerun to continue a run, validated and JSON-normalized."""
    models = [str(m) for m in models]
    if not models or len(set(models)) != len(models):
        raise EdtoolError(f"models must be a non-empty list of distinct names, got {models}")
    seeds, labels = [int(s) for s in seeds], [int(y) for y in labels]
    if not seeds or len(seeds) != len(labels):
        raise EdtoolError(f"need one label per seed and at least one seed (got {len(seeds)} seeds, "
                          f"{len(labels)} labels)")
    shape = [int(v) for v in image_shape]
    if len(shape) != 3 or min(shape) < 1 or int(nsteps) < 1:
        raise EdtoolError(f"image_shape must be (C, H, W) and nsteps >= 1, got {tuple(image_shape)}, {nsteps}")
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
           "image_shape": shape, "maps": bool(maps)}
    if extra:  # absent when there are none, so runs made before extra arrays existed still match
        out["extra_arrays"] = extra
    if radial:
        out["radius"] = int(radius)
    return out


def _stored_settings(run: RunStore) -> dict:
    """The settings a stored run was made with, in the form `_settings` returns."""
    out = {"config": run.config, "models": run.models, "seeds": run.seeds.tolist(),
           "labels": run.labels.tolist(), "nsteps": run.nsteps, "image_shape": list(run.image_shape),
           "maps": run.has_maps}
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

    def layout(s):
        return {k: v for k, v in s.items() if k != "config"}

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
    """Create every array of a fresh run (NaN / False filled) and, last, the group attributes."""
    from edtool.diffusion import timesteps

    r, m, n = len(s["seeds"]), len(s["models"]), s["nsteps"]
    c, h, w = s["image_shape"]

    def array(name, shape, dims, dtype="float32", fill=np.nan, chunks=None):
        return group.create_array(name, shape=shape, chunks=chunks or shape, dtype=dtype, fill_value=fill,
                                  dimension_names=dims)

    array("time", (n,), ("step",), "float64")[:] = timesteps(n)[:-1].numpy()  # t_j of step j
    array("seed", (r,), ("realization",), "int64", 0)[:] = np.asarray(s["seeds"], dtype=np.int64)
    array("label", (r,), ("realization",), "int64", -1)[:] = np.asarray(s["labels"], dtype=np.int64)
    group.create_array("model", shape=(m,), dtype=str, dimension_names=("model",))[:] = np.array(s["models"])
    for name in STEP_ARRAYS:
        array(name, (r, m, n), ("realization", "model", "step"), chunks=(1, m, n))
    array("done", (r, m), ("realization", "model"), "bool", False, chunks=(1, m))
    array("final", (r, m, c, h, w), ("realization", "model", "channel", "y", "x"), chunks=(1, m, c, h, w))
    if s["maps"]:
        array("curl_map", (r, m, n, h, w), ("realization", "model", "step", "y", "x"), chunks=(1, m, n, h, w))
    if "radius" in s:
        array("radius", (s["radius"] + 1,), ("radius",), "int64", 0)[:] = np.arange(s["radius"] + 1)
    sizes = {"step": n, "radius": s.get("radius", -1) + 1}
    for name in s.get("extra_arrays", []):
        dims = EXTRA_ARRAYS[name]
        shape = tuple(sizes[d] for d in dims)
        array(name, (r, m, *shape), ("realization", "model", *dims), chunks=(1, m, *shape))
    group.attrs.update({"config": s["config"], "models": s["models"], "schema_version": SCHEMA_VERSION,
                        "edtool_version": __version__})
    consolidate(group.store)


def consolidate(store):
    """Write consolidated metadata so `xarray.open_zarr` opens the run quietly and quickly.

    Only array/group metadata is consolidated, which changes only at creation and at aggregation;
    edtool itself always opens with use_consolidated=False.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(store)


def _delete_run(location: str):
    """Remove a run's store and the summary derived from it (figures are simply re-rendered)."""
    base = local_dir(location)
    if base is not None:
        shutil.rmtree(base / STORE_NAME)
        (base / "summary_stats.json").unlink(missing_ok=True)
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(store_url(location))
        fs.rm(path, recursive=True)


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
    if info is None:
        try:
            return datetime.datetime.now().timestamp() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return False
    return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def _refuse(run_dir, path: Path, info: Optional[dict]):
    if info is None:
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
        if _LOCK_NAME.fullmatch(path.name):
            info = _read_lock(path) or {}
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
            if _LOCK_NAME.fullmatch(other.name) and _conflicts(name, other.name):
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
    moved = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # someone else removed it; the next O_EXCL attempt decides
    now = _read_lock(moved)
    if stale is not None and (now or {}).get("token") != stale.get("token"):
        try:  # we moved a fresh lock: put it back and give way
            os.link(moved, path)
        finally:
            moved.unlink(missing_ok=True)
        _refuse(base, path, now)
    moved.unlink(missing_ok=True)
    holder = "an unreadable lock" if stale is None else (
        f"the stale lock of pid {stale.get('pid')} on {stale.get('host')} (since {stale.get('started')}; "
        "that process is gone)")
    warnings.warn(f"run {base}: taking over {holder}; finished cells are kept, the rest are recomputed")
