"""The CPU-side parts of tests/benchmarks/bench_gpu.py (issue 12): without CUDA it refuses in one
line with exit 2; --dry-run runs the agreement check (two runs, same exact estimator) and the
throughput table on CPU. The CUDA numbers themselves need a GPU machine."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_gpu.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_without_cuda_it_refuses_in_one_line(capsys):
    assert bench().main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "--dry-run" in err[0]


@pytest.mark.slow  # exact Jacobians of a network on CPU: minutes on 2 cores
def test_dry_run_checks_agreement_and_prints_the_table(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert bench().main(["--dry-run", "--models", "resnet,els", "--max-samples", "20", "--probes", "2"]) == 0
    out = capsys.readouterr().out
    assert "resnet   max relative difference 0.00e+00  ok" in out  # the same device twice: bit-identical
    assert "els      max relative difference 0.00e+00  ok" in out
    assert "| --batch | realizations/s" in out and "| 1 |" in out and "| 2 |" in out
    assert "estimators: resnet hutchinson, els analytic" in out
