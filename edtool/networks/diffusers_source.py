"""diffusers models as edtool score models (SPEC 14): a discrete VP model (diffusers `UNet2DModel` + a
scheduler with `alphas_cumprod`) from a folder or `hf:ORG/NAME`, evaluated at the fractional timestep
whose noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) matches edtool's sigma(t), linear in log sigma
between neighbouring steps (k-diffusion's DiscreteSchedule.sigma_to_t):

    model, entry = load_diffusers(Path("path/to/pipeline"), None, "path/to/pipeline")
    s = model.score(t, x)           # t: (B,) on edtool's grid, x: (B, C, H, W) as edtool holds it
"""

import json
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from edtool.diffusion import TimeGrid, alpha_bar, as_grid, beta, eps_to_score
from edtool.errors import EdtoolError
from edtool.model import ScoreModel
from edtool.networks.source_checks import check_image_size, describe_exception, files_hash, positive_int

INSTALL_LINE = 'pip install "edtool[diffusers]"'
PARAMETERISATIONS = ("epsilon", "v_prediction", "sample")
LATENT_PARTS = ("vae", "vqvae")  # a pipeline with one of these works in a latent space
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "image_encoder")
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
# ------------------------------------------------------------------ the model


class DiscreteVPModel(ScoreModel):
    """A diffusers UNet2DModel trained on a discrete VP schedule, as a ScoreModel at edtool's t. `log_sigmas`
    are its noise levels: edtool's levels outside them are clamped to the nearest end (`clamped_steps`)."""

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

# ------------------------------------------------------------------ loading


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

def _check_unet_numbers(config: dict, path: Path) -> None:
    """sample_size (an int or [H, W]), in_channels and num_class_embeds (None or the number of classes) as
    edtool uses them: positive whole numbers, else EdtoolError naming the key."""
    size = config.get("sample_size")
    if size is not None and not (positive_int(size) or (isinstance(size, (list, tuple)) and len(size) == 2
                                                         and all(map(positive_int, size)))):
        raise EdtoolError(f"{path}: sample_size {size!r} is not an image size (a positive int, or [height, width])")
    for key, optional in (("in_channels", False), ("num_class_embeds", True)):
        value = config.get(key, 3 if key == "in_channels" else None)
        if not (positive_int(value) or (optional and value is None)):
            need = "the number of classes, or null (unconditional)" if optional else "a positive int"
            raise EdtoolError(f"{path}: {key} {value!r} is not {need}")
    if size is not None:
        check_image_size((config.get("in_channels", 3), *((size, size) if positive_int(size) else size)), str(path))


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
