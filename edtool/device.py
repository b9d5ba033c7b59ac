"""Where this process computes and with which float rules: the device a --device option names, its GPU when
ranks share a machine (torchrun, srun), and the CUDA settings a measurement runs under (float32 without TF32,
deterministic kernels). `edtool compute` and `edtool train` both use it.

    device = resolve_device("auto")                              # CUDA when present (this rank's GPU), else CPU
    index = cuda_index(os.environ, torch.cuda.device_count())   # LOCAL_RANK / SLURM_LOCALID -> this rank's GPU
    with cuda_numerics(torch.device("cuda", index)):            # applied for the block, restored after
        ...
"""

import os
from contextlib import contextmanager

import torch

from edtool.errors import EdtoolError

# cuBLAS needs a fixed workspace to be deterministic (PyTorch's reproducibility notes); one set by the user wins
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID")  # torchrun's first: torchrun inside srun sets both


def local_rank(env) -> int:
    """This process's place among the ranks on its machine: torchrun's LOCAL_RANK, else srun's
    SLURM_LOCALID, else 0."""
    for name in LOCAL_RANK_VARIABLES:
        if name in env:
            text = env[name]
            if not text.strip().isdigit():
                raise EdtoolError(f"{name}={text!r} is not a local rank (0, 1, ...); start the ranks with torchrun "
                                  f"or srun, or unset {name}")
            return int(text)
    return 0


def cuda_index(env, count: int) -> int:
    """The GPU this rank uses among the `count` it sees: its local rank, wrapped around the count (srun with
    one GPU per task shows each task only its own, as cuda:0; more ranks than GPUs share them)."""
    return local_rank(env) % count


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'auto' and 'cuda' put each torchrun/srun rank on its own GPU
    (cuda_index), 'cuda:N' is taken as given."""
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


def cuda_settings(device: torch.device, tf32: bool = False) -> dict:
    """The process-wide settings a measurement on `device` runs under; none on CPU (its float32 is exact
    IEEE arithmetic already). On CUDA: TF32 only when asked (PyTorch lets cuDNN convolutions use it by
    default, which moves asym by ~1e-2), cuDNN's deterministic kernels without autotuning, and torch's
    deterministic algorithms with the cuBLAS workspace they need. warn_only: an operation of a model from
    elsewhere that has no deterministic CUDA kernel warns and stays as it is, rather than failing the run
    (edtool's networks and machines use none)."""
    if device.type != "cuda":
        return {}
    return {"matmul_allow_tf32": tf32, "cudnn_allow_tf32": tf32, "cudnn_deterministic": True,
            "cudnn_benchmark": False, "deterministic_algorithms": True, "deterministic_warn_only": True,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)}


def _current(device: torch.device) -> dict:
    """The present values of what cuda_settings sets, to restore them."""
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "current_device": torch.cuda.current_device()}


def _apply(settings: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul_allow_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.backends.cudnn.deterministic = settings["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    torch.use_deterministic_algorithms(settings["deterministic_algorithms"],
                                       warn_only=settings["deterministic_warn_only"])
    if settings["cublas_workspace_config"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:  # read when cuBLAS first starts in this process, so set before the first matrix product
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = settings["cublas_workspace_config"]
    if "current_device" in settings:
        torch.cuda.set_device(settings["current_device"])


@contextmanager
def cuda_numerics(device: torch.device, tf32: bool = False):
    """Run the block under cuda_settings(device, tf32), on `device` as the current CUDA device (so that
    anything created with device="cuda" lands on this rank's GPU); the previous settings come back after.
    Yields the settings applied ({} on CPU: nothing changes)."""
    settings = cuda_settings(device, tf32)
    if not settings:
        yield settings
        return
    before = _current(device)
    _apply({**settings, "current_device": device.index if device.index is not None else before["current_device"]})
    try:
        yield settings
    finally:
        _apply(before)


def platform(device: torch.device, tf32: bool = False) -> dict:
    """What a run records about the process that made it: the torch version, and on CUDA the GPU, the CUDA
    version and whether TF32 was allowed. A resumed run or another shard compares (platform_note)."""
    out = {"torch": torch.__version__}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, tf32=tf32)
    return out


def platform_note(recorded: dict, now: dict):
    """One line when this process differs from the one that made the run in what changes the last bits
    (another GPU, CUDA, torch, or device kind), else None: its cells then agree with the earlier ones within
    float32 rounding, not bit for bit."""
    keys = ("torch", "gpu", "cuda")
    if not recorded or all(recorded.get(k) == now.get(k) for k in keys):
        return None
    def show(p):
        return ", ".join(f"{k} {p[k]}" for k in keys if p.get(k) is not None) or "?"
    return (f"this run was made with {show(recorded)}, this process has {show(now)}: the cells computed now agree "
            "with the earlier ones within float32 rounding (docs/store.md), not bit for bit")
