"""What edtool prints fits an 80-column terminal and a pipe: every command's --help (each flag by its whole
name, no value shown for an on/off flag), `status` (runs told apart by their whole folder) and the demo's
tour (wrapped between phrases), rendered by the installed console script with COLUMNS=80 into a pipe."""

import re

import pytest
import typer

from edtool.cli import app
from edtool.config import ComputeConfig
from edtool.study.compute import compute
from helpers import edtool_in_process

WIDTH = {"COLUMNS": "80"}


def too_wide(text: str) -> list:
    return [line for line in text.splitlines() if len(line) > 80]


def flags(command) -> list:
    return [name for p in command.params for name in (*p.opts, *p.secondary_opts) if name.startswith("-")]


def commands() -> dict:
    return typer.main.get_command(app).commands


def test_the_flag_check_sees_a_cut_name():
    """The check below fails on the truncation rich's table made at 80 columns (`--unet,--unet_path,--…`)."""
    cut = "│ --unet,--unet_path,--…        <path>     UNet checkpoint"
    assert "--unet-path" not in re.findall(r"--[\w-]+", cut)
    assert flags(commands()["compute"])[:1] == ["--dataset"] and "--unet-path" in flags(commands()["compute"])


@pytest.mark.parametrize("name", [None, *commands()], ids=lambda n: n or "edtool")
def test_help_fits_and_names_every_flag_whole(name, tmp_path):
    proc = edtool_in_process(*([name] if name else []), "--help", cwd=tmp_path, env=WIDTH)
    assert proc.returncode == 0, proc.stderr
    assert not too_wide(proc.stdout), too_wide(proc.stdout)
    shown = set(re.findall(r"(?<![\w-])--?[\w-]+", proc.stdout))
    command = commands()[name] if name else typer.main.get_command(app)
    missing = [f for f in flags(command) if f not in shown]
    assert not missing, f"{name} --help does not show {missing}"
    assert "<bool>" not in proc.stdout and "…" not in proc.stdout
    if name is None:  # each command with its one-line description, none cut off with "..."
        listed = proc.stdout.split("\nCommands:\n", 1)[1].splitlines()
        assert [line.split()[0] for line in listed] == list(commands())
        assert not any(line.endswith("...") for line in listed)


def test_status_tells_runs_apart_at_80_columns(tmp_path, monkeypatch):
    """Two runs whose folders differ only at the end (the seed layout's single_realization and
    multiple_realizations) are each named whole, relative to where the user stands."""
    monkeypatch.chdir(tmp_path)
    folders = ["results/exterior_derivative/mnist5k/single_realization",
               "results/exterior_derivative/mnist5k/multiple_realizations"]
    for folder in folders:
        compute(ComputeConfig(models=["is"], nsteps=2, probes=2, device="cpu", run_dir=folder))
    proc = edtool_in_process("status", cwd=tmp_path, env={**WIDTH, "EDTOOL_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert not too_wide(proc.stdout), too_wide(proc.stdout)
    lines = proc.stdout.splitlines()
    for folder in folders:
        assert folder in lines, proc.stdout
    assert proc.stdout.count("cells done 1/1: is 1/1") == 2


def test_demo_tour_fits_and_keeps_phrases_whole(tmp_path):
    proc = edtool_in_process("demo", "--out", tmp_path / "demo", "--models", "is", "--nsteps", "2", "--device", "cpu",
                             cwd=tmp_path, env=WIDTH)
    assert proc.returncode == 0, proc.stderr
    assert not too_wide(proc.stdout), too_wide(proc.stdout)
    assert "`edtool analyze --multiple 10`" in proc.stdout and "`xarray.open_zarr`" in proc.stdout
    assert "1. Data" in proc.stdout and "5. Files" in proc.stdout
