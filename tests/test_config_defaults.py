"""Concepts with one home each: the defaults table,
"find a schedule, fall back, add a note", "els follows the padding", and the CLI's front door."""

import inspect

import pytest

from edtool import config
from edtool.errors import EdtoolError
from helpers import REPO, SHARED, assert_one_line_error, edtool_in_process


def test_probes_1_is_a_usage_error_before_any_work(tmp_path):
    """`compute --probes 1` is exit 2, one line, no store: refused by validation, not stored as a run of NaN
    cells with a warning (the per-cell guard would turn the estimator's refusal into NaN)."""
    proc = edtool_in_process("compute", "--run-dir", tmp_path / "run", "--probes", "1", "--models", "els", cwd=tmp_path)
    assert_one_line_error(proc)
    assert "--probes" in proc.stderr and "2" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = edtool_in_process("analyze", "--probes", "1", "--output_dir", tmp_path / "a", cwd=tmp_path)
    assert_one_line_error(proc)
    assert not (tmp_path / "a").exists()


def test_library_refuses_probes_1_before_writing(tmp_path):
    from edtool.config import ComputeConfig
    from edtool.study.compute import compute

    with pytest.raises(EdtoolError, match=r"--probes must be at least 2"):
        compute(ComputeConfig(run_dir=str(tmp_path / "run"), models=["els"], probes=1))
    assert not (tmp_path / "run").exists()


def test_per_cell_guard_lets_input_errors_through(monkeypatch):
    """Only numeric failures become NaN; a late input check (ValueError) reaches the user."""
    from edtool.study import compute as study

    def late_check(*a, **k):
        raise ValueError("a late input check")

    monkeypatch.setattr(study, "measure", late_check)
    with pytest.raises(ValueError, match="late input check"):
        study._measure_safely(None, "unet", None)

    def numeric(*a, **k):
        raise FloatingPointError("overflow")

    class Prepared:
        pass

    monkeypatch.setattr(study, "measure", numeric)
    monkeypatch.setattr(study.Measurements, "nan", staticmethod(lambda n, s: "nan-cell"))

    class RealizationBatch:
        rows = [0]

    with pytest.warns(UserWarning, match="FloatingPointError: overflow -> stored as NaN"):
        cell, message = study._measure_safely(type("Job", (), {"prepared": Prepared()})(), "unet", RealizationBatch())
    assert cell == "nan-cell" and "FloatingPointError" in message


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_one_defaults_table():
    """nsteps, probes and patch_size are defined once (edtool.config); every command and library entry
    point that has them takes that value, so a change there changes them all. The values hold what the
    table says they are for: NSTEPS is the length of the shipped calibrations and of the paper's, the
    fallback PATCH_SIZE is a size calibrate chooses among, MIN_PROBES is the fewest probes that give a
    standard error (one fewer is refused)."""
    import json

    import torch
    import typer

    from edtool import cli
    from edtool.els import calibrate, factory, sampling
    from edtool.jacobian import ed, locality
    from edtool.config import ComputeConfig

    shipped = sorted((REPO / "checkpoints").glob("*_scales_*.json"))
    assert shipped and all(len(json.loads(f.read_text())["scales"]) == config.NSTEPS for f in shipped)
    paper = SHARED / "reference" / "paper_scales.json"
    if paper.exists():
        assert json.loads(paper.read_text())["nsteps"] == config.NSTEPS
    assert config.PATCH_SIZE in calibrate.DEFAULT_SIZES
    linear = torch.nn.Linear(6, 6, bias=False).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    fewest = ed.exterior_derivative(lambda v: linear(v), x, method="hutchinson", probes=config.MIN_PROBES)
    assert torch.isfinite(fewest.ed_stderr).all()
    with pytest.raises((EdtoolError, ValueError), match="probes"):
        ed.exterior_derivative(lambda v: linear(v), x, method="hutchinson", probes=config.MIN_PROBES - 1)
    assert config.MIN_PROBES <= config.PROBES

    assert ComputeConfig().nsteps == config.NSTEPS and ComputeConfig().probes == config.PROBES
    assert ComputeConfig().patch_size == config.PATCH_SIZE
    assert _default(ed.exterior_derivative, "probes") == config.PROBES
    assert _default(locality.alignment, "probes") == config.PROBES
    assert _default(calibrate.calibrate, "nsteps") == _default(sampling.sample, "nsteps") == config.NSTEPS
    assert _default(sampling.sample, "patch_size") == _default(factory.build_machine, "patch_size") == config.PATCH_SIZE
    wanted = {"nsteps": config.NSTEPS, "probes": config.PROBES, "patch_size": config.PATCH_SIZE}
    takes = {}
    for command in (cli.compute, cli.analyze, cli.sample, cli.calibrate):
        for name, value in wanted.items():
            option = _default(command, name) if name in inspect.signature(command).parameters else None
            if isinstance(option, typer.models.OptionInfo):
                assert option.default == value, (command.__name__, name)
                takes.setdefault(name, set()).add(command.__name__)
    # every one of these commands walks the DDIM steps; the two that measure ED take probes, the two that
    # run an ELS machine at one size take patch_size
    assert takes == {"nsteps": {"compute", "analyze", "sample", "calibrate"}, "probes": {"compute", "analyze"},
                     "patch_size": {"compute", "sample"}}


def test_find_fall_back_note_is_one_function(tmp_path):
    """schedule_for: no calibration -> (None, None) and the fallback line; an explicit schedule of
    another length -> the schedule and the line saying which entries each step uses."""
    from edtool.els.schedule import write_scales_json
    from edtool.networks.discovery import schedule_for

    notes = []
    assert schedule_for("els-borders", None, [tmp_path / "net.safetensors"], 20, 7, notes) == (None, None)
    assert notes == ["els-borders: no calibrated scales found, using a fixed patch size 7 (run `edtool calibrate` "
                     "or pass --scales)"]
    path = write_scales_json(tmp_path / "s.json", [3] * 20)
    notes = []
    assert schedule_for("els-borders", path, [], 10, 7, notes) == ([3] * 20, str(path))
    assert len(notes) == 1 and "20 entries for 10 steps" in notes[0] and "entries 2, 4, 6" in notes[0]
    notes = []
    assert schedule_for("is", path, [], 10, 7, notes) == (None, None) and notes == []


def test_els_follows_the_padding_in_one_place():
    from edtool.els.calibrate import machine_kind
    from edtool.els.factory import resolve_machine_name

    assert resolve_machine_name("els", "circular") == "els-circular"
    assert resolve_machine_name("els", None) == "els-borders"
    net = type("Net", (), {"manifest": {"padding": "circular"}, "name": "n"})()
    assert machine_kind("els", net) == "els-circular"
    with pytest.raises(EdtoolError, match="net.pt has padding 'reflect'.*els-borders or els-circular"):
        resolve_machine_name("els", "reflect", "net.pt")
    with pytest.raises(EdtoolError, match="unknown machine 'elss'"):
        resolve_machine_name("elss")


def test_version_and_command_order(tmp_path):
    from edtool import __version__

    proc = edtool_in_process("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edtool {__version__}"
    proc = edtool_in_process("--help", cwd=tmp_path, env={"COLUMNS": "200"})
    listed = [line.split()[0] for line in proc.stdout.split("\nCommands:\n", 1)[1].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == ["analyze", "demo", "compute", "aggregate", "plot", "status", "verify", "sample", "calibrate",
                      "train", "import-checkpoint"]
    assert "SPEC" not in proc.stdout
    for command in listed:
        assert "SPEC" not in edtool_in_process(command, "--help", cwd=tmp_path, env={"COLUMNS": "200"}).stdout, command
