"""A training run's complete resumable state as safetensors + JSON, never a pickle.

A state folder holds `state.json` (settings, step, optimizer hyper-parameters, the command that
continues the run) and the tensors it names, `state_step<N>.safetensors` (weights, moving average,
AdamW moments, RNG state, per-step losses), with their sha256. The tensors are written first under
a new name, then the JSON that points at them, then the older tensor files are removed, so a kill
at any moment leaves a complete state: the old one or the new one.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from edtool.errors import EdtoolError
from edtool.fileio import atomic_path, sha256_file, write_json

STATE_JSON = "state.json"
FORMAT = "edtool-training-state"


def save(folder, *, config: dict, net: torch.nn.Module, ema: dict, opt: torch.optim.Optimizer,
         gen: torch.Generator, step: int, losses: list, info: dict) -> Path:
    """Write the state of a run after `step` optimizer steps; returns the JSON's path."""
    folder = Path(folder)
    opt_state = opt.state_dict()
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for i, moments in opt_state["state"].items():
        tensors.update({f"optim.{i}.{name}": v for name, v in moments.items()})
    tensors["rng"] = gen.get_state()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    name = f"state_step{step:08d}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    write_json(folder / STATE_JSON, {
        "format": FORMAT, "step": step, "config": config, "tensors": name,
        "tensors_sha256": sha256_file(folder / name), "param_groups": opt_state["param_groups"], **info})
    for old in folder.glob("state_step*.safetensors"):
        if old.name != name:
            old.unlink()
    return folder / STATE_JSON


def read(folder) -> Optional[dict]:
    """The JSON of the state in `folder` (None when there is none), its tensors checked by hash."""
    path = Path(folder) / STATE_JSON
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdtoolError(f"{path} is not valid JSON ({e}); restore it from git or start another --state folder")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EdtoolError(f"{path} is not an edtool training state")
    tensors = path.parent / str(meta.get("tensors"))
    if not tensors.is_file() or sha256_file(tensors) != meta.get("tensors_sha256"):
        raise EdtoolError(f"training state {tensors} is missing or damaged (its sha256 differs from {path}); "
                          "restore it from git or start another --state folder")
    return meta


def restore(folder, meta: dict, *, net: torch.nn.Module, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> tuple:
    """Load a state read by `read` into net, opt and gen; returns (ema, losses)."""
    tensors = load_file(str(Path(folder) / meta["tensors"]))
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    net.load_state_dict(part("model."))
    moments = {}
    for key, v in part("optim.").items():
        i, name = key.split(".", 1)
        moments.setdefault(int(i), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": moments, "param_groups": groups})
    gen.set_state(tensors["rng"])
    return part("ema."), tensors["losses"].tolist()
