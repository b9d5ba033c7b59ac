"""Agreement with the ELS machine along training: for each kept snapshot of a campaign network
(and the network it started from, step 0), sample els-borders and the ideal score machine `is` from the same
fixed seeds and record the per-seed r against the network; then draw median r with IQR against steps.

    python experiments/training/agreement.py measure --net resnet [--seeds 10 --seed 200 --nsteps 20]
    python experiments/training/agreement.py plot            # docs/figures/agreement_vs_training.png

Each record also keeps the network's loss on held-out MNIST t10k (the snapshot's manifest value, or measured with
the same function and draws for the starting network), so the figure can show agreement next to learning.

`measure` runs `edtool sample` per snapshot into results/agreement/<net>/step_<N>/ (skipping finished ones;
an interrupted one resumes) and keeps the r values in experiments/training/agreement.json, which is committed
(results/ is not). The machines use the calibration of the network the campaign started from (START; it
stands in until the last snapshot is calibrated).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECORD = HERE / "agreement.json"
QUALITY = HERE / "recognizable.json"  # recognizable.py measure
# the networks each campaign started from, with their calibrations
START = {"unet": "experiments/training/unet/start/mnist5k_unet",
         "resnet": "experiments/training/resnet/start/mnist5k_resnet"}
HELD_OUT = REPO.parent / "shared" / "data" / "mnist"  # MNIST t10k in torchvision's layout (campaign.sh's default)


def snapshots(net: str) -> list:
    """(step, weights path) of the network at step 0 and of every snapshot whose weights were kept."""
    from edtool.networks.train import read_snapshots

    return [(0, REPO / f"{START[net]}.safetensors")] + \
        [(r["step"], HERE / net / r["weights"]) for r in read_snapshots(HERE / net) if "weights" in r]


def held_out_loss(weights: Path, root: Path) -> float:
    """The EMA weights' loss on held-out t10k: the manifest's value for a snapshot, else measured exactly as the
    snapshots are (edtool.networks.train.eval_loss, 2,048 fixed draws)."""
    from edtool.data import load_dataset
    from edtool.networks import checkpoints
    from edtool.config import TrainConfig
    from edtool.networks.train import eval_loss

    manifest = checkpoints.read_manifest(weights)
    if manifest.get("held_out_loss") is not None:
        return float(manifest["held_out_loss"])
    images, labels = load_dataset("mnist", root=root, split="test", download=False)
    network = checkpoints.load(weights)
    return eval_loss(network.net, images, labels, TrainConfig(conditional=network.conditional))


def measure(net: str, seeds: int, seed: int, nsteps: int, steps=None, held_out: Path = HELD_OUT) -> None:
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    missing = [e for e in record.values() if e["net"] == net and "held_out_loss" not in e]  # recorded before it was kept
    for entry in missing:
        entry["held_out_loss"] = held_out_loss(REPO / entry["weights"], held_out)
    if missing:
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
    scales = REPO / f"{START[net]}_scales_els-borders.json"
    for step, weights in snapshots(net):
        key = f"{net}/{step}"
        if (steps and step not in steps) or key in record:
            continue
        out = REPO / "results" / "agreement" / net / f"step_{step:08d}"
        rel = lambda p: str(p.relative_to(REPO))  # noqa: E731 (run from the repository root: the record travels)
        cmd = [sys.executable, "-m", "edtool", "sample", "--machine", "els-borders,is", "--checkpoint", rel(weights),
               "--scales", rel(scales), "--seeds", str(seeds), "--seed", str(seed), "--nsteps", str(nsteps),
               "--out", rel(out), "--quiet"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
        summary = json.loads((out / "r2_summary.json").read_text())
        record[key] = {"net": net, "step": step, "weights": str(weights.relative_to(REPO)),
                       "command": " ".join(["edtool", *cmd[3:]]), "held_out_loss": held_out_loss(weights, held_out),
                       **{kind: summary["machines"][kind]["r"] for kind in ("els-borders", "is")}}
        RECORD.write_text(json.dumps(record, indent=1) + "\n")


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    record = json.loads(RECORD.read_text())
    quality = json.loads(QUALITY.read_text()) if QUALITY.exists() else {}
    panels = 3 if quality.get("unet") else 2
    fig, axes = plt.subplots(panels, 1, figsize=(6.5, 3 + 1.8 * (panels - 1)), sharex=True,
                             height_ratios=(2, 1, 1)[:panels])
    ax, lax = axes[0], axes[1]
    for net, colour in (("unet", "tab:blue"), ("resnet", "tab:orange")):
        rows = sorted((v for v in record.values() if v["net"] == net), key=lambda v: v["step"])
        if not rows:
            continue
        steps = np.array([v["step"] for v in rows])
        for kind, style in (("els-borders", "-o"), ("is", ":x")):
            r = [np.array(list(v[kind].values()), dtype=float) for v in rows]
            q = np.array([np.nanpercentile(x, [25, 50, 75]) for x in r])
            ax.plot(steps, q[:, 1], style, color=colour, label=f"{net}: {'ELS' if kind != 'is' else 'IS'}")
            if kind != "is":
                ax.fill_between(steps, q[:, 0], q[:, 2], color=colour, alpha=0.2)
        lossy = [(v["step"], v["held_out_loss"]) for v in rows if v.get("held_out_loss") is not None]
        if lossy:
            lax.plot(*zip(*lossy), "-o", color=colour, label=net)
    ax.set(ylabel="median r with the network (IQR shaded)", title="agreement with the ELS machine along training")
    ax.legend(fontsize=8, ncol=2, loc="center", bbox_to_anchor=(0.5, 0.28))  # between the ELS and IS curves
    lax.set(ylabel="held-out loss (t10k)")
    lax.legend(fontsize=8)
    if panels == 3:  # recognizable.py: the UNet's samples a digit classifier is sure of, by sampler
        qax = axes[2]
        for sampler, style in (("ddim20", "-o"), ("ddim200", "-.^"), ("ddpm250", "--s")):
            pts = sorted((int(k.split("/")[0]), v) for k, v in quality["unet"].items() if k.endswith("/" + sampler))
            if pts:
                qax.plot(*zip(*pts), style, color="tab:blue", label=f"unet, {sampler.replace('ddim', 'DDIM ').replace('ddpm', 'DDPM ')} steps")
        qax.axhline(quality["reference"]["t10k"], color="grey", ls=":", label="real t10k digits")
        qax.axhline(0.75, color="tab:red", lw=0.8, ls="-.", label="target 3 in 4")
        qax.set(ylabel="recognizable digits", ylim=(0, 1.02))
        qax.legend(fontsize=6.5, ncol=3, loc="lower center")  # below the curves (all above 0.3)
    axes[-1].set(xlabel="campaign training steps (0 = the network the campaign started from)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--net", choices=sorted(START), required=True)
    m.add_argument("--seeds", type=int, default=10)
    m.add_argument("--seed", type=int, default=200)
    m.add_argument("--nsteps", type=int, default=20)
    m.add_argument("--steps", type=int, nargs="*", help="only these snapshot steps")
    m.add_argument("--held-out", type=Path, default=HELD_OUT, help="MNIST root holding t10k (torchvision's layout)")
    p = sub.add_parser("plot")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "agreement_vs_training.png")
    args = parser.parse_args()
    if args.what == "measure":
        measure(args.net, args.seeds, args.seed, args.nsteps, args.steps, args.held_out)
    else:
        plot(args.out)
