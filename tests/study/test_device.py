"""The device a process computes on and the CUDA settings it measures under (edtool.device), decided
here on CPU: which GPU each torchrun/srun rank picks, the flags set for a CUDA device (applied for the
run and restored after), and what a run records about the process that made it. What only a GPU can show
(the flags' effect on the numbers) is tests/benchmarks/bench_gpu.py's."""

import os

import pytest
import torch

from edtool.errors import EdtoolError
from edtool.store.run import open_run
from edtool.study import compute as pipeline
from edtool.device import CUBLAS_WORKSPACE_CONFIG, cuda_index, cuda_numerics, cuda_settings, resolve_device
from helpers import assert_same_arrays, cli, config

pytestmark = pytest.mark.usefixtures("tiny_networks")


@pytest.mark.parametrize("env, count, index", [
    ({}, 4, 0),                                       # one process
    ({"LOCAL_RANK": "1"}, 2, 1),                      # torchrun, a GPU per rank
    ({"SLURM_LOCALID": "3"}, 4, 3),                   # srun, all the node's GPUs visible to each task
    ({"SLURM_LOCALID": "3"}, 1, 0),                   # srun --gpus-per-task 1: each task sees its own as cuda:0
    ({"LOCAL_RANK": "2", "SLURM_LOCALID": "0"}, 4, 2),  # torchrun inside one srun task per node: torchrun's
    ({"LOCAL_RANK": "5"}, 4, 1),                      # more ranks than GPUs: they share, in turn
])
def test_each_rank_picks_its_gpu(env, count, index):
    assert cuda_index(env, count) == index


@pytest.mark.parametrize("value", ["x", "-1", ""])
def test_a_broken_local_rank_is_one_line(value):
    with pytest.raises(EdtoolError, match=f"LOCAL_RANK={value!r} is not a local rank.*torchrun"):
        cuda_index({"LOCAL_RANK": value}, 2)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch believes in two CUDA devices (the conftest hides real ones)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auto_and_cuda_put_the_second_rank_on_the_second_gpu(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    two_gpus.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # named by the user: taken as given
    two_gpus.delenv("LOCAL_RANK")
    two_gpus.setenv("SLURM_LOCALID", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_cuda_settings_turn_tf32_off_and_kernels_deterministic(monkeypatch):
    assert cuda_settings(torch.device("cpu")) == {} == cuda_settings(torch.device("cpu"), tf32=True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    off = cuda_settings(torch.device("cuda", 1))
    assert off == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False, "cudnn_deterministic": True,
                   "cudnn_benchmark": False, "deterministic_algorithms": True, "deterministic_warn_only": True,
                   "cublas_workspace_config": CUBLAS_WORKSPACE_CONFIG}
    on = cuda_settings(torch.device("cuda", 1), tf32=True)
    assert on == {**off, "matmul_allow_tf32": True, "cudnn_allow_tf32": True}
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice, also deterministic, is kept
    assert cuda_settings(torch.device("cuda"))["cublas_workspace_config"] == ":16:8"


def _flags() -> dict:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic, "benchmark": torch.backends.cudnn.benchmark,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@pytest.fixture
def fake_cuda(monkeypatch):
    """The flags as PyTorch leaves them by default (cuDNN's TF32 on), restored after the test; the current
    CUDA device is a variable instead of a GPU."""
    # the backend flags are properties served by __getattr__ (cuBLAS) or module attributes: saved and set by
    # hand, since monkeypatch (pytest >= 9.2) would delete what it cannot see as an attribute
    flags = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", True),
             (torch.backends.cudnn, "deterministic", False), (torch.backends.cudnn, "benchmark", False)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    current = {"device": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(device=d))
    yield current
    torch.use_deterministic_algorithms(False)
    for obj, name, value in saved:
        setattr(obj, name, value)


def test_compute_on_cuda_measures_under_the_settings_and_restores_them(tmp_path, fake_cuda, monkeypatch):
    """compute() with a CUDA device: while it measures, TF32 is off and kernels are deterministic, the rank's
    GPU is current; afterwards everything is as before. (The numbers themselves come from the CPU here.)"""
    before = _flags()
    assert before["cudnn_tf32"] and not before["deterministic"]
    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device("cuda", 1))
    seen = []

    class Spy(pipeline.Reporter):
        def start(self, *a, **k):
            seen.append((_flags(), fake_cuda["device"]))

    pipeline.compute(config(tmp_path / "run", realizations=1, nsteps=1), Spy())
    assert seen == [({"matmul_tf32": False, "cudnn_tf32": False, "cudnn_deterministic": True, "benchmark": False,
                      "deterministic": True, "warn_only": True, "cublas": CUBLAS_WORKSPACE_CONFIG}, 1)]
    assert _flags() == before and fake_cuda["device"] == 0

    with cuda_numerics(torch.device("cuda", 1), tf32=True):  # asked for: on, deterministic all the same
        assert _flags()["matmul_tf32"] and _flags()["cudnn_tf32"] and _flags()["deterministic"]
    assert _flags() == before
    with pytest.raises(RuntimeError), cuda_numerics(torch.device("cuda", 1)):  # restored after an error too
        raise RuntimeError("failed inside")
    assert _flags() == before
    with cuda_numerics(torch.device("cpu")) as applied:  # CPU: nothing changes
        assert applied == {} and _flags() == before


def test_the_run_records_its_platform_and_a_resume_elsewhere_says_so(tmp_path, monkeypatch):
    pipeline.compute(config(tmp_path / "run", realizations=2, shard=(0, 2)))
    recorded = open_run(tmp_path / "run").config
    assert recorded["platform"] == {"torch": torch.__version__} and "tf32" not in recorded
    notes = []

    class Notes(pipeline.Reporter):
        def note(self, message):
            notes.append(message)

    pipeline.compute(config(tmp_path / "run", realizations=2, shard=(1, 2)), Notes())  # the same platform
    assert notes == []
    other = {"torch": "9.9", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "12.4", "tf32": False}
    monkeypatch.setattr("edtool.study.prepare.platform", lambda device, tf32: other)
    summary = pipeline.compute(config(tmp_path / "run", realizations=2, tf32=True, retry_failed=True), Notes())
    assert summary["progress"]["done"] == 4  # a resume on another platform goes on, and says so
    assert notes == ["--tf32 changes nothing on cpu: its float32 arithmetic is full precision",
                     f"this run was made with torch {torch.__version__}, this process has torch 9.9, gpu NVIDIA H100 "
                     "80GB HBM3, cuda 12.4: the cells computed now agree with the earlier ones within float32 "
                     "rounding (docs/store.md), not bit for bit"]


def test_tf32_on_the_command_line_of_a_cpu_run(tmp_path, capsys, monkeypatch):
    """--tf32 where there is no CUDA: the run goes on in full float32, says so, and records no TF32."""
    code, out, err = cli(capsys, monkeypatch, "compute", "--models", "resnet,is", "--nsteps", "2", "--realizations",
                         "1", "--probes", "2", "--device", "cpu", "--tf32", "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert "--tf32 changes nothing on cpu: its float32 arithmetic is full precision" in out + err
    assert "tf32" not in open_run(tmp_path / "run").config


@pytest.mark.gpu  # pytest --gpu on a CUDA machine: what the CPU tests above cannot show
def test_on_a_gpu_shards_are_bit_identical_and_agree_with_the_cpu(tmp_path):
    import numpy as np


    kw = dict(models=["resnet", "unet"], estimator="exact", realizations=2, nsteps=3)
    pipeline.compute(config(tmp_path / "gpu", device="cuda", **kw))
    for i in (1, 0):
        pipeline.compute(config(tmp_path / "shards", device="cuda", shard=(i, 2), **kw))
    assert_same_arrays(tmp_path / "shards", tmp_path / "gpu")  # deterministic kernels, the same batches
    run = open_run(tmp_path / "gpu")
    assert run.config["platform"]["tf32"] is False and run.config["platform"]["gpu"]
    pipeline.compute(config(tmp_path / "cpu", device="cpu", **kw))
    a, b = run.read("asym"), open_run(tmp_path / "cpu").read("asym")
    assert np.isfinite(a).all() and np.max(np.abs(a - b) / np.abs(b)) < 1e-3  # docs/store.md's tolerance
