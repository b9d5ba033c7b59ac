"""GPU readiness in one prepared script, run by hand on a CUDA machine.

    python tests/benchmarks/bench_gpu.py --time-limit 420            # on the GPU machine (one H100: ~6 min)
    python tests/benchmarks/bench_gpu.py --dry-run                   # the same script on CPU, tiny sizes

It measures in this order, so that a job cut short still returns what only the GPU can give:
1. Warm-up, untimed: one realization of every model on the device (CUDA context, cuBLAS and cuDNN start-up,
   the ELS machine's keys; each machine is built once per device and data size, and every later run reuses
   it, so no row pays for building it).
2. (a), device side: 2 realizations x --check-steps steps, the networks with `--estimator exact` (`auto`
   resolves to Hutchinson on CPU and exact on CUDA for 1x32x32 images, so `auto` would compare two
   methods), the ELS machines with their closed form (analytic), on --max-samples training images for the
   CPU side's sake (default 1000).
3. (b) Throughput: for each of --batches, --realizations (rounded up to whole batches; the row says how many)
   x --models x --nsteps on the MNIST digits with the shipped checkpoints, each into a fresh run:
   realizations per second, timed from the first measured step to the last (setup excluded), per model,
   and the peak GPU memory. Each row is printed and flushed as soon as it is measured.
4. (a), CPU side: the realizations of step 2 on CPU; the asym of every step must agree to ASYM_RTOL = 1e-3
   relative. Why 1e-3: both devices evaluate the same float32 formulas (compute turns TF32 off and picks
   deterministic kernels on CUDA); only the summation order of the kernels differs (~1e-6 relative per
   operation), which the 20-step DDIM path and the Jacobian's Frobenius sums amplify to ~1e-5..1e-4 at
   most. A real defect (another method: Hutchinson with 16 probes scatters by ~1e-2; TF32, ~1e-2; a wrong
   label, scale or padding) moves asym by 1e-2 or more, so 1e-3 separates the two with margin.

--time-limit S: no step starts after S seconds from the start (so the script ends within one step of S:
seconds on a GPU, up to a minute for an exact CPU step of (a)); what was measured is printed, and the
parts cut are named. Exit codes: 0 done and (a) agrees, 1 (a) disagrees, 2 bad input or no CUDA, 3 cut by
--time-limit. The output is a few dozen lines (each file a job brings back stays far below 16 MB).
Paste the printed markdown table into docs/scale-out.md.

A short GPU job: `--time-limit 390 --realizations 8 --batches 1,8 --check-steps 3` (what
`EDTOOL_CAMPAIGN_NETS= bash experiments/training/gpu_campaign.sh run 0 450` runs). Expected on one H100:
about 5 minutes (3-8), estimated without a GPU from CPU measurements: the ELS machine's torch path costs
about what 16 CPU cores do, i.e. 10-15 s a realization from docs/performance.md's 130-220
CPU-seconds, at any batch; an exact Jacobian step costs 15 (ResNet) and 19 (UNet) CPU-seconds here (2026-12-07,
2-core VM), ~600 GFLOP, so ~1-2 s a realization per network on the GPU. Warm-up ~40 s (start-up, keys, one
realization), (a) device side ~15 s, (b) 16 realizations ~230 s, (a) CPU side 6 points x 2 networks x 17
CPU-seconds on the GPU machine's 16 cores ~30 s.
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edtool.study.compute import Reporter

ASYM_RTOL = 1e-3


class TimeUp(Exception):
    """--time-limit reached: raised from the reporter between two steps, it ends the run in progress."""


class Clock(Reporter):
    """A compute Reporter timing from the first measured step (after loading and store creation) to the
    last, per model, and stopping the run at the deadline."""

    def __init__(self, models, deadline: float):
        self.per_model, self.deadline = {m: 0.0 for m in models}, deadline
        self.first = self.last = None

    def start(self, *a, **k):
        self.first = self.last = time.perf_counter()

    def step(self, *a):
        if time.perf_counter() > self.deadline:
            raise TimeUp()

    def cell_done(self, r, model, asym_mean, failed):
        now = time.perf_counter()
        self.per_model[model] += now - self.last
        self.last = now

    def note(self, message):
        if message not in NOTES:  # each once: every run of the script says the same
            NOTES.add(message)
            print(f"note: {message}", flush=True)


NOTES = set()


def build_machines_once():
    """prepare() builds each ELS machine afresh for every run, and the machine builds its keys on first use.
    Within this script the same settings give the same machine, so keep each one (per kind, device, data
    size and settings) with its cached keys: the warm-up pays for building, the timed rows do not."""
    import edtool.els.factory as factory

    built, build = {}, factory.build_machine

    def build_once(kind, images, labels=None, **kw):
        key = (kind, str(images.device), tuple(images.shape), repr(sorted(kw.items())))
        if key not in built:
            built[key] = build(kind, images, labels, **kw)
        return built[key]

    factory.build_machine = build_once


def study(device: str, run_dir: Path, args, models, realizations: int, nsteps: int, batch: int = 1, **extra):
    """One compute run: (seconds from first to last measured step, seconds per model, run store)."""
    from edtool.config import ComputeConfig
    from edtool.study.compute import compute
    from edtool.store.run import open_run

    clock = Clock(models, args.deadline)
    cfg = ComputeConfig(dataset=args.dataset, data_root=args.data_root, models=list(models), unet=args.unet,
                        resnet=args.resnet, nsteps=nsteps, realizations=realizations, probes=args.probes,
                        device=device, batch=batch, run_dir=str(run_dir), **extra)
    summary = compute(cfg, clock)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if summary["failures"]:
        print("    failures:", *summary["failures"], sep="\n      ", flush=True)
    return time.perf_counter() - clock.first, clock.per_model, open_run(run_dir)


def agreement_runs(args, tmp: Path, device: str) -> dict:
    """(a) on one device: {model: asym (2, steps)}; networks exact, machines analytic, in two runs."""
    from edtool.config import NETWORKS

    asym, t0 = {}, time.perf_counter()
    nets = [m for m in args.models if m in NETWORKS]
    for kind, models in (("exact", nets), ("auto", [m for m in args.models if m not in nets])):
        if models:  # `auto` is the machines' closed form
            _, _, run = study(device, tmp / f"agree-{device}-{kind}", args, models, 2, args.check_steps,
                              estimator=kind, max_samples=args.check_samples)
            asym.update({name: run.read("asym")[:, m] for m, name in enumerate(run.models)})
    print(f"(a) {device}: 2 realizations x {','.join(args.models)} x {args.check_steps} steps in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return asym


def compare(ours: dict, reference: dict, device: str) -> bool:
    """(a): the worst relative difference of asym per model, against ASYM_RTOL."""
    ok = True
    print(f"(a) asym {device} vs cpu, tolerance {ASYM_RTOL:g} relative (see the docstring):")
    for name, a in ours.items():
        rel = np.abs(a - reference[name]) / np.maximum(np.abs(reference[name]), 1e-12)
        worst = float(np.nanmax(rel)) if np.isfinite(rel).any() else float("nan")
        passed = bool(np.isfinite(rel).all() and worst <= ASYM_RTOL)
        ok &= passed
        print(f"    {name:<8} max relative difference {worst:.2e}  {'ok' if passed else 'FAILED'}", flush=True)
    return ok


def throughput_row(args, tmp: Path, batch: int) -> str:
    """(b) one row of the table: a fresh run of whole batches at --batch `batch`."""
    device = args.device
    realizations = math.ceil(args.realizations / batch) * batch
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds, per_model, run = study(device, tmp / f"speed-b{batch}", args, args.models, realizations, args.nsteps,
                                    batch=batch, max_samples=args.max_samples)
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.startswith("cuda") else "n/a"
    rates = " | ".join(f"{realizations / s:.2f}" if s > 0 else "nan" for s in per_model.values())
    estimators = ", ".join(f"{m} {run.config['models'][m]['estimator']}" for m in args.models)
    return f"| {batch} | {realizations} | {realizations / seconds:.3f} | {rates} | {peak} | {estimators} |"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="the device under test (cuda; cpu stands in for a GPU)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, on CPU unless --device: checks the script")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; no step is measured after it")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--unet", default=None, help="default: the shipped checkpoint")
    ap.add_argument("--resnet", default=None)
    ap.add_argument("--models", default="unet,resnet,els")
    ap.add_argument("--realizations", type=int, default=100, help="per row of (b), rounded up to whole batches")
    ap.add_argument("--nsteps", type=int, default=20)
    ap.add_argument("--check-steps", type=int, default=20, help="steps of the CPU-vs-device check (a)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--max-samples", type=int, default=None, help="training images of the ELS machines in (b) (all)")
    ap.add_argument("--check-samples", type=int, default=1000, help="training images of the ELS machines in (a)")
    ap.add_argument("--skip-check", action="store_true", help="only (b)")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        assert args.batches and min(args.batches) >= 1 and args.realizations >= 1
    except (ValueError, AssertionError):
        ap.error(f"--batches {args.batches!r} / --realizations {args.realizations}: give positive whole numbers")
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        args.realizations, args.nsteps, args.check_steps = min(args.realizations, 2), min(args.nsteps, 2), 2
        args.batches, args.max_samples, args.check_samples = [1, 2], args.max_samples or 50, 50
    return args


def main(argv=None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    args.deadline = started + (args.time_limit if args.time_limit is not None else math.inf)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or with --device cpu (--dry-run for tiny sizes) to check the script on CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU standing in"
    print(f"bench_gpu on {args.device} ({name}), torch {torch.__version__}; limit "
          f"{args.time_limit if args.time_limit is not None else 'none'} s", flush=True)
    build_machines_once()
    phases = ["warm-up", *(() if args.skip_check else ["(a) device side"]), *(f"(b) --batch {b}" for b in args.batches),
              *(() if args.skip_check else ["(a) cpu side"])]
    done, ok = 0, True  # phases measured so far
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        tmp = Path(tmp)
        try:
            t0 = time.perf_counter()
            study(args.device, tmp / "warm-up", args, args.models, 1, args.nsteps, max_samples=args.max_samples)
            print(f"warm-up: 1 realization in {time.perf_counter() - t0:.1f}s (untimed)", flush=True)
            done += 1
            if not args.skip_check:
                ours = agreement_runs(args, tmp, args.device)
                done += 1
            print(f"\n(b) {args.nsteps} steps, {args.dataset}, {name}; realizations/s from the first measured step "
                  "to the last, setup excluded\n")
            print("| --batch | realizations | all models real./s | " + " | ".join(f"{m} real./s" for m in args.models)
                  + " | peak GPU memory | estimators |")
            print("|" + "---|" * (5 + len(args.models)), flush=True)
            for batch in args.batches:
                print(throughput_row(args, tmp, batch), flush=True)
                done += 1
            if not args.skip_check:
                print()
                ok = compare(ours, agreement_runs(args, tmp, "cpu"), args.device)
                done += 1
        except TimeUp:
            print(f"\nstopped at --time-limit {args.time_limit:g} s after {time.perf_counter() - started:.0f} s; "
                  f"not measured: {', '.join(phases[done:])}", flush=True)
            return 3
    print(f"\nbench_gpu done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
