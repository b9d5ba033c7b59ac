"""Does the paper's learning rate help? A paired A/B from the same start, batch, seed and draws.

Arm A, the paper's lr 1e-4 with per-step decay 0.999965, is the campaign's ResNet (`resnet/`, its first 2,000
steps). Arm B, the recipe the networks in `<net>/start/` were trained with (lr 1e-3 decaying exponentially
to 5e-5 over the stretch), starts from the same network (`resnet/start/`) with the same seed, so both arms see
identical batches, times and noise step for step: the per-step loss difference is paired and its standard error
small. Arm B's state lives in `lr_ab/` (resumable; snapshot with held-out loss at 2,000 steps).

    python experiments/training/lr_ab.py run        # continue arm B (one thread; stop at any moment)
    python experiments/training/lr_ab.py compare    # paired per-step losses, held-out losses at 2,000 steps
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ARM_A, ARM_B = HERE / "resnet", HERE / "lr_ab"
ARM_A_STATE = ARM_A if (ARM_A / "state.json").exists() else HERE / "kept" / "resnet"  # the working state, or git's
STEPS = 2000


def run(held_out: str) -> None:
    cmd = ["edtool", "train", "--state", "experiments/training/lr_ab", "--steps", str(STEPS),
           "--snapshot-every", str(STEPS), "--held-out-root", held_out, "--ckpt-every", "100", "--quiet"]
    if not (ARM_B / "state.json").exists():  # the first stretch; a state continues with its own settings
        cmd += ["--arch", "resnet", "--width", "64", "--layers", "4", "--lr", "1e-3", "--lr-final-factor", "0.05",
                "--batch", "64", "--ema-decay", "0.999",
                "--init-from", "experiments/training/resnet/start/mnist5k_resnet.safetensors"]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def losses(folder: Path):
    """The per-step training losses a state holds (its tensors checked by hash first)."""
    from safetensors.torch import load_file

    from edtool.networks import train_state

    return load_file(str(folder / train_state.read(folder)["tensors"]))["losses"]


def compare() -> None:
    a, b = losses(ARM_A_STATE), losses(ARM_B)
    n = len(b)
    print(f"arm B at {n} of {STEPS} steps; per-step training loss, mean over each window (same draws in both arms)")
    for lo, hi in [(0, 100), (100, 500), (500, 1000), (1000, 1500), (1500, 2000)]:
        if hi <= n:
            d = b[lo:hi] - a[lo:hi]
            print(f"  steps {lo:>4}-{hi:<4} paper {a[lo:hi].mean():.5f}  shipped recipe {b[lo:hi].mean():.5f}  "
                  f"difference {d.mean():+.5f} +- {d.std() / len(d) ** 0.5:.5f}")
    from edtool.networks.train import read_snapshots

    for name, folder in (("paper", ARM_A), ("shipped recipe", ARM_B)):
        for r in read_snapshots(folder):
            if r["step"] == STEPS:
                print(f"  held-out t10k loss of the moving average at {STEPS}: {name} {r['held_out_loss']:.5f}")


if __name__ == "__main__":
    what = sys.argv[1:] or ["compare"]
    if what == ["run"]:
        run(os.environ.get("EDTOOL_HELD_OUT", "../shared/data/mnist"))
    elif what == ["compare"]:
        compare()
    else:
        sys.exit("usage: python experiments/training/lr_ab.py [run | compare]")
