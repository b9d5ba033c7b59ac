"""Benchmark the default study end to end: compute, aggregate, plot, and where the time goes (run by hand).

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_pipeline.py                  # the default study
    python tests/benchmarks/bench_pipeline.py --models unet --nsteps 4 --out /tmp/bench_pipeline.md

Runs edtool.study.compute.compute with ComputeConfig() defaults (unet, resnet, els; 20 steps; 1 realization;
mnist5k) into a fresh temporary run directory (and a temporary EDTOOL_CACHE unless --cache is given), then
edtool.study.aggregate.aggregate_run and edtool.study.plots.plot_run. Reports wall and process CPU time for setup
(data, networks, machines), sampling, Jacobian work, store writes, aggregate, plotting and the total, the
store's share of the total (target < 5%), and per-model time from the reporter's cell_done callbacks.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def clock():
    """(wall, process CPU) now."""
    return time.perf_counter(), time.process_time()


def since(t0):
    """(wall, CPU) seconds elapsed since a clock() reading."""
    w, c = clock()
    return w - t0[0], c - t0[1]


def timing_reporter():
    """A pipeline Reporter that records (wall, CPU) per finished cell: per-model time for one realization."""
    from edtool.study.compute import Reporter

    class CellClock(Reporter):
        def __init__(self):
            self.cells, self.last = [], None

        def start(self, total_cells, done_cells, models, steps=None):
            self.last = clock()

        def cell_done(self, r, model, asym_mean, failed):
            now = clock()
            self.cells.append(dict(r=r, model=model, wall=now[0] - self.last[0], cpu=now[1] - self.last[1],
                                   asym=asym_mean, failed=failed))
            self.last = now

        def note(self, message):
            print("note:", message, flush=True)

    return CellClock()


def run(args, tmp: Path) -> dict:
    """compute + aggregate + plot into tmp; returns every timing."""
    from edtool.study.aggregate import aggregate_run
    from edtool.config import ComputeConfig
    from edtool.study.compute import compute
    from edtool.study.plots import plot_run

    kw = {}
    if args.models:
        kw["models"] = args.models.split(",")
    if args.nsteps:
        kw["nsteps"] = args.nsteps
    if args.realizations:
        kw["realizations"] = args.realizations
    cfg = ComputeConfig(run_dir=str(tmp / "run"), device="cpu", **kw)
    reporter = timing_reporter()

    t0 = clock()
    summary = compute(cfg, reporter)
    compute_wall, compute_cpu = since(t0)
    t1 = clock()
    aggregate_run(cfg.run_dir)
    agg = since(t1)
    t2 = clock()
    figures = plot_run(cfg.run_dir)
    plots = since(t2)
    total = since(t0)
    return dict(cfg=cfg, summary=summary, compute=(compute_wall, compute_cpu), aggregate=agg, plot=plots,
                total=total, cells=reporter.cells, figures=figures)


def report(res: dict, threads: int) -> str:
    """Markdown: the phase table (wall), per-model table, and the store-share verdict."""
    cfg, tim = res["cfg"], res["summary"]["timings"]
    total_wall, total_cpu = res["total"]
    setup = res["compute"][0] - tim["total"]  # prepare(): data, networks, machines; lock and store creation
    other = tim["total"] - tim["sampling"] - tim["jacobian"] - tim["store"]
    phases = [("setup (data, checkpoints, machines)", setup), ("sampling (DDIM eps calls)", tim["sampling"]),
              ("jacobian (ED estimators)", tim["jacobian"]), ("store writes", tim["store"]),
              ("other inside compute", other), ("aggregate", res["aggregate"][0]), ("plotting", res["plot"][0])]
    lines = [f"torch {torch.__version__}, {threads} thread(s), device cpu; models {','.join(cfg.models)}, "
             f"{cfg.nsteps} steps, {cfg.realizations} realization(s), {cfg.dataset}, estimator {cfg.estimator}",
             "", "| phase | wall (s) | share of total |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.2f} | {sec / total_wall:.1%} |" for name, sec in phases]
    lines += [f"| **total** | **{total_wall:.2f}** | 100% |", "",
              f"Process CPU time: compute {res['compute'][1]:.1f} s, aggregate {res['aggregate'][1]:.2f} s, "
              f"plotting {res['plot'][1]:.2f} s, total {total_cpu:.1f} s (CPU/wall {total_cpu / total_wall:.2f}).",
              "", "| realization | model | wall (s) | CPU (s) | mean asym |", "|---|---|---|---|---|"]
    lines += [f"| {c['r']} | {c['model']} | {c['wall']:.1f} | {c['cpu']:.1f} | "
              f"{'FAILED' if c['failed'] else format(c['asym'], '.4f')} |" for c in res["cells"]]
    share = tim["store"] / total_wall
    lines += ["", f"Store writes: {tim['store']:.3f} s = {share:.2%} of the total "
              f"({'meets' if share < 0.05 else 'MISSES'} the < 5% target); {len(res['figures'])} figures written."]
    lines += [f"Note: {n}" for n in res["summary"]["notes"]]
    lines += [f"Figures: {', '.join(Path(f).name for f in res['figures'])}."]
    if res["summary"]["failures"]:
        lines.append("Failures: " + "; ".join(res["summary"]["failures"]))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated (default: ComputeConfig's unet,resnet,els)")
    ap.add_argument("--nsteps", type=int, help="default: ComputeConfig's 20")
    ap.add_argument("--realizations", type=int, help="default: ComputeConfig's 1")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--cache", help="EDTOOL_CACHE to use (default: a fresh temporary one)")
    ap.add_argument("--out", help="also write the markdown report to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as tmp:
        os.environ["EDTOOL_CACHE"] = args.cache or str(Path(tmp) / "cache")
        text = report(run(args, Path(tmp)), args.threads)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
