"""Score models from elsewhere (SPEC 14): `--models LABEL=SOURCE`, where SOURCE is a diffusers folder,
`hf:ORG/NAME` (edtool.networks.diffusers_source), `py:package.module:attr` (edtool.networks.entry_point)
or an edtool/paper checkpoint path. Each becomes an `edtool.model.ScoreModel`, so it goes wherever a
network goes.

    model, entry = load_source("ddpm=path/to/pipeline".split("=", 1)[1], device="cpu")
"""

import math
from pathlib import Path
from typing import Callable, Optional

from edtool.diffusion import TimeGrid
from edtool.errors import EdtoolError
from edtool.networks.diffusers_source import DiscreteVPModel, clamped_steps, hub_folder, load_diffusers
from edtool.networks.entry_point import load_entry_point


def load_source(source: str, scheduler=None, dataset: Optional[str] = None, device="cpu", note=None,
                image_shape: Optional[Callable] = None) -> tuple:
    """(model, config entry) for one SOURCE of `--models LABEL=SOURCE`."""
    if source.startswith("hf:"):
        repo = source[3:]
        if repo.count("/") != 1:
            raise EdtoolError(f"{source}: write hf:ORG/NAME, e.g. hf:google/ddpm-cifar10-32")
        return load_diffusers(hub_folder(repo, source), scheduler, source, device, image_shape)
    if source.startswith("py:"):
        return load_entry_point(source, image_shape, device)
    path = Path(source)
    if path.is_dir():
        return load_diffusers(path, scheduler, source, device, image_shape)
    if path.suffix in (".safetensors", ".pt") or path.with_suffix(".safetensors").is_file():
        from edtool.networks import checkpoints, discovery

        if path.suffix == ".safetensors" and path.is_file() and not checkpoints.manifest_path(path).exists() \
                and (path.parent / "config.json").is_file():
            raise EdtoolError(f"{source} is the weights file of a diffusers model, not an edtool checkpoint: pass its "
                              f"folder ({path.parent}) as the SOURCE")

        model = discovery.load(path, dataset=dataset, device=device, note=note)
        return model, {"path": str(path), "sha256": checkpoints.file_hash(path if path.is_file()
                                                                           else path.with_suffix(".safetensors"))}
    what = "is a file edtool does not load as a model" if path.exists() else "is no file or folder here"
    raise EdtoolError(f"model source {source!r} {what}; a SOURCE is a diffusers folder, hf:ORG/NAME, "
                      "py:package.module:attr or a checkpoint (.safetensors, paper .pt)")


def clamp_note(label: str, model, grid: TimeGrid) -> Optional[str]:
    """One line when some of edtool's noise levels lie outside a discrete model's range (None otherwise)."""
    if not isinstance(model, DiscreteVPModel):  # a continuous-time model takes every t as it is
        return None
    log_sigmas = model.log_sigmas
    steps = clamped_steps(log_sigmas, grid)
    if not steps:
        return None
    lo, hi = math.exp(float(log_sigmas[0])), math.exp(float(log_sigmas[-1]))
    return (f"{label}: the noise level of step(s) {', '.join(map(str, steps))} lies outside the model's range "
            f"sigma {lo:.4g}..{hi:.4g}: evaluated at its nearest timestep (clamped; recorded in the run config)")


def load_sources(cfg, device, models: dict, config_models: dict, notes: list, grid: TimeGrid) -> None:
    """Load every LABEL=SOURCE model of a ComputeConfig into `models` and its config entry into
    `config_models` (in --models order), with a note and the clamped steps (of the run's grid) where levels
    are clamped."""
    def dataset_shape():  # a py: object without image_shape measures images of the data set's shape
        from edtool.data import load_dataset

        return list(load_dataset(cfg.dataset, root=cfg.data_root)[0].shape[1:])

    for label in cfg.models:
        if label not in cfg.sources:
            continue
        model, entry = load_source(cfg.sources[label], scheduler=cfg.scheduler, dataset=cfg.dataset, device=device,
                                   note=notes.append, image_shape=dataset_shape)
        note = clamp_note(label, model, grid)
        if note is not None:
            entry["clamped_steps"] = clamped_steps(model.log_sigmas, grid)
            notes.append(note)
        models[label], config_models[label] = model, entry
