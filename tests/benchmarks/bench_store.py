"""Benchmark: the run store's overhead per cell at 10 vs 10,000 realizations (run by hand).

    python tests/benchmarks/bench_store.py                       # 10 and 10,000 realizations
    python tests/benchmarks/bench_store.py --sizes 10 10000 100000 --cells 10

What it measures: `pipeline.compute` itself (its batch loop, done-flag bookkeeping, damage check,
`write_cell`), with the measurement replaced by a fake that returns random numbers at once, so
only store and bookkeeping cost is timed (20 steps, 1x32x32 images, 2 models, --batch 1). Each run
has N realizations, of which compute fills the same small number (`--cells` realizations, through
`--shard 0/K` with K = N / cells), so the work per size is equal and any difference is overhead that
grows with the run. Columns:
  create    creating the empty store of N realizations (zarr arrays are lazy: should not grow much)
  setup     compute up to its first cell: open, damage check and pending cells of its own shard
  cells/s   cells written per second inside the batch loop (first to last finished cell)
  total     the whole compute() call, including its final progress count over all N realizations
  verify    `RunStore.damaged()` over the whole run (reads every chunk; grows with N by design)
The sizes run one after another in one process (list a size twice to see the first run's warm-up);
compare ratios, absolute times drift with load.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edtool.study import compute as pipeline
from edtool.config import ComputeConfig
from edtool.study.compute import Reporter, compute
from edtool.study.prepare import PreparedRun
from edtool.store.run import create_run, open_run

MODELS = ["is", "ls"]  # names only: the fake measurement never touches a model
IMAGE = (1, 32, 32)
NSTEPS = 20


def fake_prepare(cfg: ComputeConfig) -> PreparedRun:
    n = cfg.realizations
    config = {"dataset": "bench", "nsteps": cfg.nsteps, "realizations": n, "estimator": cfg.estimator}
    return PreparedRun(cfg, {m: None for m in MODELS}, list(range(n)), [-1] * n, IMAGE, config, torch.device("cpu"), [])


def fake_measure(job, name, batch, points=None) -> pipeline.Measurements:
    cell = pipeline.Measurements.nan(len(batch.rows), job.prepared)
    rng = np.random.default_rng(batch.rows[0])
    for k in ("ed_fro", "jac_fro", "asym", "ed_stderr"):
        getattr(cell, k)[:] = rng.random(getattr(cell, k).shape)
    cell.final = rng.uniform(-1, 1, cell.final.shape)
    return cell


class Clock(Reporter):
    """Times the batch loop: from compute's start() to each finished cell."""

    def __init__(self):
        self.started, self.cells = None, []

    def start(self, *args, **kwargs):
        self.started = time.perf_counter()

    def cell_done(self, *args, **kwargs):
        self.cells.append(time.perf_counter())


def bench(n: int, cells: int, run_dir: Path) -> dict:
    cfg = ComputeConfig(models=MODELS, nsteps=NSTEPS, realizations=n, device="cpu", run_dir=str(run_dir),
                        shard=(0, max(1, n // cells)))
    t0 = time.perf_counter()
    study = fake_prepare(cfg)
    create_run(str(run_dir), study.config, MODELS, study.seeds, study.labels, NSTEPS, IMAGE, maps=False)
    create = time.perf_counter() - t0
    clock = Clock()
    t0 = time.perf_counter()
    summary = compute(cfg, clock)
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    damaged = open_run(run_dir).damaged()
    verify = time.perf_counter() - t1
    assert not damaged and summary["progress"]["done"] == len(clock.cells)
    loop = clock.cells[-1] - clock.cells[0]
    return {"n": n, "cells": len(clock.cells), "create": create, "setup": clock.cells[0] - t0,
            "rate": (len(clock.cells) - 1) / loop if loop > 0 else float("nan"), "total": total, "verify": verify}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--cells", type=int, default=10, help="realizations filled per run (x 2 models)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline.prepare, pipeline.measure = fake_prepare, fake_measure
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(n, args.cells, Path(tmp) / f"run{i}") for i, n in enumerate(args.sizes)]
    print(f"{'realizations':>12} {'cells':>6} {'create s':>9} {'setup s':>8} {'cells/s':>8} {'total s':>8} "
          f"{'verify s':>9}")
    for r in rows:
        print(f"{r['n']:>12} {r['cells']:>6} {r['create']:>9.2f} {r['setup']:>8.2f} {r['rate']:>8.1f} "
              f"{r['total']:>8.2f} {r['verify']:>9.2f}")
    last = {r["n"]: r["rate"] for r in rows}  # the last (warmed-up) run of each size
    small = min(last)
    for n in sorted(last)[1:]:
        print(f"cells/s at {n} realizations / at {small}: {last[n] / last[small]:.2f}")


if __name__ == "__main__":
    main()
