"""A training run's complete resumable state as safetensors + JSON, never a pickle.

A state folder holds `state.json` (settings, step, optimizer hyper-parameters, the command that
continues the run) and the tensors it names, `state_step<N>.safetensors` (weights, moving average,
AdamW moments, RNG state, per-step losses), with their sha256. The tensors are written first under
a new name (recorded in the folder's ledger of files edtool wrote), then the JSON that points at
them, then the older tensor files this state wrote are removed (and the temporary file of a save that
was killed), so a kill at any moment leaves a complete state: the old one or the new one. A file of the
user's, whatever its name, is never removed.

Everything read back is checked before it is used: every field of `state.json` (types, ranges, the
settings a command line could give), the tensors by their sha256 and against the JSON (the step and
settings are written into the tensors' header too, so an edited JSON does not silently change the
run), and every tensor's name and shape against the network and optimizer it is loaded into. One
process at a time trains in a folder (`lock`).
"""

import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as safetensors_bytes

from edtool.config import RANGES, TrainConfig
from edtool.errors import EdtoolError
from edtool.fileio import LEDGER, read_ledger, recorded_paths, sha256_file, write_json, written_by_edtool
from edtool.store.locks import access_lock

STATE_JSON = "state.json"
FORMAT = "edtool-training-state"
TENSORS_NAME = re.compile(r"state_step(\d{8})\.safetensors")
TEMPORARY_NAME = re.compile(r"\.state_step\d{8}\.\d+\.tmp\.safetensors")  # a save's, until renamed
MAX_STEPS = 10**9  # what `edtool train --steps` takes
MAX_JSON_BYTES = 16 << 20  # a state.json is a few kB (its param_groups list every parameter)
ADAMW_MOMENTS = {"step", "exp_avg", "exp_avg_sq"}
FIX = "restore it from a copy or start another --state folder"


def tensors_name(step: int) -> str:
    return f"state_step{step:08d}.safetensors"


# ------------------------------------------------------------------ one trainer per folder

_held = set()  # folders this process holds the lock of (train() inside the command takes it again)


@contextmanager
def lock(folder, doing: str = "training"):
    """Hold the exclusive lock of a state folder (made if missing) while reading and writing its state:
    a second process is refused at once with one line naming the holder. The run store's flock access
    lock, released by the kernel when its holder dies, so a killed trainer leaves no stale lock."""
    folder = Path(folder)
    _check_folder(folder)
    key = str(folder.resolve())
    if key in _held:
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:  # a probe: os.access says yes to root on a read-only file system
        tempfile.TemporaryFile(dir=folder, prefix=".edtool-probe-").close()
    except OSError as e:
        raise EdtoolError(f"cannot write the training state in {folder} ({e.strerror}); give --state a folder "
                          "you can write") from None
    with access_lock(folder, exclusive=True, doing=doing, wait=0, create=True):
        _held.add(key)
        try:
            yield folder
        finally:
            _held.discard(key)


# ------------------------------------------------------------------ writing

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
    path = folder / tensors_name(step)
    before = _previous_tensors(folder)
    if (path.exists() or path.is_symlink()) and not written_by_edtool(path):
        raise EdtoolError(f"{path} is in the way of this state's next save and edtool did not write it; move it "
                          "away and run the same command again (the state saved before is kept)")
    header = {"format": FORMAT, "step": str(step), "config": json.dumps(config, sort_keys=True)}
    data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    try:
        with recorded_paths([path]) as (tmp,):
            tmp.write_bytes(data)
        del data
        write_json(folder / STATE_JSON, {
            "format": FORMAT, "step": step, "config": config, "tensors": path.name,
            "tensors_sha256": sha256_file(path), "param_groups": opt_state["param_groups"], **info})
    except OSError as e:  # a write error names no file: say which (the old state is intact)
        e.filename = e.filename or str(path)
        raise
    _remove_older(folder, keep=path.name, before=before)
    for tmp in folder.glob(".state_step*"):  # half-written by a trainer killed in a save (we hold the lock)
        if TEMPORARY_NAME.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
    return folder / STATE_JSON


def _previous_tensors(folder: Path) -> Optional[str]:
    """The tensor file the state.json in `folder` names, if it is that state's (its sha256 matches):
    a state written before the ledger recorded its files."""
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        name = meta["tensors"]
        if TENSORS_NAME.fullmatch(name) and sha256_file(folder / name) == meta["tensors_sha256"]:
            return name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remove_older(folder: Path, keep: str, before: Optional[str]) -> None:
    """Remove the tensor files this state wrote before `keep` (the ledger records them, content
    included), and the one the previous state.json named; forget them in the ledger."""
    removed = []
    for old in folder.glob("state_step*.safetensors"):
        if old.name != keep and TENSORS_NAME.fullmatch(old.name) and (old.name == before or written_by_edtool(old)):
            old.unlink()
            removed.append(old.name)
    ledger = read_ledger(folder)
    if any(name in ledger for name in removed):
        write_json(folder / LEDGER, {k: v for k, v in ledger.items() if k not in removed})


# ------------------------------------------------------------------ reading

def read(folder) -> Optional[dict]:
    """The JSON of the state in `folder` (None when there is none), every field checked, its tensors
    checked by hash and against it."""
    folder = Path(folder)
    path = folder / STATE_JSON
    _check_folder(folder)
    if not (path.exists() or path.is_symlink()):
        orphans = sorted(p.name for p in folder.glob("state_step*.safetensors") if written_by_edtool(p))
        if orphans:  # never start afresh over a run's tensors (a save killed before its first JSON: rare)
            raise EdtoolError(f"{folder} holds {orphans[-1]}, a training state's tensors, but no {STATE_JSON} "
                              "(deleted, or a first save was killed): restore it, or move the tensors away to "
                              "start afresh")
        return None
    if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:  # a folder, a device, a pipe: never read
        raise EdtoolError(f"{path} is not a state.json edtool wrote (not a file, or larger than "
                          f"{MAX_JSON_BYTES >> 20} MB); {FIX}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise EdtoolError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); {FIX}") from None
    except ValueError as e:  # JSONDecodeError, and numbers too long to convert
        raise EdtoolError(f"{path} is not valid JSON ({e}); {FIX}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EdtoolError(f"{path} is not an edtool training state")
    _check_fields(meta, path)
    tensors = folder / meta["tensors"]
    if tensors.is_symlink() or not tensors.is_file() or sha256_file(tensors) != meta["tensors_sha256"]:
        raise EdtoolError(f"training state {tensors} is missing or damaged (its sha256 differs from {path}); {FIX}")
    _check_against_tensors(meta, tensors, path)
    return meta


def _check_folder(folder: Path) -> None:
    if folder.is_symlink() and not folder.exists():
        raise EdtoolError(f"{folder} is a link to nothing ({os.readlink(folder)}): give --state a folder")
    if folder.exists() and not folder.is_dir():
        raise EdtoolError(f"{folder} is a file, not a folder: give --state a folder (new, or holding a training "
                          "state)")


def _bad(path, what: str):
    raise EdtoolError(f"{path}: {what}; it was edited or damaged since edtool wrote it: {FIX}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_fields(meta: dict, path: Path) -> None:
    """Every field of a state.json has the type and range edtool writes (EdtoolError naming the first
    that does not): so that nothing read from it can crash training or change a number silently."""
    step = meta.get("step")
    if not _is_int(step) or not 0 <= step <= MAX_STEPS:
        _bad(path, f"'step' must be a whole number from 0 to {MAX_STEPS}, got {step!r}")
    if meta.get("tensors") != tensors_name(step):
        _bad(path, f"'tensors' must be {tensors_name(step)!r} (the file of step {step}), got {meta.get('tensors')!r}")
    sha = meta.get("tensors_sha256")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        _bad(path, f"'tensors_sha256' must be 64 hex digits, got {sha!r}")
    elapsed = meta.get("elapsed_s")
    if not _is_number(elapsed) or elapsed < 0:
        _bad(path, f"'elapsed_s' must be a number of seconds, got {elapsed!r}")
    if not isinstance(meta.get("command", ""), str):
        _bad(path, f"'command' must be text, got {meta.get('command')!r}")
    groups = meta.get("param_groups")  # written for the reader; restore rebuilds them from the settings
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and all(_is_int(i) for i in groups[0]["params"])):
        _bad(path, "'param_groups' must be a list of one optimizer group with its 'params'")
    check_config(meta.get("config"), path)


# The type of each setting in a state's config (None: may be null), as `edtool train` writes them.
_KINDS = {"arch": str, "dataset": str, "conditional": bool, "padding": str, "steps": int, "batch": int,
          "lr": float, "lr_final_factor": float, "lr_gamma": (float, None), "weight_decay": float, "seed": int,
          "fsizes": list, "emb_dim": int, "width": int, "layers": int, "lastksize": int, "ema_decay": float,
          "init_from": (str, None)}


def _of_kind(v, kind) -> bool:
    if isinstance(kind, tuple):
        return v is None or _of_kind(v, kind[0])
    if kind is bool:
        return isinstance(v, bool)
    if kind is int:
        return _is_int(v) and 0 <= v <= RANGES["seed"][1]
    if kind is float:
        return _is_number(v)
    if kind is list:
        return isinstance(v, list) and all(_is_int(w) and 0 < w <= 1 << 16 for w in v)
    return isinstance(v, kind)


def check_config(config, path) -> TrainConfig:
    """The TrainConfig a state's 'config' describes: exactly the settings `identity()` writes, each of its
    type, within the ranges `edtool train` takes (EdtoolError otherwise)."""
    if not isinstance(config, dict):
        _bad(path, f"'config' must be the run's settings, got {type(config).__name__}")
    expected = set(_KINDS) - ({"steps"} if config.get("lr_gamma") is not None else set())
    if set(config) != expected:
        odd = sorted(set(config) ^ expected)
        _bad(path, f"'config' must hold exactly the training settings; {', '.join(map(repr, odd))} "
                   f"{'is' if len(odd) == 1 else 'are'} missing or unknown")
    for name, v in config.items():
        if not _of_kind(v, _KINDS[name]):
            _bad(path, f"config {name!r} = {v!r} is not a value `edtool train` takes")
    settings = {"steps": 1, **config}
    if (settings["steps"] > MAX_STEPS or settings["batch"] > 1 << 20 or not 0 <= settings["weight_decay"] < 1
            or settings["lastksize"] % 2 == 0 or (config["init_from"] is not None
                                                  and not re.fullmatch(r"[0-9a-f]{64}", config["init_from"]))):
        _bad(path, "config 'steps', 'batch', 'weight_decay', 'lastksize' or 'init_from' is not a value "
                   "`edtool train` takes")
    try:
        return TrainConfig(**settings).validate()
    except EdtoolError as e:
        _bad(path, f"its settings are not valid ({e})")


def _check_against_tensors(meta: dict, tensors: Path, path: Path) -> None:
    """The tensor file is a safetensors file whose losses count `step` steps, and whose header (when it
    has one: states written since edtool records it) repeats the JSON's step and settings."""
    try:
        with safe_open(str(tensors), framework="pt") as f:
            header, keys = f.metadata() or {}, set(f.keys())
            losses = f.get_slice("losses").get_shape() if "losses" in keys else None
    except (SafetensorError, OSError, ValueError) as e:
        raise EdtoolError(f"training state {tensors} is not a safetensors file edtool wrote ({_first_line(e)}); "
                          f"{FIX}") from None
    if losses != [meta["step"]] or "rng" not in keys:
        _bad(path, f"'step' is {meta['step']} but {tensors.name} holds "
                   f"{'no losses' if losses is None else f'losses of shape {losses}'}")
    if "step" in header and (header.get("step") != str(meta["step"])
                             or header.get("config") != json.dumps(meta["config"], sort_keys=True)):
        _bad(path, f"its step or settings differ from those {tensors.name} was written with")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def restore(folder, meta: dict, *, net: torch.nn.Module, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> tuple:
    """Load a state read by `read` into net, opt and gen; returns (ema, losses). Every tensor is checked
    against the network and optimizer first (EdtoolError: nothing is loaded)."""
    where = Path(folder) / meta["tensors"]
    try:
        tensors = load_file(str(where))
    except SafetensorError as e:
        raise EdtoolError(f"training state {where} is not a safetensors file edtool wrote ({_first_line(e)}); "
                          f"{FIX}") from None
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = net.state_dict()
    for prefix in ("model.", "ema."):
        _check_like(part(prefix), expected, where, prefix)
    params = [p for group in opt.param_groups for p in group["params"]]
    moments = {}
    for key, v in part("optim.").items():
        i, _, name = key.partition(".")
        if not (i.isdigit() and int(i) < len(params) and name in ADAMW_MOMENTS):
            _refuse_tensors(where, f"an optimizer tensor {key!r} this network's AdamW does not have")
        shape = () if name == "step" else params[int(i)].shape
        if v.shape != shape or not v.dtype.is_floating_point:
            _refuse_tensors(where, f"optimizer tensor {key!r} of shape {list(v.shape)}, not {list(shape)}")
        moments.setdefault(int(i), {})[name] = v
    if any(set(m) != ADAMW_MOMENTS for m in moments.values()):
        _refuse_tensors(where, "an incomplete set of AdamW moments")
    if not all(bool(v.isfinite().all()) for v in tensors.values() if v.is_floating_point()):
        raise EdtoolError(f"training state {where} holds non-finite numbers (NaN or infinity); {FIX}")
    rng, losses = tensors["rng"], tensors["losses"]
    if rng.dtype != torch.uint8 or rng.shape != gen.get_state().shape or losses.dtype != torch.float64:
        _refuse_tensors(where, "a random-generator state or losses of another kind")
    net.load_state_dict(part("model."))
    opt.load_state_dict({"state": moments, "param_groups": opt.state_dict()["param_groups"]})
    gen.set_state(rng)
    return part("ema."), losses.tolist()


def _check_like(got: dict, expected: dict, where: Path, prefix: str) -> None:
    """`got` has exactly the names, shapes and dtypes of the network's state dict `expected`."""
    if set(got) != set(expected):
        odd = sorted(set(got) ^ set(expected))
        _refuse_tensors(where, f"{prefix}* tensors of another network ({len(odd)} names differ, e.g. {odd[0]!r})")
    for k, v in expected.items():
        if got[k].shape != v.shape or got[k].dtype != v.dtype:
            _refuse_tensors(where, f"{prefix}{k} of shape {list(got[k].shape)} {got[k].dtype}, the network's is "
                                   f"{list(v.shape)} {v.dtype}")


def _refuse_tensors(where: Path, what: str):
    raise EdtoolError(f"training state {where} holds {what}: it does not belong to these settings; {FIX}")
