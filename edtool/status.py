"""`edtool status`: which runs exist, their settings, how complete they are, who is computing them."""

from pathlib import Path
from typing import List

import numpy as np

from edtool.errors import EdtoolError
from edtool.paths import cache_dir
from edtool.store import STORE_NAME, local_dir, lock_holders, open_run, shard_realizations

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
    """Settings and completion of one run: cells done per model, shards, whether a process holds it.

    A run that cannot be read is reported as such (state "unreadable: why"), so one broken folder
    does not hide every other run from `edtool status`.
    """
    try:
        run = open_run(location)
    except EdtoolError as err:
        return {"location": str(location), "models": [], "nsteps": None, "realizations": None, "done": 0,
                "total": 0, "per_model": {}, "estimator": None, "dataset": None, "state": f"unreadable: {err}",
                "shards": []}
    progress = run.progress()
    done = run.done_mask()
    cfg = run.config
    state = "complete" if progress["done"] == progress["total"] else ("empty" if progress["done"] == 0 else "partial")
    base = local_dir(location)
    holders = [f"pid {h['pid']} on {h['host']}" + (f" (shard {h['shard']})" if h.get("shard") else "")
               for h in lock_holders(location) if not h["stale"]]
    if holders and state != "complete":
        state = "running: " + "; ".join(holders)
    shards = []
    if base is not None and (base / SHARDS_DIR).is_dir():
        for marker in sorted((base / SHARDS_DIR).iterdir()):
            k = int(marker.name)
            for i in range(k):
                rows = shard_realizations(run.n_realizations, (i, k))
                complete = bool(np.all(done[rows])) if rows else True
                shards.append(f"shard {i}/{k}: {'complete' if complete else 'incomplete'} "
                              f"({int(done[rows].sum()) if rows else 0}/{len(rows) * len(run.models)} cells)")
    return {"location": str(location), "models": run.models, "nsteps": run.nsteps,
            "realizations": run.n_realizations, "done": progress["done"], "total": progress["total"],
            "per_model": progress["per_model"], "estimator": cfg.get("estimator"), "dataset": cfg.get("dataset"),
            "state": state, "shards": shards}
