"""Score models from elsewhere (SPEC 14): `--models LABEL=SOURCE`, where SOURCE is a diffusers folder,
`hf:ORG/NAME`, `py:package.module:attr` or an edtool/paper checkpoint path. Each becomes an object with
`.eps(t, x, label)` and `.score(t, x, label)` at edtool's t, like `models.Network`, so it goes
wherever a network goes.

A discrete VP model (diffusers `UNet2DModel` + a scheduler with `alphas_cumprod`) is evaluated at the
fractional timestep whose noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) matches edtool's
sigma(t), linear in log sigma between neighbouring steps (k-diffusion's DiscreteSchedule.sigma_to_t):

    model, entry = load_source("ddpm=path/to/pipeline".split("=", 1)[1], device="cpu")
    s = model.score(t, x)           # t: (B,) on edtool's grid, x: (B, C, H, W) as edtool holds it
"""

import hashlib
import importlib
import inspect
import json
import math
import numbers
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from edtool.config import split_models  # noqa: F401 (importable from here too)
from edtool.diffusion import TimeGrid, alpha_bar, as_grid, beta, eps_to_score, score_to_eps
from edtool.errors import EdtoolError
from edtool.memory import is_out_of_memory

INSTALL_LINE = 'pip install "edtool[diffusers]"'
PARAMETERISATIONS = ("epsilon", "v_prediction", "sample")
LATENT_PARTS = ("vae", "vqvae")  # a pipeline with one of these works in a latent space
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "image_encoder")
MAX_IMAGE_ENTRIES = 2**24  # C x H x W of the images a model may ask for (3 x 2048 x 2048 is 12.6 million)
HUB_FILES = ["model_index.json", "config.json", "scheduler_config.json", "*.safetensors", "*.bin",
             "unet/*", "scheduler/*"]


# ------------------------------------------------------------------ the time mapping (SPEC 14)


def vp_log_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """log sigma_i = log sqrt((1 - alpha_bar_i) / alpha_bar_i), float64, finite entries only (a
    zero-terminal-SNR schedule's last step has no finite level)."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    log_sigmas = 0.5 * (torch.log1p(-ac) - torch.log(ac))
    log_sigmas = log_sigmas[torch.isfinite(log_sigmas)]
    if len(log_sigmas) < 2 or not bool((log_sigmas[1:] > log_sigmas[:-1]).all()):
        raise EdtoolError("the scheduler's alphas_cumprod do not decrease step by step: not a discrete VP schedule "
                          "edtool can map its time onto (wrap the model with a py: entry point)")
    return log_sigmas


def edtool_log_sigma(t: Tensor) -> Tensor:
    """log sigma(t) = log sqrt(beta(t) / alpha_bar(t)) of edtool's schedule (SPEC 2), float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return 0.5 * (torch.log(beta(t)) - torch.log(alpha_bar(t)))


def fractional_timestep(log_sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """i* with sigma_i <= sigma < sigma_{i+1}: i + (log sigma - log sigma_i) / (log sigma_{i+1} - log sigma_i),
    clamped to [0, T-1] outside the model's range (k-diffusion's DiscreteSchedule.sigma_to_t)."""
    log_sigmas = log_sigmas.to(log_sigma.device)
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return low.to(log_sigma.dtype) + w


def clamped_steps(log_sigmas: Tensor, grid: TimeGrid) -> List[int]:
    """The steps j of the run's grid (an int N: TimeGrid(N)) whose noise level lies outside the model's
    [sigma_0, sigma_{T-1}]."""
    ls = edtool_log_sigma(as_grid(grid).step_times)
    out = (ls < log_sigmas[0]) | (ls > log_sigmas[-1])
    return out.nonzero().flatten().tolist()


def output_to_eps(o: Tensor, x: Tensor, a: Tensor, b: Tensor, prediction: str) -> Tensor:
    """A network output o as edtool's noise prediction eps_hat (SPEC 14), a = sqrt(alpha_bar), b = sqrt(beta)."""
    if prediction == "epsilon":
        return o
    if prediction == "v_prediction":
        return a * o + b * x
    if prediction == "sample":
        return (x - a * o) / b
    raise ValueError(f"unknown prediction type {prediction!r}")


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


# ------------------------------------------------------------------ the models


class DiscreteVPModel:
    """A diffusers UNet2DModel trained on a discrete VP schedule, seen at edtool's t: `.eps` and `.score`."""

    def __init__(self, unet, alphas_cumprod: Tensor, prediction: str, manifest: dict):
        self.unet = unet.eval()
        self.log_sigmas = vp_log_sigmas(alphas_cumprod)
        self.prediction = prediction
        self.manifest = manifest
        self.conditional = manifest.get("num_classes") is not None

    @property
    def name(self) -> str:
        return self.manifest["arch"]

    def to(self, device=None, dtype=None) -> "DiscreteVPModel":
        self.unet.to(device=device, dtype=dtype)
        return self

    def timestep(self, t: Tensor) -> Tensor:
        """The fractional timestep i* (float64) of the model at edtool's t."""
        return fractional_timestep(edtool_log_sigma(t), self.log_sigmas)

    def eps(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        o = self.unet(x, self.timestep(t).to(x.dtype), class_labels=label if self.conditional else None).sample
        a, b = _per_sample(alpha_bar(t).sqrt(), x), _per_sample(beta(t).sqrt(), x)
        return output_to_eps(o, x, a, b, self.prediction)

    def score(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        return eps_to_score(self.eps(t, x, label), t)


class ModelError(RuntimeError):
    """A `py:` model's own code failed at a point, or returned something other than a floating tensor of
    x's shape. A RuntimeError like any numeric failure: compute stores that cell as NaN with a warning that
    names the source and the exception, and goes on with the other cells."""


class EntryPointModel:
    """A `py:` object with `score(t, x, label=None)` at edtool's t (optionally `eps`, `image_shape`,
    `num_classes`, `to`), given the interface the pipeline uses. Its calls are checked (ModelError)."""

    def __init__(self, obj, manifest: dict, source: str, has_eps: bool = False):
        self.obj = obj
        self.manifest = manifest
        self.source = source
        self.has_eps = has_eps
        self.conditional = manifest.get("num_classes") is not None

    @property
    def name(self) -> str:
        return self.manifest["arch"]

    def to(self, device=None, dtype=None) -> "EntryPointModel":
        with users_code(self.source, "to()"):
            if callable(getattr(self.obj, "to", None)):
                moved = self.obj.to(device=device, dtype=dtype)
                self.obj = moved if moved is not None else self.obj
        return self

    def score(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        return self._call("score", t, x, label)

    def eps(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        if self.has_eps:
            return self._call("eps", t, x, label)
        return score_to_eps(self._call("score", t, x, label), t)

    def _call(self, method: str, t: Tensor, x: Tensor, label: Optional[Tensor]) -> Tensor:
        """obj.<method>(t, x, label), or ModelError when it raises (SystemExit included) or returns anything
        but a floating tensor of x's shape."""
        try:
            out = getattr(self.obj, method)(t, x, label)
        except (Exception, SystemExit) as e:
            raise ModelError(f"{self.source}: its {method}() raised {describe_exception(e)}") from None
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.shape != x.shape:
            got = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else \
                f"a {type(out).__name__}"
            raise ModelError(f"{self.source}: its {method}() must return a floating tensor of x's shape "
                             f"{tuple(x.shape)}, got {got}")
        return out


# ------------------------------------------------------------------ loading


def describe_exception(e: BaseException) -> str:
    """`Type: first words of its message` in one line."""
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def users_code(source: str, what: str):
    """Run a py: source's own code: whatever it raises (SystemExit included) is its failure, one line naming
    the source and the exception, never edtool's internal error. An EdtoolError, Ctrl-C and out of memory
    (the machine's limit, which compute reports in its own line) pass through."""
    try:
        yield
    except EdtoolError:
        raise
    except (Exception, SystemExit) as e:
        if isinstance(e, Exception) and is_out_of_memory(e):
            raise  # the machine's limit, not the code's fault: compute says so in its own line
        raise EdtoolError(f"{source}: {what} raised {describe_exception(e)} (an error in that code, not in "
                          "edtool)") from None


def files_hash(root: Path, files: List[Path]) -> str:
    """sha256 over the files' paths relative to root and their contents: what a resume must match."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _require_diffusers(source: str):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise EdtoolError(f"{source} is a diffusers model and diffusers is not installed: {INSTALL_LINE}") from None
    return diffusers


def _read_json(path: Path) -> dict:
    """A diffusers config file: a JSON object, else EdtoolError."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdtoolError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise EdtoolError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; is it a diffusers "
                          "config file?")
    return config


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_image_size(shape: tuple, where: str) -> None:
    """Refuse images larger than MAX_IMAGE_ENTRIES (the store and the noise are sized by them)."""
    if math.prod(shape) > MAX_IMAGE_ENTRIES:
        raise EdtoolError(f"{where}: images of shape {list(shape)} have more than {MAX_IMAGE_ENTRIES:,} entries, "
                          "more than edtool measures")


def _check_unet_numbers(config: dict, path: Path) -> None:
    """sample_size (an int or [H, W]), in_channels and num_class_embeds (None or the number of classes) as
    edtool uses them: positive whole numbers, else EdtoolError naming the key."""
    size = config.get("sample_size")
    if size is not None and not (_positive_int(size) or (isinstance(size, (list, tuple)) and len(size) == 2
                                                         and all(map(_positive_int, size)))):
        raise EdtoolError(f"{path}: sample_size {size!r} is not an image size (a positive int, or [height, width])")
    for key, optional in (("in_channels", False), ("num_class_embeds", True)):
        value = config.get(key, 3 if key == "in_channels" else None)
        if not (_positive_int(value) or (optional and value is None)):
            need = "the number of classes, or null (unconditional)" if optional else "a positive int"
            raise EdtoolError(f"{path}: {key} {value!r} is not {need}")
    if size is not None:
        _check_image_size((config.get("in_channels", 3), *((size, size) if _positive_int(size) else size)), str(path))


def diffusers_parts(folder: Path, scheduler: Optional[Path], source: str) -> Tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a pipeline folder or a UNet2DModel folder + --scheduler;
    refuses latent and text-conditioned pipelines in one line."""
    index = folder / "model_index.json"
    if index.is_file():
        _refuse_pipeline_parts(folder, source)
        unet = folder / "unet" if (folder / "unet").is_dir() else folder
        _unet_config(unet, source)
        sched = folder / "scheduler" / "scheduler_config.json"
        sched = sched if sched.is_file() else folder / "scheduler_config.json"
        if scheduler is not None:
            sched = _scheduler_file(scheduler)
        if not sched.is_file():
            raise EdtoolError(f"{source}: no scheduler/scheduler_config.json in the pipeline folder; pass --scheduler")
        return unet, sched
    if (folder / "config.json").is_file():
        _unet_config(folder, source)
        if scheduler is None:
            raise EdtoolError(f"{source} is a model folder without a scheduler: pass --scheduler FOLDER (holding "
                              "scheduler_config.json) so edtool knows the model's noise levels")
        return folder, _scheduler_file(scheduler)
    raise EdtoolError(f"{source} is neither a diffusers pipeline folder (model_index.json) nor a model folder "
                      "(config.json)")


def _unet_config(unet_dir: Path, source: str) -> dict:
    """The UNet's config.json, refusing models other than a discretely timed UNet2DModel in one line."""
    if not (unet_dir / "config.json").is_file():
        raise EdtoolError(f"{source}: no config.json in {unet_dir}; is it a diffusers UNet2DModel folder?")
    config = _read_json(unet_dir / "config.json")
    _check_unet_numbers(config, unet_dir / "config.json")
    kind = config.get("_class_name")
    if kind != "UNet2DModel":
        why = ("needs cross-attention conditioning (encoder_hidden_states)" if "Condition" in str(kind) or
               config.get("cross_attention_dim") else "is not a UNet2DModel")
        raise EdtoolError(f"{source}: its model {kind} {why}; edtool loads diffusers UNet2DModel image models "
                          "(other models come in through py:package.module:attr)")
    if config.get("time_embedding_type", "positional") != "positional":
        raise EdtoolError(f"{source}: time_embedding_type {config['time_embedding_type']!r} is not a discrete VP "
                          "timestep; wrap the model with py:package.module:attr")
    return config


def _scheduler_file(path: Path) -> Path:
    path = Path(path)
    file = path / "scheduler_config.json" if path.is_dir() else path
    if not file.is_file():
        raise EdtoolError(f"--scheduler {path}: no scheduler_config.json there")
    return file


def load_diffusers(folder: Path, scheduler: Optional[Path], source: str, device="cpu",
                   image_shape: Optional[Callable] = None) -> tuple:
    """A DiscreteVPModel from a diffusers folder, and the config entry (source, weights hash, schedule). A
    config without sample_size measures images of `image_shape()`'s size (the data set's)."""
    unet_dir, sched_file = diffusers_parts(Path(folder), scheduler, source)  # refusals before the slow import
    config = _unet_config(unet_dir, source)
    sched_config = _read_json(sched_file)
    prediction = sched_config.get("prediction_type", "epsilon")
    if prediction not in PARAMETERISATIONS:
        raise EdtoolError(f"{source}: prediction_type {prediction!r} unknown; edtool converts "
                          f"{', '.join(PARAMETERISATIONS)}")
    diffusers = _require_diffusers(source)
    diffusers.utils.logging.set_verbosity_error()  # its advice on dtypes and loading is not for edtool's users
    scheduler_class = getattr(diffusers, str(sched_config.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise EdtoolError(f"{sched_file}: scheduler {sched_config.get('_class_name')!r} is not a diffusers scheduler")
    try:
        schedule = scheduler_class.from_config(sched_config)
    except Exception as e:  # settings the scheduler cannot take (an unknown beta_schedule, ...)
        raise EdtoolError(f"{sched_file}: diffusers cannot build its {scheduler_class.__name__} "
                          f"({describe_exception(e)})") from None
    if getattr(schedule, "alphas_cumprod", None) is None:
        raise EdtoolError(f"{source}: scheduler {type(schedule).__name__} has no alphas_cumprod (not a discrete VP "
                          "schedule); wrap the model with py:package.module:attr")
    # a folder with .bin weights only is read as such (weights_only: never unpickling code), without diffusers'
    # logged "error" about the .safetensors it looked for first
    safetensors = any(unet_dir.glob("*.safetensors"))
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False,
                                                     use_safetensors=safetensors)
    except Exception as e:  # missing or corrupt weights, config mismatch
        raise EdtoolError(f"{source}: the UNet could not be loaded ({describe_exception(e)})") from None
    differentiable(unet)
    size = config.get("sample_size")
    if size is None and image_shape is None:
        raise EdtoolError(f"{source}: its config.json gives no sample_size; add it (the image side in pixels)")
    h, w = image_shape()[1:] if size is None else (size, size) if isinstance(size, int) else size
    n_classes = config.get("num_class_embeds")
    manifest = {"arch": "diffusers UNet2DModel", "image_shape": [int(config.get("in_channels", 3)), h, w],
                "padding": "zeros", "num_classes": n_classes, "prediction_type": prediction}
    weights = [p for p in unet_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")]
    try:
        model = DiscreteVPModel(unet, schedule.alphas_cumprod, prediction, manifest).to(device)
    except EdtoolError as e:  # a schedule edtool cannot map its time onto: say whose
        raise EdtoolError(f"{source}: {e}") from None
    entry = {"source": source, "sha256": files_hash(unet_dir, weights),
             "scheduler": {"class": type(schedule).__name__, "sha256": files_hash(sched_file.parent, [sched_file]),
                           "prediction_type": prediction, "num_train_timesteps": len(schedule.alphas_cumprod)}}
    return model, entry


def differentiable(unet) -> None:
    """Make a diffusers UNet differentiable by torch.func in both modes: attention by the plain matmul
    processor (PyTorch has no forward-mode rule for fused scaled_dot_product_attention), and GroupNorm
    fed contiguous input (its batched forward-mode rule refuses strided views). The function is unchanged."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
        elif isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))


def hub_folder(repo: str, source: str) -> Path:
    """The local snapshot of a hub repository (model_index, unet, scheduler only), downloaded and cached
    by huggingface_hub when the network allows."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EdtoolError(f"{source} is a hub model and huggingface_hub is not installed: {INSTALL_LINE}") from None

    try:
        index = Path(snapshot_download(repo, allow_patterns=["model_index.json"]))
        if (index / "model_index.json").is_file():  # refuse latent or text pipelines before the big download
            _refuse_pipeline_parts(index, source)
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except EdtoolError:
        raise
    except Exception as e:  # offline, unknown repository, gated, ...
        reason = " ".join(str(e).split())[:120]
        raise EdtoolError(f"{source}: cannot get {repo} from the Hugging Face hub and it is not in the local cache "
                          f"({type(e).__name__}: {reason}); download it where the network allows (same HF_HOME), "
                          "or pass its folder") from None


def _refuse_pipeline_parts(folder: Path, source: str) -> None:
    """Refuse latent pipelines (a VAE listed or in the folder) and text-conditioned ones, in one line."""
    parts = _read_json(folder / "model_index.json")
    latent = [p for p in LATENT_PARTS if p in parts or (folder / p).is_dir()]
    if latent:
        raise EdtoolError(f"{source} is a latent pipeline ({latent[0]}): its score lives in the latent space, not in "
                          "image space; wrap it with py:package.module:attr at your own risk")
    text = [p for p in TEXT_PARTS if p in parts]
    if text:
        raise EdtoolError(f"{source} needs text conditioning ({text[0]}): edtool measures unconditional and "
                          "class-conditional image models")


def load_entry_point(source: str, image_shape: Optional[Callable] = None, device="cpu") -> tuple:
    """py:package.module:attr -> an EntryPointModel and its config entry (source, hash of the module file
    and of any `weights_files` the object lists)."""
    target = source[len("py:"):]
    module_name, _, attr = target.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise EdtoolError(f"{source}: write py:package.module:attr with the module's full name (attr: the object "
                          "with score(t, x, label=None))")
    with users_code(source, f"importing {module_name}"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):  # not found itself
                raise EdtoolError(f"{source}: cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
            raise  # a module it imports is missing: its own failure
    with users_code(source, f"making the model {attr}"):
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise EdtoolError(f"{source}: {module_name} has no attribute {attr}")
        if inspect.isclass(obj) or (not callable(getattr(obj, "score", None)) and callable(obj)):
            obj = obj()  # a class or factory: the model is what it returns
        if not callable(getattr(obj, "score", None)):
            raise EdtoolError(f"{source}: {attr} has no score(t, x, label=None) method (nor returns an object with "
                              "one)")
        found = {key: getattr(obj, key, None) for key in ("image_shape", "num_classes", "padding", "weights_files")}
        has_eps = callable(getattr(obj, "eps", None))
    shape = _entry_image_shape(found["image_shape"], source)
    manifest = {"arch": f"py:{type(obj).__name__}", "image_shape": shape or (image_shape() if image_shape else None),
                "padding": _entry_padding(found["padding"], source),
                "num_classes": _entry_num_classes(found["num_classes"], source)}
    module_file = inspect.getsourcefile(module) or getattr(module, "__file__", None)
    if module_file is None:
        raise EdtoolError(f"{source}: {module_name} has no source file whose hash the run could record; put the "
                          "model in a module file")
    files = [Path(module_file)] + _entry_weights_files(found["weights_files"], source)
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    entry = {"source": source, "sha256": files_hash(root, [p.resolve() for p in files])}
    return EntryPointModel(obj, manifest, source, has_eps).to(device), entry


def _entry_image_shape(shape, source: str) -> Optional[list]:
    """A py: model's image_shape: None, or (C, H, W) of positive ints."""
    if shape is None:
        return None
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3 \
            or not all(_positive_int(v) for v in shape):
        raise EdtoolError(f"{source}: image_shape {shape!r} is not (channels, height, width) of positive ints")
    _check_image_size(shape, source)
    return [int(v) for v in shape]


def _entry_num_classes(n, source: str) -> Optional[int]:
    """A py: model's num_classes: None (unconditional) or the number of classes, a positive int."""
    if n is not None and not _positive_int(n):
        raise EdtoolError(f"{source}: num_classes {n!r} is not the number of classes (a positive int) or None "
                          "(unconditional)")
    return n


def _entry_padding(padding, source: str) -> str:
    """A py: model's padding (how --locality measures distance): zeros (default) or circular."""
    padding = "zeros" if padding is None else padding
    if padding not in ("zeros", "circular"):
        raise EdtoolError(f"{source}: padding {padding!r} is neither 'zeros' nor 'circular'")
    return padding


def _entry_weights_files(files, source: str) -> List[Path]:
    """A py: model's weights_files: a list of existing files (hashed into the run config)."""
    if files is None:
        return []
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, (list, tuple)):
        raise EdtoolError(f"{source}: weights_files must be a list of file paths, got {files!r}")
    paths = [Path(p) for p in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EdtoolError(f"{source}: weights_files names {missing[0]}, which is no file"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


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
    log_sigmas = getattr(model, "log_sigmas", None)
    if log_sigmas is None:
        return None
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
        if getattr(model, "log_sigmas", None) is not None:
            steps = clamped_steps(model.log_sigmas, grid)
            if steps:
                entry["clamped_steps"] = steps
                notes.append(clamp_note(label, model, grid))
        models[label], config_models[label] = model, entry
