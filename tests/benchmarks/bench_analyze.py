"""The end-to-end target: the default `edtool analyze` against a yardstick timed in the same run.

    python tests/benchmarks/bench_analyze.py [--threads 2] [--repeat 1] [--floor] [-- extra analyze flags]

Times forty 2048 x 2048 float32 matmuls (the yardstick: the target is analyze <= 17 x this, or <= 60 s on
2 idle cores), then runs the installed `edtool analyze` (the default study: bundled data and checkpoints)
in a fresh folder per repeat, and prints wall times, the ratio and the load average. Run it on an idle
machine for the issue's number, and report the load average with it.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_ceiling, bench_machines next to this file


def yardstick(threads: int) -> float:
    """Seconds for forty 2048 x 2048 float32 matmuls on `threads` threads (best of three)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(40):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def analyze_seconds(threads: int, extra: list) -> float:
    """Wall seconds of `edtool analyze` (default study) in a fresh folder with `threads` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "edtool", "analyze", "--quiet", *extra], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def els_floor(threads: int) -> dict:
    """Seconds of the default study's ELS Jacobian calls at 100 % of the ceiling on `threads` perfectly
    scaling cores, with the work per patch size (builds each size's machine once to count its keys)."""
    import json
    from collections import Counter

    from bench_ceiling import ceiling
    from bench_machines import engine_work

    from edtool import paths
    from edtool.data import load_dataset
    from edtool.els.factory import make_machine

    scales = json.loads((paths.shipped_dir() / "mnist5k_resnet_scales_els-borders.json").read_text())["scales"]
    images = load_dataset("mnist5k")[0]
    top = ceiling()
    x = torch.randn(1, 1, 32, 32)
    rows, total = [], 0.0
    for k, calls in sorted(Counter(scales).items()):
        machine = make_machine("els-borders", images, patch_size=k)
        with torch.no_grad():
            machine.score(0.5, x)  # builds the key cache that engine_work counts
        exps, _, flops = engine_work(machine, k, x)
        seconds = calls * (flops / top["flops"] + exps / top["exps"]) / threads
        rows.append((k, calls, exps, flops, seconds))
        total += seconds
    return {"rows": rows, "seconds": total, "ceiling": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--floor", action="store_true", help="also the roofline floor of the study's ELS Jacobian calls")
    p.add_argument("extra", nargs="*", help="extra flags for edtool analyze (after --)")
    args = p.parse_args()
    load = os.getloadavg()[0]
    mm = yardstick(args.threads)
    runs = [analyze_seconds(args.threads, args.extra) for _ in range(args.repeat)]
    best = min(runs)
    print(f"threads {args.threads}, load average at start {load:.2f}, now {os.getloadavg()[0]:.2f}")
    print(f"forty 2048^2 float32 matmuls: {mm:.2f} s")
    print(f"edtool analyze (default study): {', '.join(f'{r:.1f}' for r in runs)} s (best {best:.1f} s)")
    print(f"ratio analyze / yardstick: {best / mm:.1f} (target <= 17, or analyze <= 60 s on 2 idle cores)")
    if args.floor:
        floor = els_floor(args.threads)
        top = floor["ceiling"]
        print(f"\nroofline floor of the ELS Jacobian calls (one-core ceiling {top['flops'] / 1e9:.1f} GFLOP/s, "
              f"{top['exps'] / 1e9:.2f} G exp/s, x {args.threads} threads):")
        print("| k | calls | exps per call (G) | GFLOP per call | floor s (all calls) |\n|---|---|---|---|---|")
        for k, calls, exps, flops, seconds in floor["rows"]:
            print(f"| {k} | {calls} | {exps / 1e9:.2f} | {flops / 1e9:.0f} | {seconds:.1f} |")
        print(f"ELS Jacobian calls at 100 % of the ceiling: {floor['seconds']:.1f} s "
              f"= {floor['seconds'] / mm:.1f} x the yardstick (the whole study's target: 17 x)")


if __name__ == "__main__":
    main()
