"""Settings objects without heavy imports, so the command line takes its defaults from them."""

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

from edtool.errors import EdtoolError

# ------------------------------------------------------------------ defaults every command shares
# Each is defined here once; the commands' options, the settings dataclasses and the library read them.
NSTEPS = 20  # DDIM steps: the seed tool's and the paper's trajectories, and the shipped calibrations' length
PROBES = 16  # Hutchinson probes per point: a relative standard error of ED of a few per cent on MNIST networks
MIN_PROBES = 2  # the standard error of a Hutchinson estimate needs a spread, so at least two probes
PATCH_SIZE = 5  # ELS patch size when no calibrated schedule is found (the median of the shipped ResNet's calibration;
# the paper's MNIST schedules have medians 7-10)
NETWORKS = ("unet", "resnet")  # the architectures edtool trains and finds by name (--unet, --resnet)
PADDINGS = ("zeros", "circular")  # the convolution paddings edtool trains with and the ELS machines model


# ------------------------------------------------------------------ what each option accepts
# Defined here once; the modules that act on them import these (so checking a setting never loads them).
DATASETS = ("mnist5k", "mnist", "fashionmnist", "cifar10")  # --dataset, --held-out (edtool.data loads them)
MACHINES = ("is", "ls", "els-circular", "els-borders")  # the score machines (edtool.els.factory)
ALIASES = {"els": "els-borders"}  # `els` follows the networks' padding (resolve_machine_name)
MACHINE_NAMES = tuple(ALIASES) + MACHINES  # every machine name --models accepts
ESTIMATORS = ("auto", "exact", "hutchinson", "analytic")  # --estimator (edtool.jacobian.ed)
POINT_SOURCES = ("trajectory", "noised-data")  # --points (edtool.study.points)
LOCALITY_METHODS = ("auto", "exact", "probe")  # --locality-method (edtool.jacobian.locality)
METRICS = ("cosine", "l2")  # calibrate --metric (edtool.els.calibrate)
LAYOUTS = ("edtool", "paper")  # sample --layout (edtool.els.sample_folder)
MAX_REALIZATIONS = 1_000_000  # one chunk file per realization and array; more is a job for several runs


def check_patch_size(k, what: str = "patch size") -> int:
    """An odd int >= 1, else EdtoolError (a ValueError) naming `what`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise EdtoolError(f"{what} is {k!r}; patch sizes must be odd integers >= 1 (3, 5, 7, ...)")
    return k


def check_sizes(sizes) -> list:
    """Candidate patch sizes: distinct odd ints >= 1, sorted; else EdtoolError."""
    sizes = list(sizes)
    if not sizes:
        raise EdtoolError("give at least one candidate patch size (e.g. --sizes 3 5 7)")
    return sorted({check_patch_size(k, "candidate size") for k in sizes})


def split_models(entries: List[str], reserved=()) -> Tuple[List[str], dict]:
    """--models entries -> (the model names in order, {label: SOURCE} of the LABEL=SOURCE ones)."""
    names, sources = [], {}
    for entry in entries:
        if "=" not in entry:
            names.append(entry)
            continue
        label, source = (part.strip() for part in entry.split("=", 1))
        if not label or not source:
            raise EdtoolError(f"--models entry {entry!r}: write LABEL=SOURCE, e.g. ddpm=path/to/pipeline")
        if "/" in label or label in reserved:
            raise EdtoolError(f"--models label {label!r} " + ("contains '/'" if "/" in label else
                              "is a built-in model name") + ": choose another, e.g. mymodel=" + source)
        names.append(label)
        sources[label] = source
    return names, sources


def default(cls, name: str):
    """The default of one setting of a settings dataclass (default_factory included)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if callable(f.default_factory) else f.default


MAX_LR = 1e30  # AdamW's step lr / (1 - beta1**step) must stay a float32


@dataclass
class TrainConfig:
    """Every setting that changes the trained weights (`edtool train` and `edtool.networks.train.train`)."""

    arch: str = "unet"
    dataset: str = "mnist5k"
    conditional: bool = False
    padding: str = "zeros"
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    lr_final_factor: float = 0.05  # learning rate at the last step = lr * this (exponential decay)
    # per-step decay instead (the paper's is 0.999965): lr at step s = lr * lr_gamma**s, whatever --steps is,
    # so a run can be continued to more steps
    lr_gamma: Optional[float] = None
    weight_decay: float = 0.0
    seed: int = 0
    fsizes: list = field(default_factory=lambda: [32, 64, 128])  # UNet widths
    emb_dim: int = 256  # UNet time-embedding size
    width: int = 64  # ResNet width (= its embedding size)
    layers: int = 4  # ResNet residual layers
    lastksize: int = 1
    ema_decay: float = 0.999  # weights shipped = exponential moving average (0 = the raw weights)
    init_from: Optional[str] = None  # sha256 of the edtool checkpoint whose weights start the run (None: random)

    def identity(self) -> dict:
        """The settings a saved state must share to be resumed: all of them, except the step count when
        the learning rate does not depend on it (a per-step --lr-gamma run continues to more steps)."""
        settings = asdict(self)
        if self.lr_gamma is not None:
            settings.pop("steps")
        return settings

    def gamma(self) -> float:
        """The per-step learning-rate factor."""
        return self.lr_gamma if self.lr_gamma is not None else self.lr_final_factor ** (1.0 / max(self.steps, 1))

    def validate(self) -> "TrainConfig":
        """Refuse settings no network or optimizer can use (EdtoolError naming the option)."""
        if self.arch not in NETWORKS:
            raise EdtoolError(f"unknown --arch {self.arch!r}; choose {' or '.join(NETWORKS)}")
        if self.padding not in PADDINGS:
            raise EdtoolError(f"unknown --padding {self.padding!r}; choose {' or '.join(PADDINGS)}")
        if self.arch == "resnet" and (self.width % 8 or self.width < 16):
            raise EdtoolError(f"--width must be a multiple of 8 and at least 16 (GroupNorm with 8 groups needs "
                              f"2 or more channels per group), got {self.width}")
        if self.arch == "unet":
            if len(self.fsizes) < 2 or min(self.fsizes) < 1:
                raise EdtoolError(f"--fsizes needs two or more channel widths of at least 1 (one per UNet level, "
                                  f"e.g. 32,64,128), got {','.join(map(str, self.fsizes))}")
            if self.emb_dim < 4 or self.emb_dim % 2:
                raise EdtoolError(f"--emb-dim must be even and at least 4 (sines and cosines of the time, two or "
                                  f"more each), got {self.emb_dim}")
        if self.layers < 0:
            raise EdtoolError(f"--layers must be 0 or more, got {self.layers}")
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise EdtoolError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr <= MAX_LR or not 0 < self.lr_final_factor <= 1:  # (NaN fails both)
            raise EdtoolError(f"--lr must be a positive number up to {MAX_LR:g} (an optimizer step in float32 "
                              f"overflows beyond) and --lr-final-factor in (0, 1], got {self.lr} and "
                              f"{self.lr_final_factor}")
        if self.lr_gamma is not None and not 0 < self.lr_gamma <= 1:
            raise EdtoolError(f"--lr-gamma must be in (0, 1] (the paper's is 0.999965), got {self.lr_gamma}")
        if not 0 <= self.ema_decay < 1:
            raise EdtoolError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        return self

    def check_images(self, image_shape) -> None:
        """Refuse a UNet whose levels do not fit images (..., H, W): each level halves both sides."""
        halvings = len(self.fsizes) - 1
        if self.arch == "unet" and any(side % 2 ** halvings for side in image_shape[-2:]):
            raise EdtoolError(f"--fsizes with {halvings + 1} levels halves the image {halvings} times; "
                              f"{self.dataset}'s {image_shape[-2]}x{image_shape[-1]} images do not divide by "
                              f"{2 ** halvings}: give fewer widths")


# ------------------------------------------------------------------ ranges
# The least and most of each number the commands take (None: no bound). The command line hands them to
# Typer, so a number outside is a usage error before any work; check_range says the same to Python callers.
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED: stored as int64 (a negative one would alias a large one in torch)
MAX_NSTEPS = 100_000  # DDIM steps (the paper's runs use 20 to 1000)
MAX_SEEDS = 1_000_000  # seeds of one calibrate or sample (like a run's MAX_REALIZATIONS)
# Hutchinson probes per point: far more than any image has entries (CIFAR-10: 3,072), where the exact Jacobian
# is cheaper than the probes
MAX_PROBES = 100_000
RANGES = {
    "nsteps": (1, MAX_NSTEPS),
    "seed": (0, MAX_SEED),
    "seeds": (1, MAX_SEEDS),
    "realizations": (1, None),  # and at most the store's MAX_REALIZATIONS, which ComputeConfig.validate checks
    "probes": (MIN_PROBES, MAX_PROBES),
    "max_samples": (1, None),
    "batch": (1, None),
    "locality_radius": (0, None),
    "locality_pixels": (2, None),  # the probe estimator's error bar needs a spread
}


def check_range(name: str, value, why: str = ""):
    """value if it is a whole number within RANGES[name] (None passes: "not given"), else EdtoolError
    naming the option --name; `why` (e.g. " (the standard error needs a spread)") follows the bound."""
    least, most = RANGES[name]
    option = "--" + name.replace("_", "-")
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdtoolError(f"{option} must be a whole number, got {value!r}")
    if least is not None and value < least:
        bound = "0 or more" if least == 0 else f"at least {least}"
        raise EdtoolError(f"{option} must be {bound}{why}, got {value}")
    if most is not None and value > most:
        raise EdtoolError(f"{option} {value} is more than edtool takes (at most {most})")
    return value


def seed_range(seed: int, count: int, name: str = "seeds") -> range:
    """The seeds seed, seed+1, ..., seed+count-1 (count from --seeds or --realizations), all in 0..MAX_SEED;
    a range, so that checking an absurd count costs nothing."""
    check_range("seed", seed)
    check_range(name, count)
    if seed + count - 1 > MAX_SEED:
        raise EdtoolError(f"--seed {seed} with --{name} {count}: seeds go from 0 to {MAX_SEED}")
    return range(seed, seed + count)


def _model_names() -> tuple:
    """What --models accepts by name: the networks, and the machines (`els` follows the networks' padding)."""
    return NETWORKS + MACHINE_NAMES


@dataclass
class ComputeConfig:
    """Every setting of `edtool compute` (and `analyze`); those that change a number go into the store's config."""

    # what is measured
    dataset: str = "mnist5k"  # training data of the networks, and the images the ELS machines are built from
    data_root: Optional[str] = None  # torchvision layout (the bundled mnist5k needs none)
    models: List[str] = field(default_factory=lambda: ["unet", "resnet", "els"])
    unet: Optional[str] = None  # checkpoints (default: discovered, docs/data-and-checkpoints.md)
    resnet: Optional[str] = None
    scales: Optional[str] = None  # ELS schedule file (default: the calibration found beside the ResNet/UNet)
    patch_size: int = PATCH_SIZE  # ELS patch size when no calibrated scales are found
    max_samples: Optional[int] = None  # the machines get the first N training images (per class if conditional)
    scheduler: Optional[str] = None  # SPEC 14: scheduler folder of a diffusers UNet2DModel folder source
    sources: dict = field(default_factory=dict)  # SPEC 14: {label: SOURCE} of --models LABEL=SOURCE entries
    # where it is measured
    nsteps: int = NSTEPS
    realizations: int = 1  # noise realizations, seeds seed .. seed + realizations - 1
    seed: int = 0
    label: Optional[int] = None  # class of conditional models (default: drawn per realization)
    trajectory: str = "own"  # own: each model its own DDIM path | shared: all on the reference's path
    reference: Optional[str] = None  # the model whose path is shared (default: the first)
    points: str = "trajectory"  # trajectory | noised-data (SPEC 13: forward-noised held-out images)
    held_out: Optional[str] = None  # data set of the noised-data points, test split (default: points.default_held_out)
    # how it is measured
    estimator: str = "auto"  # auto: closed form for machines, exact or Hutchinson for networks by size and device
    probes: int = PROBES
    rtol: Optional[float] = None  # add probes until ED's relative standard error is below this (up to a cap)
    maps: bool = False  # also store curl maps
    save_points: bool = False  # store the point of every measurement (array `point`)
    locality: bool = False  # SPEC 12 locality profiles loc_jac, loc_ed per radius, and r90
    locality_radius: Optional[int] = None  # R: radii 0..R (default half the image size)
    locality_method: str = "auto"  # auto (exact when the Jacobian fits in memory) | exact | probe
    locality_pixels: int = 64  # output pixels drawn by the probe estimator
    align: Optional[str] = None  # SPEC 12 alignment of every model's Jacobian with this model's (same points)
    tf32: bool = False  # CUDA: let matrix products and convolutions round to TF32 (faster; asym moves ~1e-2)
    # where it runs and where it is kept (no number depends on these)
    device: str = "auto"
    batch: int = 1  # realizations computed together (halved on out of memory)
    run: Optional[str] = None  # name under the cache (default derived from the settings)
    run_dir: Optional[str] = None  # directory or fsspec URL (wins over run)
    overwrite: bool = False  # discard an existing run with other settings
    retry_failed: bool = False  # recompute finished cells that hold NaN (e.g. out of memory on another device)
    shard: Optional[tuple] = None  # (i, K): only realizations r with r % K == i (job arrays)

    def __post_init__(self):  # --models LABEL=SOURCE: the label names the model, its source is kept here
        self.models, found = split_models(list(self.models), _model_names())
        self.sources = {**self.sources, **found}

    def validate(self) -> "ComputeConfig":
        """Refuse bad settings before anything is loaded or written (EdtoolError naming the option)."""

        known = _model_names()
        if self.dataset not in DATASETS:
            raise EdtoolError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if not self.models:
            raise EdtoolError("no models given; e.g. --models unet,resnet,els")
        for m in self.models:
            if m not in known and m not in self.sources:
                raise EdtoolError(f"unknown model {m!r}; choose from {', '.join(known)}, or LABEL=SOURCE (a "
                                  "diffusers folder, hf:ORG/NAME, py:module:attr, a checkpoint)")
        if len(set(self.models)) != len(self.models):
            raise EdtoolError(f"a model is listed twice in --models {','.join(self.models)}")
        check_range("nsteps", self.nsteps)
        seed_range(self.seed, self.realizations, "realizations")
        if self.realizations > MAX_REALIZATIONS:  # before anything is sized by it
            raise EdtoolError(f"--realizations {self.realizations} is more than one run holds (at most "
                              f"{MAX_REALIZATIONS}: one chunk file per realization and array); split the work over "
                              "runs with different --seed")
        check_range("batch", self.batch)
        if self.estimator not in ESTIMATORS:
            raise EdtoolError(f"unknown --estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.estimator == "analytic" and any(m not in MACHINE_NAMES for m in self.models):
            raise EdtoolError("--estimator analytic applies to the ELS machines only; use auto (closed form for "
                              "machines, Hutchinson or exact for networks)")
        check_range("probes", self.probes, " (the standard error needs a spread)")
        if self.rtol is not None and not 0 < self.rtol < 1:
            raise EdtoolError(f"--rtol must be between 0 and 1, got {self.rtol}")
        if self.trajectory not in ("own", "shared"):
            raise EdtoolError(f"--trajectory must be own or shared, got {self.trajectory!r}")
        if self.reference is not None and self.reference not in self.models:
            raise EdtoolError(f"--reference {self.reference!r} is not among --models")
        if self.points not in POINT_SOURCES:
            raise EdtoolError(f"--points must be one of {', '.join(POINT_SOURCES)}, got {self.points!r}")
        if self.points == "noised-data" and self.trajectory == "shared":
            raise EdtoolError("--points noised-data measures every model at the same noised held-out images "
                              "already; drop --trajectory shared")
        if self.held_out is not None and self.points != "noised-data":
            raise EdtoolError("--held-out chooses the images of --points noised-data; add --points noised-data")
        if self.held_out is not None and self.held_out not in DATASETS:
            raise EdtoolError(f"unknown --held-out {self.held_out!r}; choose one of {', '.join(DATASETS)}")
        if self.overwrite and self.shard is not None:
            raise EdtoolError("--overwrite with --shard would delete what the other shards computed: delete the "
                              "run directory once before starting the shards, and run them without --overwrite")
        check_patch_size(self.patch_size, "--patch-size")
        check_range("max_samples", self.max_samples)
        self._validate_scheduler()
        self._validate_locality_alignment()
        return self

    def _validate_scheduler(self) -> None:
        """--scheduler serves a diffusers model folder among the LABEL=SOURCE entries; never ignored."""
        if self.scheduler is None:
            return
        from pathlib import Path

        diffusers = [s for s in self.sources.values() if s.startswith("hf:") or
                     (not s.startswith("py:") and Path(s).is_dir())]
        if not diffusers:
            raise EdtoolError(f"--scheduler {self.scheduler} gives the noise levels of a diffusers model folder in "
                              "--models LABEL=FOLDER (or hf:ORG/NAME), and there is none; drop --scheduler")
        if not Path(self.scheduler).exists():
            raise EdtoolError(f"--scheduler {self.scheduler}: no such file or folder (a folder holding "
                              "scheduler_config.json, or the file)")

    def _validate_locality_alignment(self) -> None:
        """--locality and --align settings (SPEC 12)."""
        if self.locality_method not in LOCALITY_METHODS:
            raise EdtoolError(f"unknown --locality-method {self.locality_method!r}; choose one of "
                              f"{', '.join(LOCALITY_METHODS)}")
        check_range("locality_radius", self.locality_radius)
        check_range("locality_pixels", self.locality_pixels, " (an error bar needs a spread)")
        if self.align is not None:
            if self.align not in self.models:
                raise EdtoolError(f"--align {self.align!r} is not among --models {','.join(self.models)}; add it")
            if self.trajectory != "shared" and self.points == "trajectory":
                raise EdtoolError("--align compares Jacobians at the same points: it needs --trajectory shared "
                                  "(or --points noised-data)")


@dataclass
class MachineDataConfig:
    """What `edtool calibrate` and `edtool sample` share: the network the machines are compared with and the
    training images the machines are built from."""

    checkpoint: Optional[str] = None  # the network (ours, or a paper backbone_*.pt imported on the fly)
    dataset: Optional[str] = None  # training data of the machines (default: the checkpoint's)
    data_root: Optional[str] = None
    max_samples: Optional[int] = None  # the machines get the first N training images (per class if conditional)
    label: Optional[int] = None  # class of a conditional network (default: drawn per seed)
    nsteps: int = NSTEPS
    seed: int = 0  # the first seed; the others follow
    seeds: int = 4  # trajectories: calibrate scores them together, sample compares each
    batch: Optional[int] = None  # bounds the points one machine call takes (default: all)
    device: str = "auto"

    def validate(self) -> "MachineDataConfig":
        """Refuse bad numbers before the network or the data is loaded."""
        if self.checkpoint is None:
            raise EdtoolError("--checkpoint is required (the network the machines are compared with)")
        check_range("nsteps", self.nsteps)
        check_range("max_samples", self.max_samples)
        check_range("batch", self.batch)
        seed_range(self.seed, self.seeds)
        return self


@dataclass
class CalibrateConfig(MachineDataConfig):
    """Every setting of `edtool calibrate`: which patch size per step makes an ELS machine closest to a network."""

    machine: str = "els-borders"  # els-borders, els (follows the padding), els-circular or ls
    # candidate odd patch sizes (edtool.els.calibrate.DEFAULT_SIZES, written out so the help needs no torch)
    sizes: List[int] = field(default_factory=lambda: [3, 5, 7, 9, 11, 13, 15])
    metric: str = "cosine"  # cosine or l2 (relative distance)

    def validate(self) -> "CalibrateConfig":
        super().validate()
        if self.metric not in METRICS:
            raise EdtoolError(f"unknown --metric {self.metric!r}; choose {' or '.join(METRICS)}")
        check_sizes(self.sizes)
        return self


@dataclass
class SampleConfig(MachineDataConfig):
    """Every setting of `edtool sample`: ELS/LS/IS machines and the network from the same seeds, and how far
    each machine's samples are from the network's."""

    machine: List[str] = field(default_factory=lambda: ["els-borders"])
    seeds: int = 20  # each a trajectory of every machine and the network from the same initial noise
    scales: Optional[str] = None  # schedule file (default: the calibration JSON beside the checkpoint)
    patch_size: int = PATCH_SIZE  # fixed ELS patch size when no scales are found
    layout: str = "edtool"  # per-seed files: edtool (seed_<s>.npy) or paper (0000.pt ...: plain tensors)
    baseline: bool = True  # also sample the ideal score machine (is), the paper's comparison
    overwrite: bool = False  # replace samples of other settings in the output folder

    def validate(self) -> "SampleConfig":

        super().validate()
        if not self.machine:
            raise EdtoolError("--machine needs at least one machine, e.g. els-borders")
        check_patch_size(self.patch_size, "--patch-size")
        if self.layout not in LAYOUTS:
            raise EdtoolError(f"unknown --layout {self.layout!r}; choose {' or '.join(LAYOUTS)}")
        return self
