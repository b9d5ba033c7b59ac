"""What `edtool compute` needs before it measures anything: the device; the networks, machines and data
loaded once; seeds, labels and the config the run store records (SPEC 6, 7). The settings and their checks
are edtool.config.ComputeConfig.

    run = prepare(ComputeConfig(models=["unet", "els"]).validate())   # -> PreparedRun: models by name, seeds, labels, config

`prepare` reads as its steps: the device; the networks (found, loaded, checked); the models from elsewhere
(LABEL=SOURCE); the conditioning they agree on; the training data and the ELS machines, only when a machine is
measured (so a run of networks alone never imports the ELS engine); the estimator each model uses here; the
labels and points of the realizations; the config the store records.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from edtool.config import MACHINE_NAMES, NETWORKS, ComputeConfig
from edtool.device import platform, resolve_device
from edtool.diffusion import TimeGrid, realization_seeds, seed_labels
from edtool.errors import EdtoolError
from edtool.store.layout import ALIGN_ARRAYS, LOCALITY_ARRAYS, POINT_ARRAYS


@dataclass
class PreparedRun:
    """A run ready to compute, everything loaded once: the models (networks, models from elsewhere and
    machines) by name, the realizations' seeds and labels, the config the store records."""

    cfg: ComputeConfig
    models: dict
    seeds: List[int]
    labels: List[int]
    image_shape: tuple
    config: dict
    device: torch.device
    notes: List[str]
    held_out: Optional[torch.Tensor] = None  # (realizations, C, H, W): x_0 of each realization with --points noised-data
    rtol_missed: list = field(default_factory=list)  # (realization, model, step, ed_stderr / ed_fro) above --rtol
    grid: Optional[TimeGrid] = None  # the run's time grid, built once by prepare (else from cfg.nsteps)

    def __post_init__(self):
        self.grid = self.grid or TimeGrid(self.cfg.nsteps)


def default_run_name(cfg: ComputeConfig) -> str:
    """The folder under the cache of a run given neither --run-dir nor --run."""
    return f"{cfg.dataset}-{'-'.join(cfg.models)}-n{cfg.nsteps}-r{cfg.realizations}-s{cfg.seed}"


def prepare(cfg: ComputeConfig) -> PreparedRun:
    """Load networks, data (only for machines, SPEC 6) and machines; derive seeds, labels and the config
    that the store records (with the estimator each model uses on this device). cfg is checked already
    (ComputeConfig.validate, which compute() calls first)."""
    device = resolve_device(cfg.device)
    grid = TimeGrid(cfg.nsteps)  # the run's time grid: everything below takes it from here
    notes = []
    machines = [name for name in cfg.models if name in MACHINE_NAMES]
    if machines and cfg.scales:  # checked before anything heavy is loaded
        from edtool.networks.discovery import find_scales

        find_scales("els", cfg.scales, nsteps=cfg.nsteps)
    paths = _network_paths(cfg, bool(machines))
    models, config_models = _load_networks(cfg, paths, device, notes)
    if cfg.sources:  # SPEC 14: models from elsewhere go wherever a network goes
        from edtool.networks.sources import load_sources

        load_sources(cfg, device, models, config_models, notes, grid)
    conditional, n_classes = _conditioning(cfg, models)
    image_shape, images, labels = _image_shape(models), None, None
    if machines:  # only the machines need the training images
        images, labels, image_shape, data_classes = _training_data(cfg, image_shape, conditional)
        n_classes = n_classes or data_classes
    n_classes = _checked_classes(cfg, n_classes)
    if machines:
        _add_machines(cfg, machines, models, config_models, paths, images.to(device), labels.to(device), notes)
    _record_estimators(cfg, config_models, math.prod(image_shape), device)
    seeds = realization_seeds(cfg.seed, cfg.realizations)
    run_labels, held_out, points = _realizations(cfg, seeds, labels, image_shape, conditional, n_classes)
    config = _store_config(cfg, config_models, device, points, bool(machines), notes)
    config.update(locality_alignment_config(cfg, image_shape, models, grid))
    return PreparedRun(cfg, models, seeds, run_labels, image_shape, config, device, notes, held_out, grid=grid)


# ------------------------------------------------------------------ the steps of prepare, in order


def _network_paths(cfg: ComputeConfig, wants_machines: bool) -> dict:
    """arch -> checkpoint path: each network of --models (refused when none is found), and the ResNet whose
    padding and calibrated scales the machines follow (when one is found)."""
    paths = {}
    for arch in NETWORKS:
        if arch in cfg.models or (arch == "resnet" and wants_machines):
            try:
                paths[arch] = _network_path(cfg, arch)
            except EdtoolError:
                if arch in cfg.models:
                    raise
    return paths


def _network_path(cfg: ComputeConfig, arch: str) -> Path:
    """--unet/--resnet, else the first found (docs/data-and-checkpoints.md)."""
    from edtool.networks import discovery

    explicit = getattr(cfg, arch)
    return Path(explicit) if explicit else discovery.discover(cfg.dataset, arch)


def _load_networks(cfg: ComputeConfig, paths: dict, device: torch.device, notes: list) -> tuple:
    """(models, config entries) of the networks of --models, in NETWORKS order; each checkpoint must hold the
    architecture it is given as, and its entry records the file's path and sha256."""
    from edtool.networks import checkpoints, discovery

    models, config_models = {}, {}
    for arch in NETWORKS:
        if arch not in cfg.models:
            continue
        path = paths[arch]
        models[arch] = discovery.load(path, dataset=cfg.dataset, device=device, note=notes.append)
        if models[arch].manifest.get("arch") != arch:  # never measure one network and file it as another
            raise EdtoolError(f"--{arch} {path} holds a {models[arch].manifest.get('arch')}, not a {arch}; give a "
                              f"{arch} checkpoint to --{arch}")
        config_models[arch] = {"path": str(path), "sha256": checkpoints.file_hash(path)}
    return models, config_models


def _conditioning(cfg: ComputeConfig, models: dict) -> tuple:
    """(conditional, n_classes): whether the realizations carry class labels (a class-conditional network, or
    --label), and the number of classes the networks' manifests give (None when none does). --label with an
    unconditional network is refused."""
    nets_conditional = [f for f in models.values() if f.conditional]
    unconditional = [name for name, f in models.items() if not f.conditional]
    if cfg.label is not None and unconditional:
        raise EdtoolError(f"--label {cfg.label}: the {' and '.join(unconditional)} network is unconditional (it "
                          "takes no class label); drop --label, or give a class-conditional checkpoint")
    n_classes = next((int(f.manifest["num_classes"]) for f in nets_conditional
                      if f.manifest.get("num_classes")), None)
    return bool(nets_conditional) or cfg.label is not None, n_classes


def _image_shape(fields: dict) -> Optional[tuple]:
    """The image shape the measured networks agree on (from their manifests), None without networks."""
    shapes = {name: tuple(f.manifest.get("image_shape") or ()) for name, f in fields.items()}
    if len(set(shapes.values())) > 1:
        raise EdtoolError(f"the networks expect different image shapes ({shapes}); pass checkpoints made "
                          f"for the same data")
    shape = next(iter(shapes.values()), None)
    if shape is not None and len(shape) != 3:
        raise EdtoolError(f"checkpoint manifest of {next(iter(fields))} has no image_shape (C, H, W)")
    return shape


def _training_data(cfg: ComputeConfig, image_shape: Optional[tuple], conditional: bool) -> tuple:
    """(images, labels, image shape, number of classes) of the training data the machines are built from: the
    first --max-samples images (per class when conditional), of the shape the networks expect."""
    from edtool.data import first_samples, load_dataset
    from edtool.els.schedule import check_fits

    images, labels = load_dataset(cfg.dataset, root=cfg.data_root)
    if image_shape is not None and tuple(images.shape[1:]) != image_shape:
        raise EdtoolError(f"the networks expect images of shape {list(image_shape)}, {cfg.dataset} has "
                          f"{list(images.shape[1:])}")
    image_shape = tuple(images.shape[1:])
    check_fits([cfg.patch_size], image_shape, "--patch-size")
    n_classes = int(labels.max()) + 1  # of the whole training set, before the first samples are taken
    images, labels = first_samples(images, labels, cfg.max_samples, per_class=conditional)
    return images, labels, image_shape, n_classes


def _checked_classes(cfg: ComputeConfig, n_classes: Optional[int]) -> int:
    """The number of classes (the networks', else the training data's, else edtool.data.NUM_CLASSES), with
    --label checked against it."""
    from edtool.data import NUM_CLASSES

    n_classes = n_classes or NUM_CLASSES
    if cfg.label is not None and not 0 <= cfg.label < n_classes:
        raise EdtoolError(f"--label {cfg.label} is not a class of {cfg.dataset} (0..{n_classes - 1})")
    return n_classes


def _machine_padding(cfg: ComputeConfig, models: dict, paths: dict) -> tuple:
    """(padding, where it comes from) that `els` follows: the first measured model's, else the padding of
    the ResNet whose scales the machines use, else zeros."""
    from edtool.networks import discovery

    paddings = [f.manifest.get("padding", "zeros") for f in models.values()]
    if not paddings and "resnet" in paths:  # machines alone follow the ResNet their scales are for
        paddings = [discovery.padding_of(paths["resnet"]) or "zeros"]
    padding = paddings[0] if paddings else "zeros"
    padding_from = next(iter(paths.values()), None) if not models else \
        paths.get(next(iter(models))) or cfg.sources.get(next(iter(models)))
    return padding, padding_from


def _add_machines(cfg: ComputeConfig, machines: list, models: dict, config_models: dict, paths: dict,
                  images: torch.Tensor, labels: torch.Tensor, notes: list) -> None:
    """Build each machine of --models from the training images into `models`, its config entry into
    `config_models`. Its scales: --scales, else the calibration found for the ResNet (or UNet), in
    discovery's order. The ELS modules are imported here, where a machine is asked for."""
    from edtool.els.factory import build_machine, resolve_machine_name
    from edtool.networks import discovery

    padding, padding_from = _machine_padding(cfg, models, paths)
    for name in machines:
        kind = resolve_machine_name(name, padding, padding_from)
        scales, source = discovery.schedule_for(kind, cfg.scales, [paths.get("resnet"), paths.get("unet")],
                                                cfg.nsteps, cfg.patch_size, notes, name=name)
        machine, info = build_machine(kind, images, labels, scales=scales, patch_size=cfg.patch_size, source=source)
        models[name] = machine
        config_models[name] = {"machine": kind, **info}


def _record_estimators(cfg: ComputeConfig, config_models: dict, n: int, device: torch.device) -> None:
    """Each model's estimator in its config entry, with `auto` resolved as it is here (CPU and CUDA differ for
    a network of n = C*H*W numbers; the machines use their closed form)."""
    from edtool.jacobian.ed import auto_method

    for name, entry in config_models.items():
        machine = name in MACHINE_NAMES
        entry["estimator"] = ("analytic" if machine else auto_method(n, device.type)) \
            if cfg.estimator == "auto" else cfg.estimator


def _realizations(cfg: ComputeConfig, seeds: list, labels: Optional[torch.Tensor], image_shape: tuple,
                  conditional: bool, n_classes: int) -> tuple:
    """(labels, held-out x_0, point-source entry) of the realizations: each one's class label (-1 when
    unconditional); with --points noised-data the held-out image of each and the config entry that records
    them, else None, None."""
    if cfg.points == "noised-data":
        held_out, run_labels, points = _held_out_points(cfg, image_shape, conditional)
        return run_labels, held_out, points
    drawn = seed_labels(seeds, labels, cfg.label, conditional, n_classes=n_classes)
    return ([-1] * cfg.realizations if drawn is None else drawn.tolist()), None, None


def _store_config(cfg: ComputeConfig, config_models: dict, device: torch.device, points: Optional[dict],
                  wants_machines: bool, notes: list) -> dict:
    """The config the run store records, which a resumed run must match. A setting that is off stays absent,
    so runs made without it resume."""
    reference = cfg.reference or cfg.models[0]
    config = {
        "dataset": cfg.dataset, "models": config_models, "nsteps": cfg.nsteps, "realizations": cfg.realizations,
        "seed": cfg.seed, "label": cfg.label, "estimator": cfg.estimator, "probes": cfg.probes,
        "rtol": cfg.rtol, "maps": cfg.maps, "trajectory": cfg.trajectory,
        "reference": reference if cfg.trajectory == "shared" else None, "dtype": "float32",
        "device": device.type, "platform": platform(device, cfg.tf32),
    }
    if cfg.tf32 and device.type == "cuda":  # compared on resume: TF32 moves asym by ~1e-2
        config["tf32"] = True
    elif cfg.tf32:
        notes.append(f"--tf32 changes nothing on {device.type}: its float32 arithmetic is full precision")
    if wants_machines and cfg.max_samples is not None:
        config["max_samples"] = cfg.max_samples
    if points is not None:  # --points noised-data; a trajectory run has no entry
        config["points"] = points
    if cfg.save_points:
        config["save_points"] = True
    return config


def _held_out_points(cfg: ComputeConfig, image_shape: tuple, conditional: bool):
    """x_0 per realization for --points noised-data, their labels (-1 if unconditional) and the config
    entry that records the point source (SPEC 13)."""
    from edtool.data import load_dataset
    from edtool.study.points import default_held_out, held_out_indices

    name, split = (cfg.held_out, "test") if cfg.held_out else default_held_out(cfg.dataset)
    images, labels = load_dataset(name, root=cfg.data_root, split=split)
    if tuple(images.shape[1:]) != image_shape:
        raise EdtoolError(f"held-out images of {name} ({split}) are {tuple(images.shape[1:])}, the models' "
                          f"{image_shape}; choose a held-out set like the training data with --held-out")
    pool = torch.arange(len(images))
    if cfg.label is not None:
        pool = pool[labels == cfg.label]
    indices = pool[held_out_indices(len(pool), cfg.seed, cfg.realizations)]
    run_labels = labels[indices].tolist() if conditional else [-1] * cfg.realizations
    entry = {"source": "noised-data", "held_out": {"dataset": name, "split": split, "size": len(images)},
             "indices": indices.tolist(),
             "definition": "realization r: x_t = sqrt(alpha_bar(t)) x_0 + sqrt(beta(t)) eps at t = (N - j) / N, "
                           "x_0 = held-out image indices[r], eps = initial_noise(seed + r); final holds x_0"}
    return images[indices], run_labels, entry


def locality_alignment_config(cfg: ComputeConfig, image_shape, fields: dict, grid: Optional[TimeGrid] = None) -> dict:
    """The --locality and --align settings a run records (SPEC 12; absent when off, so runs made without them
    resume), with
    each ELS machine's patch half-width (k - 1)/2 at every step of the run's grid (else TimeGrid(cfg.nsteps)),
    which the locality figures draw."""
    from edtool.jacobian.locality import default_radius

    out = {}
    if cfg.locality:
        radius = default_radius(image_shape) if cfg.locality_radius is None else cfg.locality_radius
        times = (grid or TimeGrid(cfg.nsteps)).step_times.tolist()  # t_j of step j
        half = {name: [(f.patch_size_at(t) - 1) / 2 for t in times] for name, f in fields.items()
                if name in MACHINE_NAMES and f.patch_sizes is not None}  # the local machines: `is` has none
        out["locality"] = {"radius": radius, "method": cfg.locality_method, "pixels": cfg.locality_pixels,
                           "patch_half_width": half}
    if cfg.align is not None:
        out["align"] = {"reference": cfg.align, "probes": cfg.probes}
    return out


def extra_array_dims(config: dict) -> dict:
    """The extra per-cell arrays (edtool.store.layout.EXTRA_ARRAYS: locality, alignment, points) a run with
    this config stores, with their trailing dimensions."""
    return {**(LOCALITY_ARRAYS if config.get("locality") else {}), **(ALIGN_ARRAYS if config.get("align") else {}),
            **(POINT_ARRAYS if config.get("save_points") else {})}
