"""Benchmark the exterior-derivative estimators against the seed tool's approach (run by hand).

    python tests/benchmarks/bench_ed.py [--unet PATH] [--resnet PATH] [--quick] [--out FILE] [--threads N]

For the MNIST UNet and ResNet (shipped checkpoints, or untrained networks of the same architecture
when a file is missing) and an untrained CIFAR-sized UNet (3x32x32), at t = 0.9, 0.5, 0.1 along a
real DDIM trajectory (10 steps from seed 0), one sample per point, side by side:
  seed     the old tool: torch.autograd.functional.jacobian of the flattened score with
           create_graph=True (one backward pass per output, the graph kept)
  exact    edtool.jacobian.ed, method="exact"
  hutch-P  edtool.jacobian.ed, method="hutchinson" with P probes (16 is the pipeline's default), repeated with
           probe seeds 0..S-1 (--probe-seeds S, default 5): time is the median per seed, the error is
           the root mean square over seeds (and the worst seed), since one draw is one sample of the noise
Every (point, method) runs in its own subprocess, which reports its wall and CPU time and its peak
resident memory (ru_maxrss) above a baseline taken after loading the network and warming up the
kernels. Speed-ups compare CPU time: with one thread it is what the method costs, while wall time on
a shared machine also counts the other jobs. `--quick` measures t = 0.5 only.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edtool.diffusion import ddim_sample, initial_noise
from edtool.jacobian.ed import exterior_derivative
from edtool.networks.models import MinimalResNet, MinimalUNet, Network
from edtool.paths import shipped_dir

TIMES = (0.9, 0.5, 0.1)
NSTEPS = 10  # so that the trajectory passes exactly through TIMES
PROBES = (8, 16, 32, 128)
MAX_MEMORY = 2**30  # exact's budget (the default of exterior_derivative)


# ----------------------------------------------------------------------------- the cases


def build_network(case: dict) -> Network:
    """The case's network: its checkpoint when the file exists, else the same architecture untrained (seed 0)."""
    path = case.get("path")
    if path and Path(path).exists():
        from edtool.networks.checkpoints import load
        return load(path)
    torch.manual_seed(0)
    if case["arch"] == "unet":
        return Network(MinimalUNet(in_channels=case["channels"], out_channels=case["channels"], fsizes=[32, 64, 128]))
    return Network(MinimalResNet(in_channels=case["channels"], out_channels=case["channels"], emb_dim=64,
                                 num_layers=4))


def trajectory_points(net: Network, channels: int, times) -> dict:
    """x at each requested t along the network's own DDIM trajectory from seed 0."""
    points = {}

    def keep(j, t, x):
        if round(t, 6) in times:
            points[round(t, 6)] = x.clone()

    ddim_sample(net.eps, initial_noise(0, (1, channels, 32, 32)), NSTEPS, on_step=keep)
    return points


# ----------------------------------------------------------------------------- the methods


def seed_tool_ed(f, x) -> dict:
    """The old tool's way: the full Jacobian of the flattened score, one output at a time, create_graph=True."""
    shape = x.shape

    def score_flat(x_flat):
        return f(x_flat.view(shape)).flatten()

    J = torch.autograd.functional.jacobian(score_flat, x.flatten(), create_graph=True).detach()
    ed, jac = torch.linalg.matrix_norm(J - J.T), torch.linalg.matrix_norm(J)
    return dict(ed_fro=ed.item(), jac_fro=jac.item(), asym=(ed / (2 * jac)).item(), ed_stderr=0.0)


def edtool_ed(f, x, method: str, seed: int = 0) -> dict:
    """edtool.jacobian.ed on one sample: method 'exact' or 'hutch-P' (probes drawn with `seed`)."""
    if method == "exact":
        res = exterior_derivative(f, x, method="exact", max_memory=MAX_MEMORY)
    else:
        res = exterior_derivative(f, x, method="hutchinson", probes=int(method.split("-")[1]), seed=seed)
    return {k: getattr(res, k).item() for k in ("ed_fro", "jac_fro", "asym", "ed_stderr")}


def timed_runs(f, x, method: str, seeds: int) -> dict:
    """The method once (seed, exact) or once per probe seed (hutch-P); median time, per-seed values."""
    runs = []
    for s in range(1 if method in ("seed", "exact") else seeds):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = seed_tool_ed(f, x) if method == "seed" else edtool_ed(f, x, method, seed=s)
        runs.append(dict(out, wall_s=time.perf_counter() - start, cpu_s=time.process_time() - start_cpu))
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return dict(runs[0], wall_s=med("wall_s"), cpu_s=med("cpu_s"), ed_stderr=med("ed_stderr"),
                ed_fro_runs=[r["ed_fro"] for r in runs], asym_runs=[r["asym"] for r in runs])


def warm_up(f, x, method: str) -> None:
    """Run the kernels once so the timing measures the method, not first-call setup."""
    if method == "seed":
        x = x.clone().requires_grad_()
        torch.autograd.grad(f(x).flatten()[0], x, create_graph=True)
    else:
        exterior_derivative(f, x, method="hutchinson", probes=2)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(job: dict) -> None:
    """One measurement in a fresh process; prints one JSON line."""
    torch.set_num_threads(job["threads"])
    net = build_network(job["case"])
    x = torch.load(job["x_path"])
    t = torch.tensor(job["t"])
    f = lambda x: net.score(t, x)  # noqa: E731
    warm_up(f, x, job["method"])
    base = max_rss_mb()
    out = timed_runs(f, x, job["method"], job["seeds"])
    out.update(peak_mb=max_rss_mb(), extra_mb=max_rss_mb() - base)
    print(json.dumps(out))


def measure(case: dict, x_path: str, t: float, method: str, threads: int, seeds: int) -> dict:
    """Run one worker subprocess and read its JSON line."""
    job = dict(case=case, x_path=x_path, t=t, method=method, threads=threads, seeds=seeds)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} at t={t} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report


def rms(values) -> float:
    return (sum(v * v for v in values) / len(values)) ** 0.5


def table(rows: list) -> str:
    """Markdown table: one row per (case, t, method); errors relative to exact, speed-up relative to seed."""
    head = ("| model | t | method | CPU (s) | wall (s) | speed-up vs seed (CPU) | peak RSS (MB) | extra RSS (MB) "
            "| ed_fro | asym | ed_fro rel. err (RMS) | asym rel. err (RMS) | asym rel. err (worst seed) | rel. stderr |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['t']} | {r['method']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} "
                     f"| {r['speedup']:.1f}x "
                     f"| {r['peak_mb']:.0f} | {r['extra_mb']:.0f} | {r['ed_fro']:.4g} | {r['asym']:.4f} "
                     f"| {r['ed_err']:.2%} | {r['asym_err']:.2%} | {r['asym_err_max']:.2%} "
                     f"| {r['ed_stderr'] / r['ed_fro']:.2%} |")
    return "\n".join(lines)


def verdicts(rows: list) -> str:
    """The targets, checked point by point."""
    out = []
    by_point = {}
    for r in rows:
        by_point.setdefault((r["key"], r["t"]), {})[r["method"]] = r
    for (_, t), m in by_point.items():
        seed, exact, model = m["seed"], m["exact"], m["seed"]["model"]
        out.append(f"- {model}, t={t}: exact {exact['speedup']:.1f}x faster than seed "
                   f"({'ok' if exact['cpu_s'] <= seed['cpu_s'] else 'SLOWER'}), extra memory "
                   f"{exact['extra_mb']:.0f} MB vs seed {seed['extra_mb']:.0f} MB, budget {MAX_MEMORY / 2**20:.0f} MB "
                   f"({'ok' if exact['extra_mb'] <= MAX_MEMORY / 2**20 else 'OVER'})")
        for p in PROBES:
            h = m[f"hutch-{p}"]
            ok = h["asym_err"] <= 0.02 and h["speedup"] >= 50
            out.append(f"  - hutch-{p}: asym err {h['asym_err']:.2%} RMS ({h['asym_err_max']:.2%} worst seed), "
                       f"{h['speedup']:.0f}x faster than seed: "
                       f"{'meets' if ok else 'misses'} (<= 2%, >= 50x)")
    mnist, cifar = by_point.get(("mnist-unet", 0.5)), by_point.get(("cifar-unet", 0.5))
    if mnist and cifar:
        gaps = ", ".join(f"hutch-{p} {cifar[f'hutch-{p}']['speedup'] / mnist[f'hutch-{p}']['speedup']:.1f}x"
                         for p in PROBES)
        out.append(f"- speed-up over seed, CIFAR-size (n=3072) / MNIST (n=1024) UNet at t=0.5 (n grew 3x): {gaps}")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", default=str(shipped_dir() / "mnist5k_unet.safetensors"))
    ap.add_argument("--resnet", default=str(shipped_dir() / "mnist5k_resnet.safetensors"))
    ap.add_argument("--quick", action="store_true", help="measure t = 0.5 only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1)")
    ap.add_argument("--probe-seeds", type=int, default=5, help="probe seeds per Hutchinson point (default 5)")
    ap.add_argument("--out", help="also write the markdown report to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    cases = [dict(key="mnist-unet", model="MNIST UNet", arch="unet", channels=1, path=args.unet),
             dict(key="mnist-resnet", model="MNIST ResNet", arch="resnet", channels=1, path=args.resnet),
             dict(key="cifar-unet", model="CIFAR-size UNet (untrained)", arch="unet", channels=3, path=None)]
    times = (0.5,) if args.quick else TIMES
    methods = ["seed", "exact"] + [f"hutch-{p}" for p in PROBES]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if case["path"] and not Path(case["path"]).exists():
                note = f"{case['path']} not found: {case['model']} is an UNTRAINED network of the same architecture"
                print("notice:", note, flush=True)
                notes.append(note)
                case["model"] += " (untrained)"
            points = trajectory_points(build_network(case), case["channels"], times)
            for t in times:
                x_path = os.path.join(tmp, f"{case['key']}_{t}.pt")
                torch.save(points[t], x_path)
                results = {}
                for method in methods:
                    results[method] = measure(case, x_path, t, method, args.threads, args.probe_seeds)
                    r = results[method]
                    print(f"{case['model']} t={t} {method}: {r['cpu_s']:.2f} s CPU, {r['wall_s']:.2f} s wall",
                          flush=True)
                ref, seed = results["exact"], results["seed"]
                for method, r in results.items():
                    ed_errs = [v / ref["ed_fro"] - 1 for v in r["ed_fro_runs"]]
                    asym_errs = [v / ref["asym"] - 1 for v in r["asym_runs"]]
                    rows.append(dict(r, key=case["key"], model=case["model"], t=t, method=method,
                                     speedup=seed["cpu_s"] / r["cpu_s"], ed_err=rms(ed_errs), asym_err=rms(asym_errs),
                                     asym_err_max=max(abs(e) for e in asym_errs)))
    report = "\n\n".join([
        f"torch {torch.__version__}, {args.threads} thread(s), one sample per point, "
        f"DDIM {NSTEPS} steps from seed 0; Hutchinson: median time and RMS error over probe seeds "
        f"0..{args.probe_seeds - 1}; load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
        + ("; --quick (t = 0.5 only)" if args.quick else ""),
        *[f"Note: {n}." for n in notes],
        table(rows),
        "Targets:\n" + verdicts(rows)])
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
