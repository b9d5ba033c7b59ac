"""`edtool status` and `edtool verify`: which runs exist, their settings, how complete and how
whole they are (damaged cells), who is computing them."""

import warnings
from pathlib import Path
from typing import List

import numpy as np

from edtool.errors import EdtoolError
from edtool.paths import cache_dir
from edtool.store.integrity import aggregate_damage
from edtool.store.leftovers import describe, find_leftovers
from edtool.store.layout import BrokenRunError
from edtool.store.location import STORE_NAME, local_dir
from edtool.store.locks import access_lock, lock_holders, shard_realizations
from edtool.store.run import open_run
from edtool.store.runstore import describe_fixed

STATUS_WAIT = 2.0  # seconds status waits for a run being replaced before reporting it busy

SHARDS_DIR = "shards"


def find_runs(roots=None, depth: int = 4) -> List[str]:
    """Run directories (those holding ed.zarr) under cache/ and results/, at most `depth` levels down."""
    roots = roots or [cache_dir(), Path("results")]
    found = []
    for root in map(Path, roots):
        for level in range(1, depth + 1):
            found += [str(p.parent) for p in sorted(root.glob("/".join(["*"] * level))) if p.name == STORE_NAME]
    return sorted(set(found))


def record_shard(location: str, shard) -> None:
    """Remember that a run is split K ways, so status can report each shard (local runs only)."""
    base = local_dir(location)
    if base is None or shard is None:
        return
    (base / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    (base / SHARDS_DIR / f"{shard[1]}").touch()


def run_status(location: str) -> dict:
    """Settings, completion and wholeness of one run: cells done per model, damaged cells, shards,
    whether a process holds it.

    A run that cannot be read is reported as such (state "broken: why" or "unreadable: why"),
    never raised, so one damaged folder does not hide every other run from `edtool status`.
    """
    base = local_dir(location)
    leftovers = [describe(item) for item in find_leftovers(base)] if base is not None else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a run busy for a moment is reported as such, not warned about
            with access_lock(location, wait=STATUS_WAIT):
                return {**_run_status(location), "leftovers": leftovers}
    except BrokenRunError as err:
        state = f"broken: {err}"
    except EdtoolError as err:
        state = f"busy: {err}" if " is busy" in str(err) else f"unreadable: {err}"
    except Exception as err:  # noqa: BLE001 (whatever is wrong with one run, list the others)
        state = f"unreadable: {type(err).__name__}: {err}"
    return {"location": str(location), "models": [], "nsteps": None, "realizations": None, "done": 0,
            "total": 0, "per_model": {}, "estimator": None, "dataset": None, "state": state, "shards": [],
            "damaged": None, "leftovers": leftovers}


def _run_status(location: str) -> dict:
    run = open_run(location)
    progress = run.progress()
    done = run.done_mask()
    damaged = run.damaged()
    cfg = run.config
    state = "complete" if progress["done"] == progress["total"] else ("empty" if progress["done"] == 0 else "partial")
    base = local_dir(location)
    holders = [f"pid {h['pid']} on {h['host']}" + (f" (shard {h['shard']})" if h.get("shard") else "")
               for h in lock_holders(location) if not h["stale"]]
    if holders and state != "complete":
        state = "running: " + "; ".join(holders)
    if damaged:
        state = f"damaged: {len(damaged)} cell(s), `edtool verify {location}` names them ({state})"
    if run.fixed_damage:
        state = f"damaged: {describe_fixed(run)}; rerun its compute to rewrite it ({state})"
    shards = []
    if base is not None and (base / SHARDS_DIR).is_dir():
        for marker in sorted((base / SHARDS_DIR).iterdir()):
            if not marker.name.isdigit() or int(marker.name) < 1:
                continue  # not a marker record_shard wrote
            k = int(marker.name)
            for i in range(k):
                rows = shard_realizations(run.n_realizations, (i, k))
                complete = bool(np.all(done[rows])) if rows else True
                shards.append(f"shard {i}/{k}: {'complete' if complete else 'incomplete'} "
                              f"({int(done[rows].sum()) if rows else 0}/{len(rows) * len(run.models)} cells)")
    return {"location": str(location), "models": run.models, "nsteps": run.nsteps,
            "realizations": run.n_realizations, "done": progress["done"], "total": progress["total"],
            "per_model": progress["per_model"], "estimator": cfg.get("estimator"), "dataset": cfg.get("dataset"),
            "state": state, "shards": shards, "damaged": len(damaged), "legacy": run.integrity is None}


def verify_run(location: str) -> dict:
    """Check every chunk of a run: which done cells are damaged (chunk missing, checksum or length
    wrong, not matching the digest written with it), which arrays fixed at creation (time, seed,
    label) and which aggregate arrays are damaged, and which arrays carry no checksum (runs made
    before edtool checksummed chunks). `legacy`: made before edtool kept digests (not checked by them)."""
    with access_lock(location):
        run = open_run(location)
        cells = run.damaged()
        progress = run.progress()
        unchecked = [name for name in ("done", *run.cell_arrays) if not _checksummed(run.array(name))]
        aggregate = aggregate_damage(run.group)
    return {"location": str(run.location), "done": progress["done"], "total": progress["total"],
            "damaged": [{"realization": r, "model": run.models[m], "reason": why}
                        for (r, m), why in sorted(cells.items())],
            "damaged_arrays": [{"array": name, "reason": why} for name, why in run.fixed_damage.items()],
            "damaged_aggregate": [{"array": f"aggregate/{name}", "reason": why} for name, why in aggregate.items()],
            "unchecksummed": unchecked, "legacy": run.integrity is None}


def _checksummed(array) -> bool:
    return any(type(c).__name__ == "Crc32cCodec" for c in array.metadata.codecs)
