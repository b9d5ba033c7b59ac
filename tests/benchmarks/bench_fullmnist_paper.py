"""The seed tool's workflow on full MNIST with the paper's file formats, timed.

1. trains a small UNet and ResNet on the 60,000 training digits with `edtool train` (minutes of CPU:
   the point is the plumbing and the time, not sample quality);
2. converts each to the paper's pickle format (`backbone_MNIST_{UNet,ResNet}_zeros.pt`: a DDIM object
   whose backbone has the paper's classes and parameter names, as tests/paper_networks.py writes
   them) and writes the paper's `scales_MNIST_ResNet_zeros.pt` (its published schedule) beside them
   in `<work>/checkpoints/`;
3. runs, from `<work>`, the seed's command `edtool analyze --dataset mnist --data-root ROOT` as a user
   would (the installed console script, found paper files imported on the fly) and prints its wall
   time and CPU time.

    python tests/benchmarks/bench_fullmnist_paper.py --data-root ../shared/data/mnist --work /tmp/fullmnist

Runs 2026-11-29 on the shared 2-core VM, OMP_NUM_THREADS=1, two calibrations on the cores:
- 20 steps (the default): killed by the OOM killer at 21.8 GB in the ELS cell at k = 7, where the
  machine copied every distinct candidate window before finding they exceed its key budget (fixed:
  counting now stops at the budget).
- `--analyze-args "--nsteps 10"`, after that fix: both paper files found and imported on the fly;
  analyze 2,795 s wall, 1,828 s CPU, peak memory 18.0 GiB; mean asym unet 0.127, resnet 0.098
  (networks of 300 steps), els 0.062. Per ELS step, 60k costs ~12x mnist5k (bench_els_fullmnist.py).
- The same, after merge plans stopped copying the distinct windows and fragmenting the heap (a6e8613),
  with a sampling run on the other core: analyze 2,346 s wall, 1,665 s CPU, **peak memory 8.1 GiB**;
  the same mean asym (unet 0.1265, resnet 0.0979, els 0.0620).
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the paper stand-in classes and save_paper


from edtool.networks import checkpoints  # noqa: E402
from paper_networks import DDIM, MinimalResNet, MinimalUNet, save_paper

PAPER_SCALES = {"ResNet": [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15]}  # paper_scales.json


def edtool(*args, cwd) -> float:
    """Run the console script (this interpreter's edtool) in cwd; return its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edtool", *map(str, args)], cwd=cwd, check=True)
    return time.perf_counter() - t0


def to_paper(ours: Path, paper_path: Path) -> Path:
    """Our checkpoint -> the paper's pickle (DDIM around the paper's backbone class, same weights)."""
    net = checkpoints.load(ours)
    kw = net.manifest["arch_kwargs"]
    if net.manifest["arch"] == "unet":
        backbone = MinimalUNet(channels=kw["in_channels"], fsizes=kw["fsizes"], mode=kw["mode"], emb_dim=kw["emb_dim"])
    else:
        backbone = MinimalResNet(channels=kw["in_channels"], emb_dim=kw["emb_dim"], mode=kw["mode"],
                                 num_layers=kw["num_layers"], lastksize=kw.get("lastksize", 1))
    backbone.load_state_dict(net.net.state_dict())
    return save_paper(paper_path, DDIM(backbone, kw["in_channels"], default_imsize=32))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="full MNIST in torchvision's layout")
    p.add_argument("--work", default="cache/bench_fullmnist", help="working directory (made if missing)")
    p.add_argument("--steps", type=int, default=300, help="training steps per network")
    p.add_argument("--analyze-args", default="", help="extra arguments for analyze, e.g. '--nsteps 10'")
    a = p.parse_args()
    root, work = Path(a.data_root).resolve(), Path(a.work).resolve()
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    trained = work / "trained"
    times = {}
    for arch, paper_arch, extra in (("unet", "UNet", []), ("resnet", "ResNet", ["--width", 64, "--layers", 4])):
        ours = trained / f"mnist_{arch}.safetensors"
        if not ours.exists():
            times[f"train {arch}"] = edtool("train", "--arch", arch, "--dataset", "mnist", "--data-root", root,
                                            "--steps", a.steps, "--batch", 32, "--out", ours, "--quiet", *extra, cwd=work)
        to_paper(ours, work / "checkpoints" / f"backbone_MNIST_{paper_arch}_zeros.pt")
    torch.save(PAPER_SCALES["ResNet"], work / "checkpoints" / "scales_MNIST_ResNet_zeros.pt")

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    times["analyze"] = edtool("analyze", "--dataset", "mnist", "--data-root", root, "--overwrite",
                              *a.analyze_args.split(), cwd=work)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"\nthreads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cores {os.cpu_count()}")
    for name, s in times.items():
        print(f"{name}: {s:.1f} s wall")
    print(f"analyze CPU (user+sys): {cpu:.1f} s, peak memory of the largest child: {after.ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
