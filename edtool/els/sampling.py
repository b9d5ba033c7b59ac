"""Sampling the ELS machines next to a network and measuring their agreement (SPEC 5.4).

`sample` runs the network and each machine from the same initial noises to t = 0 and measures
their agreement: r, the Pearson correlation of the two final images (what the paper reports and
calls "r^2"), and r2 = r^2, with medians, interquartile ranges and the fraction of seeds on which
each machine beats the ideal score machine `is`. The folder it writes is `els.sample_folder`'s;
the agreement measures are `els.agreement`'s.

    net = checkpoints.load("checkpoints/mnist5k_resnet.safetensors")
    sample(["els-borders", "is"], net, images, labels, seeds=range(20), scales=[3, 5, 7], out_dir="out")
"""

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from edtool.config import LAYOUTS, NSTEPS, PATCH_SIZE, check_patch_size
from edtool.diffusion import TimeGrid, as_grid, ddim_sample, initial_noises, seed_labels
from edtool.els.agreement import AGREEMENT_DEFINITIONS, agreement_stats, pearson_r
from edtool.els.calibrate import batches, check_images, check_seeds, machine_kind, network_trajectory, num_classes
from edtool.els.factory import build_machine
from edtool.els.sample_folder import SETTINGS_NAME, SUMMARY_NAME, claim_sample_dir, content_digest, output_dir_name, \
    save_each, save_samples_grid
from edtool.els.schedule import check_fits, check_schedule, schedule_note
from edtool.errors import EdtoolError
from edtool.fileio import check_output, recorded_paths


def machine_sample(machine, x0: Tensor, grid: TimeGrid, label: Optional[Tensor] = None, batch=None) -> Tensor:
    """A machine's deterministic DDIM samples from x0 along the grid (an int N is short for TimeGrid(N));
    its schedule entry per step: schedule.scale_index."""
    grid = as_grid(grid)
    out = []
    for sl in batches(len(x0), batch):
        lab = None if label is None else label[sl]
        out.append(ddim_sample(lambda tb, x, lab=lab: machine.eps(tb, x, lab), x0[sl], grid))
    return torch.cat(out)


def sample(
    machine_names: Sequence[str],
    network,
    images: Tensor,
    labels: Optional[Tensor],
    seeds: Sequence[int],
    nsteps: int = NSTEPS,
    scales=None,
    out_dir=None,
    label: Optional[int] = None,
    patch_size: int = PATCH_SIZE,
    batch: Optional[int] = None,
    device=None,
    scales_source=None,
    log: Optional[Callable[[str], None]] = None,
    baseline: bool = True,
    overwrite: bool = False,
    layout: str = "edtool",
) -> dict:
    """Machine and network samples from the same seeds, their agreement r and r2 (SPEC 5.4), files under out_dir.

    Writes seeds/, network_outputs/, one <machine>_outputs/ per machine (els_outputs for
    els-borders), labels/ (conditional), r2_summary.json and samples_grid.png (rows: network, then
    each machine). Machines other than `is` use `scales` (one schedule for all, or a dict per
    machine; entry i for t = (i + 1) / N), else the fixed `patch_size`. With `baseline`, the ideal
    score machine `is` is sampled too when not asked for, so that every machine's `beats_is` (the
    paper's comparison) is reported. `layout` "paper" writes the per-seed files as the paper's scripts
    do (`0000.pt` ...: plain tensors) instead of `seed_<s>.npy`. Returns the summary that r2_summary.json holds.
    """
    seeds, kinds, added_baseline, per_machine = _checked_request(
        machine_names, network, images, labels, seeds, nsteps, scales, patch_size, baseline, out_dir, layout)
    sources = {k: scales_source.get(k) if isinstance(scales_source, dict) else scales_source for k in kinds}
    device = torch.device(device) if device is not None else images.device
    out, log = Path(out_dir), log or (lambda msg: None)
    conditional = network.conditional
    run_labels = seed_labels(seeds, labels, label, conditional, n_classes=num_classes(network))
    lab = None if run_labels is None else run_labels.to(device)
    _claim_folder(out, network, images, labels, nsteps, seeds, run_labels, per_machine, patch_size, layout, overwrite)
    grid = TimeGrid(nsteps)

    def save(folder: str, values: Tensor):  # one file per seed under out/folder
        save_each(out / folder, seeds, values, layout, root=out)

    def build(kind: str):  # the machine and what the summary records about it
        return build_machine(kind, images.to(device), None if labels is None else labels.to(device),
                             scales=per_machine[kind], patch_size=patch_size, source=sources[kind])

    x0, net_final = _sample_network(network, seeds, images.shape[1:], device, run_labels, grid, batch, save, log)
    notes = [schedule_note(k, per_machine[k], nsteps, patch_size, sources[k]) if k != "is" else None for k in kinds]
    summary = _summary_head(network, nsteps, seeds, run_labels, len(images), layout, added_baseline, notes)
    summary["machines"], rows = _sample_machines(kinds, build, x0, net_final, grid, lab, batch, save, seeds,
                                                 "is" if added_baseline else None, log)
    _add_beats_is(summary["machines"])
    save_samples_grid(out / "samples_grid.png", summary["network"], {"network": net_final.cpu(), **rows}, seeds,
                      {kind: list(values["r"].values()) for kind, values in summary["machines"].items()})
    with recorded_paths([out / SUMMARY_NAME]) as (tmp,):  # last: its presence means "complete"
        tmp.write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")
    return summary


def _checked_request(machine_names, network, images, labels, seeds, nsteps, scales, patch_size, baseline, out_dir,
                     layout):
    """sample's arguments checked before anything is drawn or written: (seeds, machine kinds, whether `is` was
    added as the baseline, machine -> schedule or None); an EdtoolError for the first one that is wrong."""
    if out_dir is None:
        raise EdtoolError("sample needs an output folder")
    if layout not in LAYOUTS:
        raise EdtoolError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    if isinstance(nsteps, bool) or not isinstance(nsteps, int) or nsteps < 1:
        raise EdtoolError(f"nsteps must be a positive integer, got {nsteps!r}")
    check_images(images, labels)
    seeds = check_seeds(seeds)
    kinds, added_baseline = _machine_kinds(machine_names, network, baseline)
    per_machine = {k: _machine_scales(scales, k) for k in kinds}
    check_patch_size(patch_size, "patch_size")
    for kind in kinds:  # a window larger than the images is refused
        check_fits(per_machine[kind] or ([] if kind == "is" else [patch_size]), images.shape, f"{kind}: patch size")
    return seeds, kinds, added_baseline, per_machine


def _claim_folder(out: Path, network, images, labels, nsteps, seeds, run_labels, per_machine, patch_size, layout,
                  overwrite):
    """Claim `out` for this call's settings (sample_folder.claim_sample_dir): what made its samples, recorded
    so that a second call with other settings is refused (or, with overwrite, replaces only edtool's files)."""
    record = {"network": content_digest(network), "images": content_digest(images), "labels_sha256": content_digest(labels),
              "nsteps": nsteps, "seeds": seeds, "labels": None if run_labels is None else run_labels.tolist(),
              "machines": {k: ({"scales": v} if v is not None else {} if k == "is" else {"patch_size": patch_size})
                           for k, v in per_machine.items()}}
    if layout != "edtool":  # absent for edtool's layout: folders written without a layout field keep their record
        record["layout"] = layout
    check_output([out / SETTINGS_NAME], force=True)  # a folder that takes files, or one line naming it
    claim_sample_dir(out, record, overwrite)


def _sample_network(network, seeds: list, image_shape, device, run_labels: Optional[Tensor], grid: TimeGrid, batch,
                    save, log):
    """The seeds' initial noises x0 and the network's final images from them, each saved with the labels:
    (x0, final images)."""
    x0 = initial_noises(seeds, image_shape, device)
    save("seeds", x0)
    if run_labels is not None:
        save("labels", run_labels)
    lab = None if run_labels is None else run_labels.to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        _, _, net_final = network_trajectory(network, x0, grid, lab, batch)
    save("network_outputs", net_final)
    log(f"network: {len(x0)} samples in {time.perf_counter() - t0:.1f}s")
    return x0, net_final


def _sample_machines(kinds, build, x0: Tensor, net_final: Tensor, grid: TimeGrid, lab, batch, save, seeds: list,
                     baseline: Optional[str], log):
    """Each machine's samples from x0, saved in its folder, and its summary entry: r and r2 per seed against the
    network's final images and their statistics. Returns (machine -> entry, machine -> samples on the CPU)."""
    entries, rows = {}, {}
    for kind in kinds:
        t1 = time.perf_counter()
        m, info = build(kind)
        with torch.no_grad():
            final = machine_sample(m, x0, grid, lab, batch)
        folder = output_dir_name(kind)
        save(folder, final)
        values = [pearson_r(a, b) for a, b in zip(final, net_final)]
        entry = entries[kind] = {
            "dir": folder, **info, **({"baseline": True} if kind == baseline else {}),
            "r": {str(s): v for s, v in zip(seeds, values)},
            "r2": {str(s): v ** 2 for s, v in zip(seeds, values)},
            **agreement_stats(values),
            "seconds": time.perf_counter() - t1,
        }
        rows[kind] = final.cpu()
        log(f"{kind}: median r {entry['median_r']:.4f}, r^2 {entry['median_r2']:.4f} over {entry['n_seeds']} seeds "
            f"({time.perf_counter() - t1:.1f}s)")
    return entries, rows


def _machine_kinds(machine_names: Sequence[str], network, baseline: bool):
    """The machines' full names next to this network, each once, with `is` appended when `baseline`
    asks for it and it is not among them; and whether it was appended."""
    kinds = []
    for name in machine_names:
        kind = machine_kind(name, network)
        if kind in kinds:
            raise EdtoolError(f"machine {kind!r} given twice")
        kinds.append(kind)
    if not kinds:
        raise EdtoolError("give at least one machine (e.g. els-borders,is)")
    added_baseline = baseline and "is" not in kinds
    if added_baseline:
        kinds.append("is")
    return kinds, added_baseline


def _machine_scales(scales, kind: str) -> Optional[list]:
    """The schedule for one machine from `scales` (None, one list for every machine, or a dict
    machine -> list); None for `is` or when none is given."""
    if isinstance(scales, dict):
        scales = scales.get(kind)
    if kind == "is" or scales is None:
        return None
    return check_schedule(scales, f"scales for {kind}")


def _summary_head(network, nsteps: int, seeds: list, run_labels: Optional[Tensor], n_images: int, layout: str,
                  added_baseline: bool, notes: Sequence[Optional[str]]) -> dict:
    """The summary's settings and notes (the baseline's, then each machine's schedule note), no machine yet."""
    summary = {
        "network": network.name,
        "nsteps": nsteps,
        "seeds": seeds,
        "labels": None if run_labels is None else run_labels.tolist(),
        "n_images": n_images,
        "layout": layout if layout == "edtool" else "paper: <folder>/<i:04d>.pt holds seeds[i] (batch axis of one)",
        "machines": {},
        "notes": [],
        "definitions": AGREEMENT_DEFINITIONS,
    }
    if added_baseline:
        summary["notes"].append("is: sampled as the baseline of beats_is (SPEC 5.4); not among the machines asked for")
    summary["notes"] += [note for note in notes if note]  # the command line said them already (discovery.schedule_for)
    return summary


def _add_beats_is(machines: dict):
    """Every machine's beats_is (the fraction of seeds on which its r beats the ideal score's), when `is` ran."""
    if "is" not in machines:
        return
    ideal = list(machines["is"]["r"].values())
    for kind, res in machines.items():
        if kind != "is":
            res["beats_is"] = agreement_stats(list(res["r"].values()), ideal)["beats_is"]
