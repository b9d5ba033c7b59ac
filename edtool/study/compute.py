"""`edtool compute`: trajectories for realizations x models, measured at every step, streamed
into the run store (SPEC 7, 8). Resumable: only cells whose `done` flag is unset are computed.

    cfg = ComputeConfig(models=["unet", "els"], realizations=4, nsteps=20)
    summary = compute(cfg)          # -> dict with the run location, timings, failures
"""

import hashlib
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from edtool.config import MAX_NSTEPS, MAX_SEED, MIN_PROBES, NSTEPS, PATCH_SIZE, PROBES
from edtool.diffusion import TimeGrid, ddim_sample, initial_noises, realization_seeds
from edtool.jacobian.ed import METHODS as ESTIMATORS
from edtool.errors import EdtoolError
from edtool.els.machine import ALIASES, MACHINES
from edtool.els.schedule import check_fits, check_patch_size
from edtool.store.run import MAX_REALIZATIONS

NETWORKS = ("unet", "resnet")
MACHINE_NAMES = tuple(ALIASES) + MACHINES  # what --models accepts: `els` follows the networks' padding
RTOL_MAX_PROBES = 1024  # --rtol adds probes up to this many per point


@dataclass
class ComputeConfig:
    """Every option of `edtool compute`; those that change a number go into the store's config."""

    dataset: str = "mnist5k"
    data_root: Optional[str] = None
    models: List[str] = field(default_factory=lambda: ["unet", "resnet", "els"])
    unet: Optional[str] = None
    resnet: Optional[str] = None
    scales: Optional[str] = None
    patch_size: int = PATCH_SIZE  # ELS patch size when no calibrated scales are found
    max_samples: Optional[int] = None  # the machines get the first N training images (per class if conditional)
    nsteps: int = NSTEPS
    realizations: int = 1
    seed: int = 0
    label: Optional[int] = None
    estimator: str = "auto"
    probes: int = PROBES
    rtol: Optional[float] = None
    maps: bool = False
    trajectory: str = "own"  # own | shared
    points: str = "trajectory"  # trajectory | noised-data (SPEC 13: forward-noised held-out images)
    held_out: Optional[str] = None  # data set of the noised-data points, test split (default: points.default_held_out)
    reference: Optional[str] = None  # the model whose path is shared (default: the first)
    device: str = "auto"
    batch: int = 1
    run: Optional[str] = None
    run_dir: Optional[str] = None
    overwrite: bool = False
    retry_failed: bool = False  # recompute finished cells that hold NaN (e.g. out of memory on another device)
    shard: Optional[tuple] = None  # (i, K)
    locality: bool = False  # SPEC 12 locality profiles loc_jac, loc_ed per radius, and r90
    locality_radius: Optional[int] = None  # R: radii 0..R (default half the image size)
    locality_method: str = "auto"  # auto (exact when the Jacobian fits in memory) | exact | probe
    locality_pixels: int = 64  # output pixels drawn by the probe estimator
    align: Optional[str] = None  # SPEC 12 alignment of every model's Jacobian with this model's (same points)
    scheduler: Optional[str] = None  # SPEC 14: scheduler folder of a diffusers UNet2DModel folder source
    save_points: bool = False  # store the point of every measurement (array `point`)
    sources: dict = field(default_factory=dict)  # SPEC 14: {label: SOURCE} of --models LABEL=SOURCE entries

    def __post_init__(self):  # --models LABEL=SOURCE: the label names the model, its source is kept here
        from edtool.networks.sources import split_models

        self.models, found = split_models(list(self.models), NETWORKS + MACHINE_NAMES)
        self.sources = {**self.sources, **found}


class Reporter:
    """Progress callbacks; the CLI supplies a rich or plain-text one. The default is silent."""

    def start(self, total_cells: int, done_cells: int, models: List[str], steps: Optional[dict] = None): ...
    def step(self, r: int, model: str, j: int, nsteps: int, asym: float): ...
    def cell_done(self, r: int, model: str, asym_mean: float, failed: bool): ...
    def note(self, message: str): ...


# ------------------------------------------------------------------ setup


def validate(cfg: ComputeConfig) -> None:
    """Refuse bad settings before anything is loaded or written."""
    from edtool.data import DATASETS

    if cfg.dataset not in DATASETS:
        raise EdtoolError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if not cfg.models:
        raise EdtoolError("no models given; e.g. --models unet,resnet,els")
    for m in cfg.models:
        if m not in NETWORKS + MACHINE_NAMES and m not in cfg.sources:
            raise EdtoolError(f"unknown model {m!r}; choose from {', '.join(NETWORKS + MACHINE_NAMES)}, or "
                              "LABEL=SOURCE (a diffusers folder, hf:ORG/NAME, py:module:attr, a checkpoint)")
    if len(set(cfg.models)) != len(cfg.models):
        raise EdtoolError(f"a model is listed twice in --models {','.join(cfg.models)}")
    if cfg.nsteps < 1:
        raise EdtoolError(f"--nsteps must be at least 1, got {cfg.nsteps}")
    if cfg.nsteps > MAX_NSTEPS:
        raise EdtoolError(f"--nsteps {cfg.nsteps} is more than edtool takes (at most {MAX_NSTEPS})")
    if cfg.realizations < 1:
        raise EdtoolError(f"--realizations must be at least 1, got {cfg.realizations}")
    if not 0 <= cfg.seed <= MAX_SEED - cfg.realizations + 1:
        raise EdtoolError(f"--seed {cfg.seed} with --realizations {cfg.realizations}: seeds go from 0 to {MAX_SEED}")
    if cfg.realizations > MAX_REALIZATIONS:
        raise EdtoolError(f"--realizations {cfg.realizations} is more than one run holds (at most "
                          f"{MAX_REALIZATIONS}: one chunk file per realization and array); split the work over "
                          "runs with different --seed")
    if cfg.batch < 1:
        raise EdtoolError(f"--batch must be at least 1, got {cfg.batch}")
    if cfg.estimator not in ESTIMATORS:
        raise EdtoolError(f"unknown --estimator {cfg.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if cfg.estimator == "analytic" and any(m not in MACHINE_NAMES for m in cfg.models):
        raise EdtoolError("--estimator analytic applies to the ELS machines only; use auto (closed form for "
                          "machines, Hutchinson or exact for networks)")
    if cfg.probes < MIN_PROBES:
        raise EdtoolError(f"--probes must be at least {MIN_PROBES} (the standard error needs a spread), got {cfg.probes}")
    if cfg.rtol is not None and not 0 < cfg.rtol < 1:
        raise EdtoolError(f"--rtol must be between 0 and 1, got {cfg.rtol}")
    if cfg.trajectory not in ("own", "shared"):
        raise EdtoolError(f"--trajectory must be own or shared, got {cfg.trajectory!r}")
    if cfg.reference is not None and cfg.reference not in cfg.models:
        raise EdtoolError(f"--reference {cfg.reference!r} is not among --models")
    from edtool.study.points import POINT_SOURCES

    if cfg.points not in POINT_SOURCES:
        raise EdtoolError(f"--points must be one of {', '.join(POINT_SOURCES)}, got {cfg.points!r}")
    if cfg.points == "noised-data" and cfg.trajectory == "shared":
        raise EdtoolError("--points noised-data measures every model at the same noised held-out images already; "
                          "drop --trajectory shared")
    if cfg.held_out is not None and cfg.points != "noised-data":
        raise EdtoolError("--held-out chooses the images of --points noised-data; add --points noised-data")
    if cfg.held_out is not None and cfg.held_out not in DATASETS:
        raise EdtoolError(f"unknown --held-out {cfg.held_out!r}; choose one of {', '.join(DATASETS)}")
    if cfg.overwrite and cfg.shard is not None:
        raise EdtoolError("--overwrite with --shard would delete what the other shards computed: delete the "
                          "run directory once before starting the shards, and run them without --overwrite")
    check_patch_size(cfg.patch_size, "--patch-size")
    if cfg.max_samples is not None and (isinstance(cfg.max_samples, bool) or not isinstance(cfg.max_samples, int)
                                        or cfg.max_samples < 1):
        raise EdtoolError(f"--max-samples must be at least 1, got {cfg.max_samples}")
    _validate_jacobian_whole(cfg)


def _validate_jacobian_whole(cfg: ComputeConfig) -> None:
    """--locality and --align settings (SPEC 12)."""
    from edtool.jacobian.locality import LOCALITY_METHODS

    if cfg.locality_method not in LOCALITY_METHODS:
        raise EdtoolError(f"unknown --locality-method {cfg.locality_method!r}; choose one of "
                          f"{', '.join(LOCALITY_METHODS)}")
    if cfg.locality_radius is not None and cfg.locality_radius < 0:
        raise EdtoolError(f"--locality-radius must be 0 or more, got {cfg.locality_radius}")
    if cfg.locality_pixels < 2:
        raise EdtoolError(f"--locality-pixels must be at least 2 (an error bar needs a spread), "
                          f"got {cfg.locality_pixels}")
    if cfg.align is not None:
        if cfg.align not in cfg.models:
            raise EdtoolError(f"--align {cfg.align!r} is not among --models {','.join(cfg.models)}; add it")
        if cfg.trajectory != "shared" and cfg.points == "trajectory":
            raise EdtoolError("--align compares Jacobians at the same points: it needs --trajectory shared "
                              "(or --points noised-data)")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present (each torchrun rank its own GPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
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


def probe_seed(run_seed: int, realization: int, model: str, step: int) -> int:
    """Seed of the Hutchinson probes for one (realization, model, step): stable across reruns and ranks."""
    digest = hashlib.sha256(f"{run_seed}/{realization}/{model}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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

    validate(cfg)
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
    nets_conditional = [f for f in models.values() if getattr(f, "conditional", False)]
    conditional = bool(nets_conditional) or cfg.label is not None
    unconditional = [name for name, f in models.items() if not getattr(f, "conditional", False)]
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
        "device": device.type,
    }
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
                if getattr(f, "patch_sizes", None)}
        out["locality"] = {"radius": radius, "method": cfg.locality_method, "pixels": cfg.locality_pixels,
                           "patch_half_width": half}
    if cfg.align is not None:
        out["align"] = {"reference": cfg.align, "probes": cfg.probes}
    return out


def _whole_dims(config: dict) -> dict:
    """The per-cell arrays of SPEC 12 a run with this config stores, with their trailing dimensions."""
    from edtool.store.run import ALIGN_ARRAYS, LOCALITY_ARRAYS, POINT_ARRAYS

    return {**(LOCALITY_ARRAYS if config.get("locality") else {}), **(ALIGN_ARRAYS if config.get("align") else {}),
            **(POINT_ARRAYS if config.get("save_points") else {})}


def jacobian_whole_arrays(config: dict) -> list:
    """The names of the per-cell arrays of SPEC 12 a run with this config stores."""
    return list(_whole_dims(config))


# ------------------------------------------------------------------ measuring


def _score_field(model, t: torch.Tensor, label):
    """The score at time t as a function of x alone; machines bring their closed-form Jacobian."""
    if hasattr(model, "field"):
        return model.field(t, label)
    return lambda x: model.score(t, x, label)


def _eps_fn(model, label):
    return lambda t, x: model.eps(t, x, label)


class _Timer:
    """Accumulates wall time per phase (sampling, jacobian, store)."""

    def __init__(self):
        self.seconds = {"sampling": 0.0, "jacobian": 0.0, "store": 0.0}

    def add(self, phase, since):
        self.seconds[phase] += time.perf_counter() - since


@dataclass
class Cell:
    """One model's measurements for a batch of B realizations along nsteps steps, as the store takes them."""

    ed_fro: np.ndarray  # (B, nsteps) ||J - J^T||_F
    jac_fro: np.ndarray  # (B, nsteps) ||J||_F
    asym: np.ndarray  # (B, nsteps) ed_fro / (sqrt(2) jac_fro)
    ed_stderr: np.ndarray  # (B, nsteps) standard error of ed_fro (0 when exact)
    final: Optional[np.ndarray]  # (B, C, H, W) the path's end at t = 0 (None on a shared path until set)
    curl_map: Optional[np.ndarray] = None  # (B, nsteps, H, W) with --maps
    points: list = field(default_factory=list)  # x at every step: what a shared trajectory reuses
    whole: dict = field(default_factory=dict)  # SPEC 12 arrays by store name: (B, nsteps[, radii])
    notes: set = field(default_factory=set)  # one-line notes for the reporter, once per cell

    @classmethod
    def nan(cls, B: int, study: "Study") -> "Cell":
        """Every number NaN: a step that is never measured stays NaN (and a failed path has no points)."""
        n, (c, h, w) = study.cfg.nsteps, study.image_shape
        radii = (study.config.get("locality") or {}).get("radius", -1) + 1
        sizes = {"step": n, "radius": radii, "channel": c, "y": h, "x": w}
        whole = {name: np.full((B, *(sizes[d] for d in dims)), np.nan)
                 for name, dims in _whole_dims(study.config).items()}
        return cls(*(np.full((B, n), np.nan) for _ in range(4)), final=np.full((B, c, h, w), np.nan),
                   curl_map=np.full((B, n, h, w), np.nan) if study.cfg.maps else None, whole=whole)


@dataclass
class Batch:
    """Realizations computed together: their row numbers, initial noises (B, C, H, W) and labels."""

    rows: List[int]
    x_T: torch.Tensor
    label: Optional[torch.Tensor]


@dataclass
class _Job:
    """What every batch of a compute() call shares: the study, the open store, progress, timings, failures."""

    study: Study
    run: object  # edtool.store.run.RunStore
    reporter: Reporter
    timer: _Timer = field(default_factory=_Timer)
    failures: list = field(default_factory=list)
    reference_ops: dict = field(default_factory=dict)  # --align: the reference's Jacobian per step of this batch


def measure(job: _Job, name: str, batch: Batch, points: Optional[List[torch.Tensor]] = None) -> Cell:
    """Run one model's DDIM path from batch.x_T (or visit the given shared points), measuring every step."""
    from edtool.jacobian.ed import exterior_derivative
    from edtool.jacobian.locality import ClosedFormField

    cfg, nsteps, model = job.study.cfg, job.study.cfg.nsteps, job.study.models[name]
    times = job.study.grid.times.tolist()
    B, label, rows = batch.x_T.shape[0], batch.label, batch.rows
    out = Cell.nan(B, job.study)
    method = job.study.config["models"][name]["estimator"]  # `auto` resolved once, as the config records it

    def on_step(j, t, x):
        out.points.append(x.detach())
        if "point" in out.whole:  # --save-points: where step j was measured
            out.whole["point"][:, j] = x.detach().double().cpu().numpy()
        t0 = time.perf_counter()
        tb = torch.full((B,), t, dtype=torch.float64, device=x.device)  # the grid's t: networks cast it
        f = _score_field(model, tb, label)
        op = _jacobian_op(job, name, f, x, j) if cfg.locality or cfg.align else None
        if op is not None and hasattr(f, "analytic_ed") and cfg.estimator in ("auto", "analytic"):
            f = ClosedFormField(f, op)  # the machine's ED from the Jacobian just built, not a second one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-finite scores become NaN; reported once per cell below
            res = exterior_derivative(f, x, method=method, probes=cfg.probes,
                                      seed=[probe_seed(cfg.seed, r, name, j) for r in rows], rtol=cfg.rtol,
                                      max_probes=RTOL_MAX_PROBES, curl_map=cfg.maps)
        for k in ("ed_fro", "jac_fro", "asym", "ed_stderr"):
            getattr(out, k)[:, j] = getattr(res, k).detach().double().cpu().numpy()
        if res.rtol_met is not None:  # the probe cap came before the --rtol target: say so at the end
            job.study.rtol_missed += [(r, name, j, float(out.ed_stderr[i, j] / out.ed_fro[i, j]))
                                      for i, r in enumerate(rows) if not bool(res.rtol_met[i])]
        if cfg.maps:
            out.curl_map[:, j] = res.curl_map.detach().double().cpu().numpy()
        if op is not None:
            _measure_whole(job, name, op, tb, batch, x, j, out)
        job.timer.add("jacobian", t0)
        for i, r in enumerate(rows):
            job.reporter.step(r, name, j, nsteps, float(out.asym[i, j]))

    if points is None:
        eps = _eps_fn(model, label)

        def timed_eps(t, x):
            t0 = time.perf_counter()
            e = eps(t, x)
            job.timer.add("sampling", t0)
            return e

        final = ddim_sample(timed_eps, batch.x_T, times, on_step=on_step)
        out.final = final.detach().double().cpu().numpy()
    else:
        for j, x in enumerate(points):
            on_step(j, times[j], x)
        out.final = None
    for note in sorted(out.notes):
        job.reporter.note(note)
    return out


def _circular(model) -> Optional[bool]:
    """Whether distances wrap around (circular padding): a network's manifest says; None lets a
    machine use its own padding."""
    manifest = getattr(model, "manifest", None)
    return None if manifest is None else manifest.get("padding") == "circular"


def _jacobian_op(job: _Job, name: str, f, x: torch.Tensor, j: int):
    """The Jacobian operator of model `name` at step j's point x. The --align reference's is kept for the
    batch: every model visits the same points, so it is built once per step, not once per model."""
    from edtool.jacobian.locality import jacobian_operator

    if name == job.study.cfg.align and j in job.reference_ops:
        return job.reference_ops[j]
    op = jacobian_operator(f, x, circular=_circular(job.study.models[name]))
    if name == job.study.cfg.align:
        job.reference_ops[j] = op
    return op


def _measure_whole(job: _Job, name: str, op, tb: torch.Tensor, batch: Batch, x: torch.Tensor, j: int, out: Cell):
    """SPEC 12 at one step: the locality profile of this model's Jacobian `op` and its alignment with the
    reference's (the dense J of a network is built once for both)."""
    from edtool.jacobian.locality import FieldJacobian, alignment, locality

    study = job.study
    cfg, settings, rows = study.cfg, study.config, batch.rows
    if cfg.locality:
        loc = settings["locality"]
        res = locality(op, loc["radius"], loc["method"], loc["pixels"],
                       seed=[probe_seed(cfg.seed, r, f"{name}/locality", j) for r in rows])
        for k in ("loc_jac", "loc_ed", "loc_jac_stderr", "loc_ed_stderr", "r90_jac", "r90_ed"):
            out.whole[k][:, j] = getattr(res, k).detach().double().cpu().numpy()
    if cfg.align:
        ref = cfg.align
        op_ref = _jacobian_op(job, ref, _score_field(study.models[ref], tb, batch.label), x, j)
        # exact when both dense Jacobians are at hand: machines, and networks whose J --locality builds
        # exactly (decided by the settings alone, so a resumed run chooses as a fresh one does)
        exact_nets = cfg.locality and settings["locality"]["method"] != "probe"
        at_hand = all(not isinstance(o, FieldJacobian) or (exact_nets and o.dense() is not None)
                      for o in (op, op_ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reason comes back in the result
            al = alignment(op, op_ref, "exact" if at_hand else "hutchinson", cfg.probes,
                           seed=[probe_seed(cfg.seed, r, f"{name}/align", j) for r in rows])
        for k in ("align_jac", "align_ed", "align_jac_stderr", "align_ed_stderr"):
            out.whole[k][:, j] = getattr(al, k).detach().double().cpu().numpy()
        if al.reason is not None:
            out.notes.add(f"{name} vs {cfg.align}: align_ed is NaN where a Jacobian is symmetric (a gradient "
                          "field, like the `is` machine's, has no rotation to align)")


class _OutOfMemory(Exception):
    """A batch of several realizations did not fit: compute() retries with a smaller batch."""


def _is_out_of_memory(err: Exception) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _measure_safely(job: _Job, name: str, batch: Batch, points=None):
    """measure(), but a numeric failure inside one model (RuntimeError, FloatingPointError: out of memory, a
    failed linear solve) becomes NaN for its cells plus a warning: (Cell, error or None).

    Out of memory with several realizations in the batch is not a failure of the model: it raises
    _OutOfMemory so that the batch is split; with one realization it is recorded as NaN like the rest.
    """
    try:
        return measure(job, name, batch, points), None
    except (RuntimeError, FloatingPointError) as err:  # numeric failures only (incl. out of memory): a
        # ValueError is an input check that came too late, and a user error is never stored as NaN
        if _is_out_of_memory(err):
            if batch.x_T.is_cuda:
                torch.cuda.empty_cache()
            if len(batch.rows) > 1:
                raise _OutOfMemory() from err
        message = f"{name} failed on realization(s) {batch.rows}: {type(err).__name__}: {str(err).splitlines()[0]}"
        warnings.warn(message + " -> stored as NaN")
        return Cell.nan(len(batch.rows), job.study), message


# ------------------------------------------------------------------ the stage


def _distributed_shard(cfg: ComputeConfig):
    """Under torchrun/srun (WORLD_SIZE > 1) join the process group; return (rank, world) or None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise EdtoolError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes; unset it to "
                          "run one process, or start the ranks with torchrun") from None
    if world <= 1:
        return None
    if cfg.shard is not None:
        raise EdtoolError("--shard and torchrun split the realizations each on their own: use one of them")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise EdtoolError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not: start the ranks with torchrun (torchrun --nproc-per-node {world} -m edtool compute "
                          "...), or unset WORLD_SIZE to run one process")
    try:
        rank = int(os.environ["RANK"])
    except ValueError:
        raise EdtoolError(f"RANK={os.environ['RANK']!r} is not a rank number; start the ranks with torchrun") from None
    if not 0 <= rank < world:
        raise EdtoolError(f"RANK={rank} with WORLD_SIZE={world}: ranks go from 0 to {world - 1}; start the ranks "
                          "with torchrun, or fix RANK/WORLD_SIZE")
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        _join(dist, backend, rank, world)
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def _stderr_kept_unless_failed():
    """Hold what the process writes to its stderr (file descriptor 2, where C++ logs go) meanwhile; pass it
    on if the block succeeds, drop it if it raises (the error then says what happened, in one line)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)  # reached only without an error
        sys.stderr.write(held.read().decode(errors="replace"))


RENDEZVOUS_TIMEOUT = 300  # seconds the ranks wait for each other at start (EDTOOL_RENDEZVOUS_TIMEOUT overrides)


def _join(dist, backend: str, rank: int, world: int) -> None:
    """init_process_group, but a rank that waits in vain for the others stops with one line after
    EDTOOL_RENDEZVOUS_TIMEOUT seconds instead of hanging; collectives keep torch's default timeout."""
    from datetime import timedelta

    text = os.environ.get("EDTOOL_RENDEZVOUS_TIMEOUT", str(RENDEZVOUS_TIMEOUT))
    try:
        seconds = float(text)
        assert 0 < seconds < 1e7
    except (ValueError, AssertionError):
        raise EdtoolError(f"EDTOOL_RENDEZVOUS_TIMEOUT={text!r} is not a number of seconds (e.g. 300)") from None
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        with _stderr_kept_unless_failed():  # torch's C++ logs each connection retry with a stack trace
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=seconds), rank=rank, world_size=world)
    except Exception as e:  # DistStoreError, RuntimeError: torch names no common type for "the others never came"
        raise EdtoolError(f"rank {rank} of {world}: the other ranks did not join at {where} within {seconds:g}s "
                          f"({' '.join(str(e).split())[:160]}); start every rank (torchrun does), check "
                          "MASTER_ADDR/MASTER_PORT, or raise EDTOOL_RENDEZVOUS_TIMEOUT") from None
    from torch.distributed import distributed_c10d as c10d

    if hasattr(c10d, "_set_pg_timeout"):  # a late rank's whole shard may run before the final barrier
        c10d._set_pg_timeout(c10d.default_pg_timeout)


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def compute(cfg: ComputeConfig, reporter: Optional[Reporter] = None) -> dict:
    """Fill the run store for cfg, resuming where it stopped; returns a summary dict."""
    from edtool.store.status import record_shard
    from edtool.store.run import create_run, describe_cells, run_lock, shard_realizations

    reporter = reporter or Reporter()
    validate(cfg)
    dist_shard = _distributed_shard(cfg)
    shard = dist_shard or cfg.shard
    location = run_location(cfg)
    study = prepare(cfg)
    for note in study.notes:
        reporter.note(note)

    names = list(cfg.models)
    create = dict(config=study.config, models=names, seeds=study.seeds, labels=study.labels,
                  nsteps=cfg.nsteps, image_shape=study.image_shape, maps=cfg.maps,
                  times=study.grid.step_times.tolist(),  # the grid this run measures on, recorded as `time`
                  extra_arrays=jacobian_whole_arrays(study.config),
                  radius=(study.config.get("locality") or {}).get("radius"))
    mine = shard_realizations(cfg.realizations, shard)
    # the lock comes first: --overwrite must not delete a run that a live process is filling
    with run_lock(location, shard=shard):
        if dist_shard is not None and dist_shard[0] != 0:
            _barrier()  # rank 0 creates the store first
            run = create_run(location, **create)
        else:
            try:
                run = create_run(location, overwrite=cfg.overwrite, **create)
            finally:  # on a refusal the other ranks meet it themselves rather than wait forever
                if dist_shard is not None:
                    _barrier()
        record_shard(location, shard)
        job = _Job(study, run, reporter)
        started = time.perf_counter()
        damaged = run.reset_damaged(mine)  # done cells whose chunks are missing or corrupt: computed again
        if damaged:
            reporter.note(f"recomputing {len(damaged)} damaged cell(s): {describe_cells(run, damaged)}")
        pending = run.pending(mine)
        redo = _failed_cells(run, mine) if cfg.retry_failed else []
        if redo:
            reporter.note(f"retrying {len(redo)} finished cell(s) that hold NaN")
            pending = sorted(set(pending) | set(redo))
        steps = {name: cfg.nsteps * sum(1 for _, m in pending if m == i) for i, name in enumerate(names)}
        reporter.start(len(mine) * len(names), len(mine) * len(names) - len(pending), names, steps)
        todo, batch = sorted({r for r, _ in pending}), cfg.batch
        while todo:
            rows = todo[:batch]
            try:
                _compute_batch(job, rows, redo)
            except _OutOfMemory:  # cells finished before it are stored; the rest is retried in halves
                batch = max(1, len(rows) // 2)
                reporter.note(f"out of memory with {len(rows)} realizations per batch: lowering --batch to {batch}")
                continue
            todo = todo[len(rows):]
    if dist_shard is not None:
        _barrier()
    total = time.perf_counter() - started
    warned = [rtol_warning(study.rtol_missed, cfg.rtol)] if study.rtol_missed else []
    return {"location": location, "progress": run.progress(), "failures": job.failures, "warnings": warned,
            "timings": {**job.timer.seconds, "total": total}, "notes": study.notes, "shard": shard}


def rtol_warning(missed: list, rtol: float) -> str:
    """One line: how many measured points stopped at the probe cap above the --rtol target, and the worst."""
    r, name, j, worst = max(missed, key=lambda m: m[3])
    return (f"--rtol {rtol} not reached at {len(missed)} (realization, model, step) points (the probe cap of "
            f"{RTOL_MAX_PROBES} came first); worst relative standard error {worst:.3g} ({name}, realization {r}, "
            f"step {j}); each point's is ed_stderr / ed_fro in the store")


def _failed_cells(run, realizations: List[int]) -> list:
    """Finished (r, m) cells with a NaN step among `realizations`: what --retry-failed recomputes."""
    done, ed = run.done_mask(realizations), run.read("ed_fro", realizations=realizations)
    return [(r, m) for i, r in enumerate(realizations) for m in range(len(run.models))
            if done[i, m] and not np.isfinite(ed[i, m]).all()]


def _compute_batch(job: _Job, rows: List[int], redo=()):
    """All not-yet-done models for a batch of realizations; each cell is written as soon as it is done."""
    study, cfg, device = job.study, job.study.cfg, job.study.device
    done = dict(zip(rows, job.run.done_mask(rows)))  # only this batch's rows: cost independent of the run size
    for r, m in redo:
        if r in done:
            done[r][m] = False
    x_T = initial_noises([study.seeds[r] for r in rows], study.image_shape).to(device)
    lab = [study.labels[r] for r in rows]
    batch = Batch(rows, x_T, None if lab[0] < 0 else torch.tensor(lab, device=device))
    job.reference_ops.clear()  # the reference's Jacobians at the previous batch's points

    names = list(cfg.models)
    points, reference_final = None, None
    if cfg.points == "noised-data":  # the same noised held-out points for every model; final is x_0
        from edtool.study.points import noised_points

        x_0 = study.held_out[rows].to(device)
        points, reference_final = noised_points(x_0, x_T, study.grid), x_0.double().cpu().numpy()
    elif cfg.trajectory == "shared":
        ref = study.config["reference"]
        if all(done[r][names.index(ref)] for r in rows):
            # its cell is done: the path is recomputed, cheaply (no Jacobians)
            points, reference_final = _reference_path(study.models[ref], batch, study.grid)
        else:
            ref_out, err = _measure_safely(job, ref, batch)
            points, reference_final = ref_out.points, ref_out.final
            _write(job, names.index(ref), ref, batch, ref_out, err)

    for m, name in enumerate(names):
        if all(done[r][m] for r in rows) or (cfg.trajectory == "shared" and name == study.config["reference"]):
            continue
        if points is not None and not points:  # the reference path failed
            out, err = Cell.nan(len(rows), study), f"{name}: reference path failed"
        else:
            out, err = _measure_safely(job, name, batch, points)
            if points is not None and err is None:
                out.final = reference_final
        _write(job, m, name, batch, out, err)


def _reference_path(model, batch: Batch, grid: TimeGrid):
    """The points a model's DDIM path visits and its end (float64 numpy), without measuring anything."""
    visited = []
    final = ddim_sample(_eps_fn(model, batch.label), batch.x_T, grid,
                        on_step=lambda j, t, x: visited.append(x.detach()))
    return visited, final.detach().double().cpu().numpy()


def _write(job: _Job, m: int, name: str, batch: Batch, cell: Cell, err: Optional[str]):
    """Write each realization's cell of model m (data first, done flag last inside write_cell)."""
    t0 = time.perf_counter()
    if err is None and not np.all(np.isfinite(cell.ed_fro)):
        err = f"{name}: non-finite values on realization(s) {batch.rows} -> NaN"
        warnings.warn(err)
    for i, r in enumerate(batch.rows):
        job.run.write_cell(r, m, cell.ed_fro[i], cell.jac_fro[i], cell.asym[i], cell.ed_stderr[i], cell.final[i],
                           None if cell.curl_map is None else cell.curl_map[i],
                           **{k: v[i] for k, v in cell.whole.items()})
        asym = cell.asym[i]
        mean_asym = float(np.nanmean(asym)) if np.isfinite(asym).any() else math.nan
        job.reporter.cell_done(r, name, mean_asym, err is not None)
    if err is not None:
        job.failures.append(err)
    job.timer.add("store", t0)
