"""A `sample` folder (SPEC 5.4): its files, one per seed and machine, the labelled samples grid, the
settings record that says what made them, and the claim that refuses a folder holding other settings'
or foreign files."""

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from edtool.errors import EdtoolError
from edtool.fileio import recorded_paths, refuse_foreign
from edtool.networks.models import Network

def output_dir_name(machine: str) -> str:
    """Folder of a machine's samples: `els_outputs` for the paper's els(-borders), else `<machine>_outputs`."""
    return "els_outputs" if machine in ("els", "els-borders") else f"{machine}_outputs"




def save_each(folder: Path, seeds, arrays, layout: str = "edtool", root=None) -> None:
    """One file per seed: `seed_<s>.npy` (edtool), or, as the paper's scripts write them, `<i:04d>.pt`
    holding a plain tensor with a batch axis of one (images (1, C, H, W), labels (1,)), i = the seed's
    position in the list; readable with torch.load(..., weights_only=True)."""
    names = [f"{i:04d}.pt" if layout == "paper" else f"seed_{s}.npy" for i, s in enumerate(seeds)]
    with recorded_paths([folder / name for name in names], root) as tmps:  # recorded as edtool's in root's ledger
        for tmp, a in zip(tmps, arrays):
            if layout == "paper":
                torch.save(torch.as_tensor(a).detach().cpu().clone().unsqueeze(0), tmp)
            else:
                np.save(tmp, a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a))


SETTINGS_NAME, SUMMARY_NAME = "sample_settings.json", "r2_summary.json"

# how the rows of samples_grid.png are named: what each machine is, in words
MACHINE_ROWS = {"els-borders": "ELS machine\n(els-borders)", "els": "ELS machine\n(els)",
                "els-circular": "ELS machine\n(els-circular)", "ls": "LS machine\n(local score)",
                "is": "IS machine\n(ideal score)"}


def samples_figure(network: str, rows: dict, seeds, r: dict):
    """samples_grid.png as a Figure: the network's samples (first row) over each machine's from the same
    seeds (one column per seed, at most 10), each machine image captioned with its agreement r with the
    network's sample above it, each row named with its median r; 1.1 inch per image, so at 100 dpi a 32x32
    digit is drawn about 3.4 times enlarged. `rows` maps "network" and each machine to its images
    (S, C, H, W) in [-1, 1]; `r` each machine to its r per seed."""
    from matplotlib.figure import Figure

    ncol = min(len(seeds), 10)
    fig = Figure(figsize=(1.1 * ncol + 1.6, 1.25 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for i, (name, images) in enumerate(rows.items()):
        for j in range(ncol):
            ax = axes[i, j]
            shown = ((images[j].detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"seed {seeds[j]}", fontsize="small")
            else:
                ax.set_xlabel(f"r = {r[name][j]:.2f}", fontsize="small")
        if i == 0:
            label = f"network\n({network})"
        else:
            values = np.asarray(r[name], dtype=float)
            label = MACHINE_ROWS.get(name, name)
            label += f"\nmedian r {np.nanmedian(values):.2f}" if np.isfinite(values).any() else ""
        axes[i, 0].set_ylabel(label, fontsize="small", rotation=0, ha="right", va="center")
    fig.suptitle("Samples from the same seeds; r = agreement (Pearson correlation) with the network's sample "
                 "above (1 = the same image)" if ncol >= 6 else "Samples from the same seeds\nr = agreement with "
                 "the network's sample (1 = same)", fontsize="medium")
    return fig


def save_samples_grid(path: Path, network: str, rows: dict, seeds, r: dict) -> Path:
    """Write samples_figure as a PNG at 100 dpi, recorded as edtool's in the folder's ledger."""
    with recorded_paths([path]) as (tmp,):
        samples_figure(network, rows, seeds, r).savefig(tmp, format="png", dpi=100)
    return path


def content_digest(obj) -> Optional[str]:
    """What the samples came from: sha256 of a tensor's bytes or of a Network's weights, another score
    model's name, None for None."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        tensors = [("", obj)]
    elif isinstance(obj, Network):
        tensors = sorted(obj.net.state_dict().items())
    else:
        return obj.name
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sample_files(out: Path, record: dict) -> list:
    """Every file a sample run with these settings writes under `out`."""
    folders = ["seeds", "network_outputs"] + [output_dir_name(k) for k in record["machines"]]
    folders += ["labels"] if record.get("labels") is not None else []
    names = ([f"{i:04d}.pt" for i in range(len(record["seeds"]))] if record.get("layout") == "paper"
             else [f"seed_{s}.npy" for s in record["seeds"]])
    return ([out / f / name for f in folders for name in names]
            + [out / "samples_grid.png", out / SUMMARY_NAME, out / SETTINGS_NAME])


def claim_sample_dir(out: Path, record: dict, overwrite: bool) -> None:
    """Make `out` ours for these settings before anything is sampled: a folder with samples of other
    settings (or of no recorded settings) is refused unless `overwrite`, which first deletes the files
    the earlier run recorded. The settings are written first and the summary removed, so that a kill
    never leaves r2_summary.json beside images it does not describe."""
    settings = out / SETTINGS_NAME
    try:
        old = json.loads(settings.read_text()) if settings.exists() else None
    except (OSError, ValueError):
        old = {}
    if old is not None and old != record and not overwrite:
        changed = [k for k in sorted({*record, *old}) if old.get(k) != record.get(k)]
        raise EdtoolError(f"{out} holds samples made with other settings ({', '.join(changed)} differ, recorded in "
                          f"{settings}); use another --out, the same settings to redo them, or --overwrite")
    ours_by_name = [p for p in _sample_files(out, record)[:-1] if p.exists()]
    if old is None and ours_by_name and not overwrite:
        raise EdtoolError(f"{out} holds {ours_by_name[-1].name} and other sample files that edtool did not record "
                          f"(no {SETTINGS_NAME}); use another --out, or --overwrite to replace them")
    doomed = _sample_files(out, old) if old and overwrite and old != record and {"seeds", "machines"} <= set(old) \
        else []
    # nothing edtool did not write (or that changed since) is replaced or deleted, --overwrite or not
    refuse_foreign(dict.fromkeys(doomed + _sample_files(out, record)), "move it away or use another --out (edtool "
                   "replaces only the files it wrote, --overwrite or not)", root=out)
    for path in doomed:
        path.unlink(missing_ok=True)
    (out / SUMMARY_NAME).unlink(missing_ok=True)
    with recorded_paths([settings]) as (tmp,):
        tmp.write_text(json.dumps(record, indent=1) + "\n")
