"""GPU readiness in one prepared script (issue 12, run by hand on a CUDA machine).

    python tests/benchmarks/bench_gpu.py                 # (a) CPU vs CUDA agreement, (b) throughput table
    python tests/benchmarks/bench_gpu.py --dry-run       # the same code paths on CPU, tiny sizes (no GPU needed)

(a) Agreement. The same 2 realizations x (unet, resnet, els) x --check-steps steps are computed with
    `--device cpu` and `--device cuda`, both with `--estimator exact` (auto resolves to Hutchinson on
    CPU and exact on CUDA for 1x32x32 images, so `auto` would compare two methods) and TF32 switched
    off. The asym of every step must agree to ASYM_RTOL = 1e-3 relative. Why 1e-3: both devices
    evaluate the same float32 formulas; only the summation order of the kernels differs (~1e-6
    relative per operation), which the 20-step DDIM path and the Jacobian's Frobenius sums amplify to
    ~1e-5..1e-4 at most. A real defect (another method: Hutchinson with 16 probes scatters by ~1e-2; a
    wrong label, scale or padding) moves asym by 1e-2 or more, so 1e-3 separates the two with margin.
    ELS machines use --max-samples for the CPU side's sake (their closed form is the same on both).
(b) Throughput. --realizations (100) x (unet, resnet, els) x --nsteps (20) on the MNIST digits with the
    shipped checkpoints, once per --batches (1, 8, 32), each into a fresh run: realizations per second
    (whole study, and per model) and the peak GPU memory (torch.cuda.max_memory_allocated).

Exits with a one-line message and code 2 when CUDA is absent (unless --dry-run), 1 when (a) fails.
Paste the printed markdown table into the README.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ASYM_RTOL = 1e-3


def study(device: str, run_dir: Path, args, models, realizations: int, nsteps: int, batch: int = 1, **extra):
    """One compute run; returns (seconds, per-model seconds, run store)."""
    from edtool.study.compute import ComputeConfig, Reporter, compute
    from edtool.store.run import open_run

    class Clock(Reporter):
        def __init__(self):
            self.per_model, self.last = {m: 0.0 for m in models}, None

        def start(self, *a, **k):
            self.last = time.perf_counter()

        def cell_done(self, r, model, asym_mean, failed):
            now = time.perf_counter()
            self.per_model[model] += now - self.last
            self.last = now

    clock = Clock()
    cfg = ComputeConfig(dataset=args.dataset, data_root=args.data_root, models=list(models), unet=args.unet,
                        resnet=args.resnet, nsteps=nsteps, realizations=realizations, probes=args.probes,
                        device=device, batch=batch, run_dir=str(run_dir), max_samples=args.max_samples, **extra)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    summary = compute(cfg, clock)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if summary["failures"]:
        print("failures:", *summary["failures"], sep="\n  ")
    return seconds, clock.per_model, open_run(run_dir)


def check_agreement(args, tmp: Path, devices) -> bool:
    """(a): asym on two devices, same exact estimator; prints the worst relative difference per model."""
    runs = {}
    for i, dev in enumerate(devices):
        seconds, _, runs[i] = study(dev, tmp / f"agree-{i}", args, args.models, 2, args.check_steps, estimator="exact")
        print(f"(a) {dev}: 2 realizations x {','.join(args.models)} x {args.check_steps} steps in {seconds:.1f}s "
              f"(device recorded: {runs[i].config['device']})")
    a, b = (runs[i].read("asym") for i in (0, 1))
    ok = True
    print(f"(a) asym {devices[0]} vs {devices[1]}, tolerance {ASYM_RTOL:g} relative (see the docstring):")
    for m, name in enumerate(runs[0].models):
        rel = np.abs(a[:, m] - b[:, m]) / np.maximum(np.abs(a[:, m]), 1e-12)
        worst = float(np.nanmax(rel)) if np.isfinite(rel).any() else float("nan")
        passed = bool(np.isfinite(rel).all() and worst <= ASYM_RTOL)
        ok &= passed
        print(f"    {name:<8} max relative difference {worst:.2e}  {'ok' if passed else 'FAILED'}")
    return ok


def throughput(args, tmp: Path, device: str) -> list:
    """(b): realizations per second and peak memory for each batch size."""
    rows = []
    for batch in args.batches:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds, per_model, run = study(device, tmp / f"speed-b{batch}", args, args.models, args.realizations,
                                        args.nsteps, batch=batch)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        estimators = {m: run.config["models"][m].get("estimator") for m in args.models}
        rows.append(dict(batch=batch, seconds=seconds, per_second=args.realizations / seconds, peak_gib=peak,
                         per_model={m: args.realizations / s if s > 0 else float("nan") for m, s in per_model.items()},
                         estimators=estimators))
        print(f"(b) --batch {batch}: {args.realizations} realizations in {seconds:.1f}s = "
              f"{args.realizations / seconds:.2f}/s, peak GPU memory {peak:.2f} GiB", flush=True)
    return rows


def table(rows, args, device_name: str) -> str:
    models = args.models
    head = ("| --batch | realizations/s (all models) | " + " | ".join(f"{m} real./s" for m in models)
            + " | peak GPU memory |")
    lines = [f"{args.realizations} realizations x ({', '.join(models)}) x {args.nsteps} steps, {args.dataset}, "
             f"{device_name}; estimators: " + ", ".join(f"{m} {e}" for m, e in rows[0]["estimators"].items()), "",
             head, "|" + "---|" * (3 + len(models))]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['per_second']:.2f} | " + " | ".join(f"{r['per_model'][m]:.2f}" for m in models)
                     + f" | {r['peak_gib']:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes: checks the script, not a GPU.")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--unet", default=None, help="default: the shipped checkpoint")
    ap.add_argument("--resnet", default=None)
    ap.add_argument("--models", default="unet,resnet,els")
    ap.add_argument("--realizations", type=int, default=100)
    ap.add_argument("--nsteps", type=int, default=20)
    ap.add_argument("--check-steps", type=int, default=20, help="steps of the CPU-vs-CUDA check (a)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--max-samples", type=int, default=None, help="training images of the ELS machines (all)")
    ap.add_argument("--skip-check", action="store_true", help="only (b)")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",")]

    if args.dry_run:
        devices, device, name = ("cpu", "cpu"), "cpu", "CPU (dry run)"
        args.realizations, args.nsteps, args.check_steps = min(args.realizations, 2), min(args.nsteps, 2), 2
        args.batches, args.max_samples = [1, 2], args.max_samples or 50  # batched and not, tiny
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both devices, for (a) and a fair (b)
        torch.backends.cudnn.allow_tf32 = False
        devices, device, name = ("cpu", "cuda"), "cuda", torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        ok = True
        if not args.skip_check:
            saved = args.max_samples
            args.max_samples = args.max_samples or 1000  # ELS on the CPU side stays a few minutes
            ok = check_agreement(args, Path(tmp), devices)
            args.max_samples = saved
        rows = throughput(args, Path(tmp), device)
    print()
    print(table(rows, args, name))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
