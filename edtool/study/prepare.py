"""What `edtool compute` needs before it measures anything: the device; the networks, machines and data
loaded once; seeds, labels and the config the run store records (SPEC 6, 7). The settings and their checks
are edtool.config.ComputeConfig.

    study = prepare(ComputeConfig(models=["unet", "els"]))   # -> Study: models by name, seeds, labels, config
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from edtool.config import NETWORKS, ComputeConfig
from edtool.diffusion import TimeGrid, realization_seeds
from edtool.errors import EdtoolError
from edtool.els.machine import ALIASES, MACHINES
from edtool.els.schedule import check_fits
from edtool.study.device import cuda_index, platform

MACHINE_NAMES = tuple(ALIASES) + MACHINES  # the machines --models accepts: `els` follows the networks' padding


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'auto' and 'cuda' put each torchrun/srun rank on its own GPU
    (edtool.study.device.cuda_index), 'cuda:N' is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", cuda_index(os.environ, torch.cuda.device_count()))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EdtoolError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise EdtoolError("--device meta holds shapes but no numbers: nothing can be measured on it; use auto, cpu "
                          "or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EdtoolError("--device cuda asked for, but no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EdtoolError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if device.index is None:
            device = torch.device("cuda", cuda_index(os.environ, torch.cuda.device_count()))
    elif device.type != "cpu" and not _backend_available(device.type):
        raise EdtoolError(f"--device {name} is not available in this PyTorch build or on this machine; use auto, "
                          "cpu or cuda")
    return device


def _backend_available(kind: str) -> bool:
    """Whether torch can run on a device type other than cpu/cuda (mps, xpu, ...)."""
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    module = getattr(torch, kind, None)
    try:
        return bool(module is not None and module.is_available())
    except Exception:  # a backend stub that cannot even answer
        return False


def run_location(cfg: ComputeConfig) -> str:
    """--run-dir wins; else cache/<--run>; else cache/<dataset>-<models>-<nsteps>-r<realizations>-s<seed>."""
    from edtool.paths import cache_dir

    if cfg.run_dir:
        return str(cfg.run_dir)
    name = cfg.run or f"{cfg.dataset}-{'-'.join(cfg.models)}-n{cfg.nsteps}-r{cfg.realizations}-s{cfg.seed}"
    if "/" in name or name in ("", ".", ".."):
        raise EdtoolError(f"--run must be a plain name (got {name!r}); use --run-dir for a path")
    return str(cache_dir() / name)


@dataclass
class Study:
    """Everything compute needs, loaded once: the models (networks and machines) by name, seeds,
    labels, store config."""

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


def _network_path(cfg: ComputeConfig, arch: str) -> Path:
    """--unet/--resnet, else the first found in ./checkpoints, EDTOOL_CHECKPOINTS, shipped (docs/discovery)."""
    from edtool.networks import discovery

    explicit = getattr(cfg, arch)
    return Path(explicit) if explicit else discovery.discover(cfg.dataset, arch)


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


def prepare(cfg: ComputeConfig) -> Study:
    """Load networks, data (only for machines, SPEC 6) and machines; derive seeds, labels and the config
    that the store records (with the estimator each model uses on this device)."""
    from edtool.data import NUM_CLASSES, first_samples, load_dataset
    from edtool.els.calibrate import seed_labels
    from edtool.els.machine import build_machine, resolve_machine_name
    from edtool.jacobian.ed import auto_method
    from edtool.networks import checkpoints, discovery

    cfg.validate()
    device = resolve_device(cfg.device)
    grid = TimeGrid(cfg.nsteps)  # the run's time grid: everything below takes it from here
    notes, models, config_models = [], {}, {}
    wants_machines = any(m in MACHINE_NAMES for m in cfg.models)
    if wants_machines and cfg.scales:  # checked before anything heavy is loaded
        discovery.find_scales("els", cfg.scales, nsteps=cfg.nsteps)

    network_paths = {}
    for arch in NETWORKS:
        if arch in cfg.models or (arch == "resnet" and wants_machines):
            try:
                network_paths[arch] = _network_path(cfg, arch)
            except EdtoolError:
                if arch in cfg.models:
                    raise
    for arch in NETWORKS:
        if arch not in cfg.models:
            continue
        path = network_paths[arch]
        models[arch] = discovery.load(path, dataset=cfg.dataset, device=device, note=notes.append)
        if models[arch].manifest.get("arch") != arch:  # never measure one network and file it as another
            raise EdtoolError(f"--{arch} {path} holds a {models[arch].manifest.get('arch')}, not a {arch}; give a "
                              f"{arch} checkpoint to --{arch}")
        config_models[arch] = {"path": str(path), "sha256": checkpoints.file_hash(path)}
    if cfg.sources:  # SPEC 14: models from elsewhere go wherever a network goes
        from edtool.networks.sources import load_sources

        load_sources(cfg, device, models, config_models, notes, grid)
    paddings = [f.manifest.get("padding", "zeros") for f in models.values()]
    if not paddings and "resnet" in network_paths:  # machines alone follow the ResNet their scales are for
        paddings = [discovery.padding_of(network_paths["resnet"]) or "zeros"]
    padding = paddings[0] if paddings else "zeros"
    padding_from = next(iter(network_paths.values()), None) if not models else \
        network_paths.get(next(iter(models))) or cfg.sources.get(next(iter(models)))
    nets_conditional = [f for f in models.values() if f.conditional]
    conditional = bool(nets_conditional) or cfg.label is not None
    unconditional = [name for name, f in models.items() if not f.conditional]
    if cfg.label is not None and unconditional:
        raise EdtoolError(f"--label {cfg.label}: the {' and '.join(unconditional)} network is unconditional (it "
                          "takes no class label); drop --label, or give a class-conditional checkpoint")
    n_classes = next((int(f.manifest["num_classes"]) for f in nets_conditional
                      if f.manifest.get("num_classes")), None)

    image_shape = _image_shape(models)
    images = labels = None
    if wants_machines:  # only the machines need the training images
        images, labels = load_dataset(cfg.dataset, root=cfg.data_root)
        if image_shape is not None and tuple(images.shape[1:]) != image_shape:
            raise EdtoolError(f"the networks expect images of shape {list(image_shape)}, {cfg.dataset} has "
                              f"{list(images.shape[1:])}")
        image_shape = tuple(images.shape[1:])
        check_fits([cfg.patch_size], image_shape, "--patch-size")
        n_classes = n_classes or int(labels.max()) + 1
        images, labels = first_samples(images, labels, cfg.max_samples, per_class=conditional)
    n_classes = n_classes or NUM_CLASSES
    if cfg.label is not None and not 0 <= cfg.label < n_classes:
        raise EdtoolError(f"--label {cfg.label} is not a class of {cfg.dataset} (0..{n_classes - 1})")

    for name in cfg.models:
        if name in NETWORKS or name in cfg.sources:
            continue
        kind = resolve_machine_name(name, padding, padding_from)
        # --scales, else the calibration found for the ResNet (or UNet), in discovery's order
        scales, source = discovery.schedule_for(kind, cfg.scales, [network_paths.get("resnet"), network_paths.get("unet")],
                                                cfg.nsteps, cfg.patch_size, notes, name=name)
        machine, info = build_machine(kind, images.to(device), labels.to(device), scales=scales,
                                      patch_size=cfg.patch_size, source=source)
        models[name] = machine
        config_models[name] = {"machine": kind, **info}
    n = math.prod(image_shape)
    for name, entry in config_models.items():  # what `auto` means here, recorded: CPU and CUDA differ
        machine = name in MACHINE_NAMES
        entry["estimator"] = ("analytic" if machine else auto_method(n, device.type)) \
            if cfg.estimator == "auto" else cfg.estimator

    seeds = realization_seeds(cfg.seed, cfg.realizations)
    held_out, points = None, None
    if cfg.points == "noised-data":
        held_out, run_labels, points = _held_out_points(cfg, image_shape, conditional)
    else:
        drawn = seed_labels(seeds, labels, cfg.label, conditional, n_classes=n_classes)
        run_labels = [-1] * cfg.realizations if drawn is None else drawn.tolist()
    reference = cfg.reference or cfg.models[0]
    config = {
        "dataset": cfg.dataset, "models": config_models, "nsteps": cfg.nsteps, "realizations": cfg.realizations,
        "seed": cfg.seed, "label": cfg.label, "estimator": cfg.estimator, "probes": cfg.probes,
        "rtol": cfg.rtol, "maps": cfg.maps, "trajectory": cfg.trajectory,
        "reference": reference if cfg.trajectory == "shared" else None, "dtype": "float32",
        "device": device.type, "platform": platform(device, cfg.tf32),
    }
    if cfg.tf32 and device.type == "cuda":  # compared on resume: TF32 moves asym by ~1e-2; absent when off
        config["tf32"] = True
    elif cfg.tf32:
        notes.append(f"--tf32 changes nothing on {device.type}: its float32 arithmetic is full precision")
    if wants_machines and cfg.max_samples is not None:  # absent otherwise, so older runs resume as before
        config["max_samples"] = cfg.max_samples
    if points is not None:  # trajectory runs keep the config they always had, so they resume as before
        config["points"] = points
    if cfg.save_points:  # likewise absent when off
        config["save_points"] = True
    config.update(jacobian_whole_config(cfg, image_shape, models, grid))
    return Study(cfg, models, seeds, run_labels, image_shape, config, device, notes, held_out, grid=grid)


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


def jacobian_whole_config(cfg: ComputeConfig, image_shape, fields: dict, grid: Optional[TimeGrid] = None) -> dict:
    """The SPEC 12 settings a run records (absent when off, so runs made without them still resume), with
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


def whole_dims(config: dict) -> dict:
    """The per-cell arrays of SPEC 12 a run with this config stores, with their trailing dimensions."""
    from edtool.store.run import ALIGN_ARRAYS, LOCALITY_ARRAYS, POINT_ARRAYS

    return {**(LOCALITY_ARRAYS if config.get("locality") else {}), **(ALIGN_ARRAYS if config.get("align") else {}),
            **(POINT_ARRAYS if config.get("save_points") else {})}


def jacobian_whole_arrays(config: dict) -> list:
    """The names of the per-cell arrays of SPEC 12 a run with this config stores."""
    return list(whole_dims(config))
