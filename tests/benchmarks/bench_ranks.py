"""Benchmark: 2 ranks vs 1 on a CPU run, and whether the arrays come out identical (run by hand).

    python tests/benchmarks/bench_ranks.py                      # unet,resnet; 4 realizations; 10 steps
    python tests/benchmarks/bench_ranks.py --models unet --realizations 2 --nsteps 3 --repeat 1

Four ways to fill the same run, each timed as a whole command (process start, data and checkpoint
loading included), in a fresh temporary run directory:
  single    `python -m edtool compute ...`, one process, OMP_NUM_THREADS=2 (the baseline for speed-ups)
  single-1t the same with OMP_NUM_THREADS=1: the reference for bit-identity, since float reductions
            split over 2 threads may round differently from 1 thread (ranks use 1 thread each)
  torchrun  `python -m torch.distributed.run --standalone --nproc-per-node 2 -m edtool compute ...`,
            gloo on CPU, OMP_NUM_THREADS=1 per rank
  shards    `... compute --shard 0/2` and `--shard 1/2` started together, OMP_NUM_THREADS=1 each
With --repeat N the four are run N times in rotating order and the median is reported. Every array of
each run is compared bit for bit with the first single-1t run. CPU time is that of the waited-for
children (RUSAGE_CHILDREN), so it includes the ranks under torchrun.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("single", "single-1t", "torchrun", "shards")


def compute_args(args, run_dir: Path) -> list:
    return ["compute", "--models", args.models, "--realizations", str(args.realizations), "--nsteps",
            str(args.nsteps), "--device", "cpu", "--quiet", "--run-dir", str(run_dir)]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def launch(mode: str, args, run_dir: Path) -> list:
    """The commands (argv, OMP threads) of one mode; several run concurrently."""
    py = [sys.executable]
    base = compute_args(args, run_dir)
    if mode == "single":
        return [(py + ["-m", "edtool"] + base, 2)]
    if mode == "single-1t":
        return [(py + ["-m", "edtool"] + base, 1)]
    if mode == "torchrun":
        return [(py + ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edtool"]
                 + base, 1)]
    return [(py + ["-m", "edtool"] + base + ["--shard", f"{i}/2"], 1) for i in range(2)]


def run_mode(mode: str, args, run_dir: Path) -> dict:
    """Start the mode's processes together, wait for all; wall and children's CPU seconds."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    procs = []
    for argv, threads in launch(mode, args, run_dir):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate()[0] for p in procs]
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"{mode} failed (exit {p.returncode}):\n{out[-3000:]}")
    return dict(wall=wall, cpu=cpu)


def arrays(run_dir: Path) -> dict:
    """Every array of the run store by name (numpy)."""
    from edtool.store.run import open_run

    run = open_run(str(run_dir))
    names = [name for name, _ in run.group.arrays()]
    return {name: run.read(name) for name in names}


def compare(a: dict, b: dict) -> str:
    """'identical' or the arrays that differ (with their largest difference)."""
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append(f"{name} missing")
        elif not np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"):
            d = np.nanmax(np.abs(a[name].astype(float) - b[name].astype(float)))
            diffs.append(f"{name} (max |diff| {d:.3g})")
    return "identical" if not diffs else "DIFFER: " + ", ".join(diffs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet,resnet")
    ap.add_argument("--realizations", type=int, default=4)
    ap.add_argument("--nsteps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1, help="rounds, in rotating order (median reported)")
    ap.add_argument("--out", help="also write the markdown report to this file")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    times = {m: [] for m in MODES}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ranks-") as tmp:
        os.environ.setdefault("EDTOOL_CACHE", str(Path(tmp) / "cache"))
        for k in range(args.repeat):
            for mode in MODES[k % len(MODES):] + MODES[:k % len(MODES)]:
                run_dir = Path(tmp) / f"{mode}-{k}"
                times[mode].append(run_mode(mode, args, run_dir))
                print(f"round {k} {mode}: {times[mode][-1]['wall']:.1f} s wall, {times[mode][-1]['cpu']:.1f} s CPU",
                      flush=True)
                results[mode, k] = arrays(run_dir)
        ref = results["single-1t", 0]
        same = {m: "; ".join(sorted({compare(ref, results[m, k]) for k in range(args.repeat)})) for m in MODES}

    med = {m: (statistics.median(t["wall"] for t in times[m]), statistics.median(t["cpu"] for t in times[m]))
           for m in MODES}
    lines = [f"models {args.models}, {args.realizations} realizations, {args.nsteps} steps, device cpu, "
             f"{os.cpu_count()} CPUs, {args.repeat} round(s) (median); load average before "
             f"{' '.join(f'{v:.2f}' for v in load_before)}, after {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
             "", "| mode | processes x threads | wall (s) | speed-up vs single | CPU (s) | arrays vs single-1t |",
             "|---|---|---|---|---|---|"]
    layout = {"single": "1 x 2", "single-1t": "1 x 1", "torchrun": "2 ranks x 1", "shards": "2 shards x 1"}
    for m in MODES:
        lines.append(f"| {m} | {layout[m]} | {med[m][0]:.1f} | {med['single'][0] / med[m][0]:.2f}x | {med[m][1]:.1f} "
                     f"| {'(reference)' if m == 'single-1t' and args.repeat == 1 else same[m]} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
