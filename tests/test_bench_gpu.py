"""tests/benchmarks/bench_gpu.py run the way a GPU job runs it (its own entry point, in a subprocess), with
`--device cpu` standing in for the GPU and tiny networks: the order of its parts (warm-up, then the device
side, then the CPU reference), each table row out while the script still runs, rows labelled with the
realizations they measured, the time limit, and the refusal without CUDA. The CUDA numbers themselves need
a GPU machine."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env


BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_gpu.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(checkpoints: Path, *more) -> list:
    return ["--device", "cpu", "--unet", str(checkpoints / "tiny_unet.safetensors"), "--resnet",
            str(checkpoints / "tiny_resnet.safetensors"), "--probes", "2", "--nsteps", "2", "--check-steps", "2",
            "--max-samples", "20", "--check-samples", "20", "--models", "resnet,els", *more]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH), *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_without_cuda_it_refuses_in_one_line(capsys):
    assert bench().main([]) == 2  # the conftest hides any GPU: this is a machine without CUDA
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "--device cpu" in err[0]


def test_the_gpu_script_on_cpu_from_start_to_end(tiny_checkpoints):
    proc = start(*tiny_args(tiny_checkpoints, "--realizations", "3", "--batches", "1,2", "--time-limit", "600"))
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("| 1 |"):  # the first row is out while the rest is still to measure
            assert proc.poll() is None, "the row came only when the script ended"
    assert proc.wait(timeout=600) == 0, "\n".join(lines)
    out = "\n".join(lines)

    def at(prefix):
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    # warm-up, the device side of (a), the rows in order, then the CPU side of (a)
    assert at("warm-up: 1 realization") < at("(a) cpu: 2 realizations") < at("| 1 |") < at("| 2 |") \
        < at("(a) asym cpu vs cpu")
    # 3 realizations at --batch 2 are measured as 4 (two whole batches), and the row says so
    assert lines[at("| 1 |")].startswith("| 1 | 3 |") and lines[at("| 2 |")].startswith("| 2 | 4 |")
    assert "resnet hutchinson, els analytic |" in lines[at("| 1 |")]
    for model in ("resnet", "els"):  # the same device twice (networks exact, els analytic): bit-identical
        assert f"    {model:<8} max relative difference 0.00e+00  ok" in out
    assert "Traceback" not in out and "failures" not in out


def test_the_time_limit_stops_it_and_names_what_was_not_measured(tiny_checkpoints, capsys, monkeypatch):
    """In this process (main() returns the exit code its entry point passes to sys.exit): a time limit is
    the script's own clock, which a new process would show nothing more about. The script keeps the machines
    it builds by replacing els.factory.build_machine; monkeypatch puts the original back afterwards."""
    import edtool.els.factory as factory

    monkeypatch.setattr(factory, "build_machine", factory.build_machine)
    t0 = time.perf_counter()
    code = bench().main(tiny_args(tiny_checkpoints, "--realizations", "2", "--batches", "1,2", "--time-limit", "0"))
    out = capsys.readouterr().out
    assert code == 3, out
    assert ("stopped at --time-limit 0 s after" in out and "not measured: warm-up, (a) device side, (b) --batch 1, "
            "(b) --batch 2, (a) cpu side" in out), out
    assert "| 1 |" not in out and time.perf_counter() - t0 < 120


def test_a_step_after_the_deadline_ends_the_run():
    module = bench()
    clock = module.Clock(["unet"], deadline=time.perf_counter() + 60)
    clock.step(0, "unet", 0, 2, 0.1)  # before the deadline: goes on
    clock.deadline = time.perf_counter() - 1
    with pytest.raises(module.TimeUp):
        clock.step(0, "unet", 1, 2, 0.1)


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--batches", "1,x"], ["--realizations", "0"]])
def test_bad_sizes_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench().main(argv)
    assert exit_.value.code == 2 and "give positive whole numbers" in capsys.readouterr().err
