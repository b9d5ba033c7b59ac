"""Calibrating the ELS machines against a network (SPEC 5.2).

`calibrate` runs the network's own DDIM trajectory from several seeds and, at every step, asks
which patch size k makes the machine's score closest to the network's at the same x (cosine
similarity, or relative L2 distance). The best k per step, median over seeds, is the scale
schedule; entry i is for t = (i + 1) / N, the order `read_scales` and the machines use.

Split calibrations (disjoint --sizes on the same trajectories) join with `merge_calibrations`. The
checks and the network trajectory here are shared with `els.sampling.sample`, which samples the
machines next to the network (SPEC 5.4).

    net = checkpoints.load("checkpoints/mnist5k_resnet.safetensors")
    res = calibrate(net, images, labels, sizes=(3, 5, 7, 9), seeds=[0, 1, 2, 3])
    write_scales_json(scales_path(ckpt, "els-borders"), res["scales"], **calibration_meta(res))  # edtool.els.schedule
"""

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from edtool.config import METRICS, NSTEPS, check_sizes
from edtool.diffusion import TimeGrid, as_grid, ddim_sample, eps_to_score, initial_noises, seed_labels
from edtool.els.factory import make_machine, resolve_machine_name
from edtool.els.schedule import check_fits
from edtool.errors import EdtoolError

DEFAULT_SIZES = (3, 5, 7, 9, 11, 13, 15)


# ------------------------------------------------------------------ small pure helpers


def similarity(reference: Tensor, other: Tensor, metric: str) -> Tensor:
    """Per sample (B,), float64: cosine similarity, or the relative L2 distance
    ||other - reference|| / ||reference||, of two score batches."""
    r, o = reference.flatten(1).double(), other.flatten(1).double()
    if metric == "cosine":
        return (r * o).sum(1) / (r.norm(dim=1) * o.norm(dim=1))
    return (o - r).norm(dim=1) / r.norm(dim=1)


def best_index(values: Tensor, metric: str) -> Tensor:
    """Index of the best candidate along the last axis (highest cosine, lowest L2); NaN never wins."""
    if metric == "cosine":
        return torch.nan_to_num(values, nan=-math.inf).argmax(-1)
    return torch.nan_to_num(values, nan=math.inf).argmin(-1)


def median_size(choices: Sequence[int], sizes: Sequence[int]) -> int:
    """The median of per-seed choices, rounded to the nearest candidate size (ties: the smaller)."""
    med = float(np.median(np.asarray(choices, dtype=np.float64)))
    return min(sorted(sizes), key=lambda k: (abs(k - med), k))


def check_seeds(seeds) -> list:
    """Seeds as a non-empty list of distinct ints; else EdtoolError."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EdtoolError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EdtoolError("seeds must be distinct")
    return seeds


def num_classes(network) -> Optional[int]:
    """A conditional network's number of classes, from its manifest (None: not recorded)."""
    n = network.manifest["num_classes"]
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def batches(n: int, batch: Optional[int]) -> list:
    """Slices of range(n), each at most `batch` long (all of it when batch is None or 0)."""
    step = n if not batch else max(1, int(batch))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def machine_kind(machine: str, network) -> str:
    """The machine's full name next to this network (`els` follows the network's padding)."""
    return resolve_machine_name(machine, network.manifest["padding"], network.name)


def check_images(images: Tensor, labels: Optional[Tensor]):
    """An EdtoolError unless images is a non-empty (N, C, H, W) tensor with one label per image (or none)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        raise EdtoolError("training images must be a non-empty (N, C, H, W) tensor")
    if labels is not None and len(labels) != len(images):
        raise EdtoolError(f"{len(labels)} labels for {len(images)} images")


# ------------------------------------------------------------------ calibration (SPEC 5.2)


def network_trajectory(network, x: Tensor, grid: TimeGrid, label: Optional[Tensor] = None, batch=None):
    """The network's DDIM path from x along the grid (an int N is short for TimeGrid(N)): points
    (N, B, C, H, W) and its scores there in step order (step j at grid.step_times[j]), plus the final images."""
    grid = as_grid(grid)
    points, scores, finals = [], [], []
    for sl in batches(len(x), batch):
        lab = None if label is None else label[sl]
        xs, ss = [], []

        def eps_fn(tb, xb, lab=lab):
            eps = network.eps(tb, xb, lab)
            xs.append(xb)
            ss.append(eps_to_score(eps, tb))
            return eps

        finals.append(ddim_sample(eps_fn, x[sl], grid))
        points.append(torch.stack(xs))
        scores.append(torch.stack(ss))
    return torch.cat(points, 1), torch.cat(scores, 1), torch.cat(finals)


def calibrate(
    network,
    images: Tensor,
    labels: Optional[Tensor] = None,
    machine: str = "els-borders",
    sizes: Sequence[int] = DEFAULT_SIZES,
    seeds: Sequence[int] = (0, 1, 2, 3),
    nsteps: int = NSTEPS,
    metric: str = "cosine",
    batch: Optional[int] = None,
    label: Optional[int] = None,
    device=None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Per-step ELS patch sizes for `network` (anything with .eps(t, x, label)) on its own DDIM path.

    Returns scales (N odd sizes, entry i for t = (i + 1) / N), choices (seed -> best size per
    entry), similarity (N x len(sizes), mean over seeds; cosine or relative L2), and the
    settings. `batch` bounds how many (step, seed) points one machine call scores.
    """
    if metric not in METRICS:
        raise EdtoolError(f"unknown metric {metric!r}; choose cosine or l2")
    if isinstance(nsteps, bool) or not isinstance(nsteps, int) or nsteps < 1:
        raise EdtoolError(f"nsteps must be a positive integer, got {nsteps!r}")
    check_images(images, labels)
    sizes, seeds = check_fits(check_sizes(sizes), images.shape, "candidate size"), check_seeds(seeds)
    kind = machine_kind(machine, network)
    if kind == "is":
        raise EdtoolError("the 'is' machine has no patch size to calibrate; choose els-borders, els-circular or ls")
    device = torch.device(device) if device is not None else images.device
    conditional = network.conditional
    run_labels = seed_labels(seeds, labels, label, conditional, n_classes=num_classes(network))
    log = log or (lambda msg: None)
    grid = TimeGrid(nsteps)

    t0 = time.perf_counter()
    x0 = initial_noises(seeds, images.shape[1:], device)
    lab = None if run_labels is None else run_labels.to(device)
    with torch.no_grad():
        points, net_scores, _ = network_trajectory(network, x0, grid, lab, batch)
    N = nsteps
    log(f"network trajectory: {N} steps x {len(seeds)} seeds in {time.perf_counter() - t0:.1f}s")
    table, timings = _similarity_table(kind, sizes, images, labels, device, points, net_scores, grid.step_times, lab,
                                       metric, batch, log)

    return {
        **schedule_from_table(grid.as_entries(table), sizes, seeds, metric),
        "machine": kind,
        "metric": metric,
        "sizes": sizes,
        "seeds": seeds,
        "labels": None if run_labels is None else run_labels.tolist(),
        "nsteps": N,
        "t": list(grid.entry_times),
        "n_images": len(images),
        "seconds": {"total": time.perf_counter() - t0, **{f"k={k}": v for k, v in timings.items()}},
    }


def _similarity_table(kind: str, sizes: Sequence[int], images: Tensor, labels: Optional[Tensor], device,
                      points: Tensor, scores: Tensor, times: Tensor, lab: Optional[Tensor], metric: str, batch, log):
    """How close each candidate size's machine score is to the network's `scores` at its trajectory's `points`
    (N, S, C, H, W), step j at times[j], seed s with label lab[s]: a table (N, S, len(sizes)), and the seconds
    each size took. `batch` bounds the points one machine call scores."""
    N, S = points.shape[:2]
    # every (step, seed) point at once: index = j * S + s
    xs = points.reshape(N * S, *points.shape[2:])
    ts = times.repeat_interleave(S).to(device)  # the times the network was evaluated at
    labs = None if lab is None else lab.repeat(N)
    table = torch.full((N, S, len(sizes)), math.nan, dtype=torch.float64)
    timings = {}
    for c, k in enumerate(sizes):
        t1 = time.perf_counter()
        m = make_machine(kind, images.to(device), None if labels is None else labels.to(device), patch_size=k)
        values = []
        with torch.no_grad():
            for sl in batches(N * S, batch):
                s = m.score(ts[sl], xs[sl], None if labs is None else labs[sl])
                values.append(similarity(scores.reshape(N * S, *scores.shape[2:])[sl], s, metric).cpu())
        table[:, :, c] = torch.cat(values).view(N, S)
        del m
        timings[k] = time.perf_counter() - t1
        log(f"k={k}: {N * S} scores in {timings[k]:.1f}s, mean {metric} {table[:, :, c].nanmean():.4f}")
    return table, timings


def schedule_from_table(table: Tensor, sizes: Sequence[int], seeds: Sequence[int], metric: str) -> dict:
    """The schedule from similarities table (N, S, K), row i for t = (i + 1) / N: per seed the best
    size per row (choices), their median per row (scales), the mean over seeds and the table itself."""
    chosen = torch.tensor(list(sizes))[best_index(table, metric)]  # (N, S)
    return {
        "scales": [median_size(chosen[i].tolist(), sizes) for i in range(len(table))],
        "choices": {str(s): chosen[:, si].tolist() for si, s in enumerate(seeds)},
        "similarity": table.nanmean(1).tolist(),
        "similarity_per_seed": table.tolist(),  # [row][seed][size]: what merge_calibrations needs
    }


MERGE_SAME = ("machine", "metric", "seeds", "labels", "nsteps", "n_images", "dataset", "checkpoint_sha256")


def merge_calibrations(parts: Sequence[dict], names: Optional[Sequence[str]] = None) -> dict:
    """One calibration from runs that scored disjoint candidate sizes on the same trajectories (same
    checkpoint, data, machine, metric, seeds and steps): the schedule one run over all their sizes
    gives, so a calibration can be split over processes or machines by --sizes. Parts are the
    calibration results or their JSON contents."""
    names = list(names or [f"part {i + 1}" for i in range(len(parts))])
    if len(parts) < 2:
        raise EdtoolError("merging needs at least two calibrations")
    first = parts[0]
    for part, name in zip(parts, names):
        if "similarity_per_seed" not in part:
            raise EdtoolError(f"{name} has no per-seed similarities (written by an older edtool): run it again")
        for key in MERGE_SAME:
            if part.get(key) != first.get(key):
                raise EdtoolError(f"{name} was calibrated with {key} {part.get(key)!r}, {names[0]} with "
                                  f"{first.get(key)!r}: only runs on the same trajectories merge")
    tables = [_part_table(part, name) for part, name in zip(parts, names)]
    sizes = [k for part in parts for k in part["sizes"]]
    if len(set(sizes)) != len(sizes):
        twice = sorted({k for k in sizes if sizes.count(k) > 1})
        raise EdtoolError(f"size {twice[0]} was scored by more than one of {', '.join(names)}: give disjoint --sizes")
    table = torch.cat(tables, -1)
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    sizes = [sizes[c] for c in order]
    seconds = {"total": sum(part["seconds"]["total"] for part in parts)}
    for part in parts:
        seconds.update({k: v for k, v in part["seconds"].items() if k != "total"})
    merged = {k: first[k] for k in MERGE_SAME if k in first}  # equal in every part (checked above)
    return {
        **schedule_from_table(table[..., order], sizes, first["seeds"], first["metric"]), **merged,
        "sizes": sizes, "t": first["t"], "seconds": seconds, "merged_from": names,
    }


def _part_table(part: dict, name: str) -> Tensor:
    """A part's similarity table (nsteps, seeds, sizes), after checking the fields a merge reads; an
    EdtoolError naming the part and the field for a file edited or damaged by hand."""
    def bad(field: str, want: str):
        return EdtoolError(f"{name}: its {field} is not {want} (the file was edited or damaged); "
                           "calibrate those sizes again")

    sizes, seeds, nsteps = part.get("sizes"), part.get("seeds"), part.get("nsteps")
    if not isinstance(sizes, list) or not sizes or not all(isinstance(k, int) and not isinstance(k, bool)
                                                           for k in sizes):
        raise bad("sizes", "a list of patch sizes")
    if not isinstance(seeds, list) or not seeds or not isinstance(nsteps, int) or isinstance(nsteps, bool) \
            or nsteps < 1:
        raise bad("seeds or nsteps", "a list of seeds and a number of steps")
    if not isinstance(part.get("seconds"), dict) or not all(isinstance(v, (int, float))
                                                            for v in part["seconds"].values()) \
            or "total" not in part["seconds"] or not isinstance(part.get("t"), list):
        raise bad("seconds or t", "what calibrate writes")
    try:
        table = torch.tensor(part["similarity_per_seed"], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise bad("similarity_per_seed", "a table of numbers") from None
    if tuple(table.shape) != (nsteps, len(seeds), len(sizes)):
        raise bad("similarity_per_seed", f"a table of nsteps x seeds x sizes = {nsteps} x {len(seeds)} x "
                                         f"{len(sizes)} numbers")
    return table


def calibration_meta(result: dict, **extra) -> dict:
    """Everything of a calibration result but the schedule, for write_scales_json(path, scales, **meta)."""
    meta = {k: v for k, v in result.items() if k != "scales"}
    meta["note"] = ("entry i of scales is the patch size at t = (i + 1) / nsteps; similarity rows are in the same "
                    f"order, columns follow sizes ({result['metric']}: "
                    f"{'higher' if result['metric'] == 'cosine' else 'lower'} is closer); choices per seed likewise")
    meta.update(extra)
    return meta
