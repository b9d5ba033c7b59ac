"""Settings objects without heavy imports, so the command line takes its defaults from them."""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from edtool.errors import EdtoolError

# ------------------------------------------------------------------ defaults every command shares
# Each is defined here once; the commands' options, the settings dataclasses and the library read them.
NSTEPS = 20  # DDIM steps: the seed tool's and the paper's trajectories, and the shipped calibrations' length
PROBES = 16  # Hutchinson probes per point: a relative standard error of ED of a few per cent on MNIST networks
MIN_PROBES = 2  # the standard error of a Hutchinson estimate needs a spread, so at least two probes
PATCH_SIZE = 5  # ELS patch size when no calibrated schedule is found (the paper's median MNIST size)


def default(cls, name: str):
    """The default of one setting of a settings dataclass (default_factory included)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if callable(f.default_factory) else f.default


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
        if self.arch not in ("unet", "resnet"):
            raise EdtoolError(f"unknown --arch {self.arch!r}; choose unet or resnet")
        if self.padding not in ("zeros", "circular"):
            raise EdtoolError(f"unknown --padding {self.padding!r}; choose zeros or circular")
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
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 < self.lr_final_factor <= 1:
            raise EdtoolError(f"--lr must be a finite positive number and --lr-final-factor in (0, 1], got {self.lr} "
                              f"and {self.lr_final_factor}")
        if self.lr_gamma is not None and not 0 < self.lr_gamma <= 1:
            raise EdtoolError(f"--lr-gamma must be in (0, 1] (the paper's is 0.999965), got {self.lr_gamma}")
        if not 0 <= self.ema_decay < 1:
            raise EdtoolError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        return self


# Ranges of the numbers every command takes (Typer refuses others as a usage error, before any work)
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED: stored as int64 (a negative one would alias a large one in torch)
MAX_NSTEPS = 100_000  # DDIM steps (the paper's runs use 20 to 1000)
MAX_SEEDS = 1_000_000  # seeds of one calibrate or sample (like a run's MAX_REALIZATIONS)
