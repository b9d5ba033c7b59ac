"""edtool: the exterior derivative (non-conservativeness) of diffusion score fields.

The Python API (docs/python-api.md) in one namespace:

    import edtool

    images, labels = edtool.load_dataset("mnist5k")
    net = edtool.load(edtool.shipped_dir() / "mnist5k_resnet.safetensors")     # a network file: ours or a paper .pt
    els = edtool.make_machine("els-borders", images[:500], labels[:500], patch_size=5)
    res = edtool.exterior_derivative(els.field(0.5), x)                     # x: a batch (B, C, H, W)
    edtool.compute(edtool.ComputeConfig(models=["els"], run_dir="my-run"))    # a study, into a run store
    stats = edtool.aggregate_run("my-run")
    run = edtool.open_run("my-run")

Each name lives in the module `_HOMES` gives and is imported from there on first use, so that
`import edtool` loads no torch (the command line's --help and --version stay quick).
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module it lives in
_HOMES = {
    "EdtoolError": "edtool.errors",
    "ComputeConfig": "edtool.config",
    "TrainConfig": "edtool.config",
    "SampleConfig": "edtool.config",
    "CalibrateConfig": "edtool.config",
    "load_dataset": "edtool.data",
    "add_noise": "edtool.diffusion",
    "shipped_dir": "edtool.paths",
    "load": "edtool.networks.discovery",
    "make_machine": "edtool.els.factory",
    "exterior_derivative": "edtool.jacobian.ed",
    "compute": "edtool.study.compute",
    "aggregate_run": "edtool.study.aggregate",
    "open_run": "edtool.store.run",
}

__all__ = [  # written out (not built from _HOMES) so that linters read it; a test checks they agree
    "__version__", "EdtoolError", "ComputeConfig", "TrainConfig", "SampleConfig", "CalibrateConfig", "load_dataset",
    "add_noise", "shipped_dir", "load", "make_machine", "exterior_derivative", "compute", "aggregate_run", "open_run",
]

if TYPE_CHECKING:  # what the names are, for type checkers and editors (at run time: __getattr__)
    from edtool.config import CalibrateConfig, ComputeConfig, SampleConfig, TrainConfig
    from edtool.data import load_dataset
    from edtool.diffusion import add_noise
    from edtool.els.factory import make_machine
    from edtool.errors import EdtoolError
    from edtool.jacobian.ed import exterior_derivative
    from edtool.networks.discovery import load
    from edtool.paths import shipped_dir
    from edtool.store.run import open_run
    from edtool.study.aggregate import aggregate_run
    from edtool.study.compute import compute


def __getattr__(name: str):
    """Import a public name from its home on first use (PEP 562), then keep it here."""
    if name not in _HOMES:
        raise AttributeError(f"module 'edtool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
