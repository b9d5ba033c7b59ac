"""Benchmark SPEC 12's locality and alignment on MNIST (run by hand): cost per step and the probe
estimator's error against exact.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_locality.py [--quick] [--seeds 5] [--out FILE]

For the shipped MNIST UNet and ResNet (1x32x32) at t = 0.9, 0.5, 0.1 on each network's own DDIM path
(10 steps from seed 0), one sample per point, measured side by side in this one process:
  ed-auto     the pipeline's default ED (exterior_derivative, method auto: Hutchinson, 16 probes on CPU)
  exact-J     the dense Jacobian (n = 1024 VJPs in vmapped chunks), what --locality adds for a network
  loc-exact   the profile from that J (shell sums, on top of exact-J)
  els-band    the calibrated ELS machine's closed-form band at the same point (what its analytic ED also builds)
  align-els   alignment against that band (on top of exact-J and els-band)
  probe-m     the masked-probe profile from m drawn pixels (2m products), over --seeds seeds: time per
              call, and its error against exact: RMS and worst |est - exact| over radii and seeds, the
              share of (radius, seed) within 3 standard errors, and how often r90 agrees
Times are CPU seconds of this process (one thread: what the work costs, whatever else runs).
"""

import argparse
import json
import statistics
import time

import torch

from edtool.diffusion import ddim_sample, initial_noise
from edtool.jacobian.locality import alignment, locality
from edtool.jacobian.operators import FieldJacobian, jacobian_operator

TIMES = (0.9, 0.5, 0.1)
NSTEPS = 10
PIXELS = (32, 64, 128)


def cpu(fn):
    """(result, CPU seconds) of fn()."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def points(net, times):
    found = {}

    def keep(j, t, x):
        if round(t, 6) in times:
            found[round(t, 6)] = x.clone()

    with torch.no_grad():
        ddim_sample(net.eps, initial_noise(0, (1, 1, 32, 32)), NSTEPS, on_step=keep)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="t = 0.5 only, UNet only")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from edtool.jacobian.ed import exterior_derivative
    from edtool.config import ComputeConfig
    from edtool.study.prepare import prepare

    study = prepare(ComputeConfig(models=["unet", "resnet", "els"], device="cpu"))
    els = study.fields["els"]
    times = (0.5,) if args.quick else TIMES
    rows = []
    for name in (("unet",) if args.quick else ("unet", "resnet")):
        net = study.fields[name]
        for t, x in sorted(points(net, times).items(), reverse=True):
            tb = torch.full((1,), t)
            f = lambda v: net.score(tb, v)  # noqa: E731
            row = {"model": name, "t": t}
            _, row["ed-auto"] = cpu(lambda: exterior_derivative(f, x, seed=0))
            op = FieldJacobian(f, x)
            _, row["exact-J"] = cpu(lambda: op.dense())
            exact, row["loc-exact"] = cpu(lambda: locality(op, method="exact"))
            ref, row["els-band"] = cpu(lambda: jacobian_operator(els.field(tb), x))
            al, row["align-els"] = cpu(lambda: alignment(op, ref))
            row["r90_jac"], row["r90_ed"] = exact.r90_jac.item(), exact.r90_ed.item()
            row["align_jac"], row["align_ed"] = al.align_jac.item(), al.align_ed.item()
            row["els_k"] = els.patch_size_at(t)
            for m in PIXELS:
                errs, within, r90_same, secs = [], [], [], []
                for s in range(args.seeds):
                    est, sec = cpu(lambda: locality(FieldJacobian(f, x), method="probe", pixels=m, seed=s))
                    secs.append(sec)
                    for q in ("loc_jac", "loc_ed"):
                        d = (getattr(est, q) - getattr(exact, q)).abs()
                        errs += d.flatten().tolist()
                        se = getattr(est, q + "_stderr")
                        within += (d <= 3 * se + 1e-7).flatten().tolist()
                    r90_same.append(est.r90_jac.item() == exact.r90_jac.item())
                row[f"probe-{m}"] = {
                    "cpu_s": statistics.median(secs),
                    "rms_err": (sum(e * e for e in errs) / len(errs)) ** 0.5, "max_err": max(errs),
                    "within_3se": sum(within) / len(within), "r90_jac_agrees": sum(r90_same) / len(r90_same)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
