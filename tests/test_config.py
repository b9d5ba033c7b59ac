"""Configuration in one place: each command's settings are one dataclass in edtool.config
with its defaults and checks; the command line takes its defaults and number ranges from there, so a number
out of range is a usage error (exit 2, one line) before any work, and Python callers get the same refusal;
and the defaults table each setting's default comes from."""

import inspect
from dataclasses import fields

import pytest
import torch
import typer

from edtool import cli, config
from edtool.config import RANGES, CalibrateConfig, ComputeConfig, SampleConfig, TrainConfig, check_range
from edtool.errors import EdtoolError
from helpers import REPO, SHARED, assert_one_line_error, edtool_in_process

SETTINGS = {"compute": ComputeConfig, "analyze": ComputeConfig, "calibrate": CalibrateConfig,
            "sample": SampleConfig, "train": TrainConfig}
# options whose default differs from the settings' on purpose, and why
OWN_DEFAULT = {("compute", "trajectory"): "None: own, or shared when --align asks for the same points",
               ("demo", "nsteps"): "the demo is a quicker tour (10 steps)",
               ("train", "arch"): "required unless --state holds a run",
               ("calibrate", "checkpoint"): "required", ("sample", "checkpoint"): "required"}
# options whose range is narrower than RANGES' on purpose
OWN_RANGE = {("train", "batch"): (1, 1 << 20)}


def _options(command):
    """(name, OptionInfo) of every option of a registered command."""
    for name, p in inspect.signature(command.callback).parameters.items():
        if isinstance(p.default, typer.models.OptionInfo):
            yield name, p.default


def _commands():
    return {c.name or c.callback.__name__.replace("_", "-"): c for c in cli.app.registered_commands}


def _shown(value):
    return ",".join(map(str, value)) if isinstance(value, list) else value


def test_one_defaults_table_the_command_line_takes_from():
    """Every option named like a setting has the settings dataclass's default, read off the Typer app."""
    commands, compared = _commands(), {}
    for command_name, settings in SETTINGS.items():
        names = {f.name for f in fields(settings)}
        for name, option in _options(commands[command_name]):
            if name not in names or (command_name, name) in OWN_DEFAULT:
                continue
            assert option.default == _shown(config.default(settings, name)), (command_name, name)
            compared[command_name] = compared.get(command_name, 0) + 1
    # every setting but those above and those a command does not take (sources: from --models LABEL=SOURCE;
    # train's weight_decay and lastksize: the paper's recipe, Python only)
    assert compared["compute"] == len(fields(ComputeConfig)) - len({"trajectory", "sources"})
    assert compared["sample"] == len(fields(SampleConfig)) - 1  # checkpoint
    assert compared["calibrate"] == len(fields(CalibrateConfig)) - 1
    assert compared["train"] == len(fields(TrainConfig)) - len({"arch", "weight_decay", "lastksize"})
    # analyze is the seed tool's command: it takes the seed's flags for realizations and the folder
    # (--multiple/--single, --output_dir) and none of these compute settings
    not_in_analyze = {"realizations", "run", "run_dir", "patch_size", "batch", "label", "rtol", "retry_failed",
                      "shard", "tf32", "save_points", "scheduler", "reference", "trajectory", "align", "locality",
                      "locality_method", "locality_pixels", "locality_radius", "sources"}
    assert compared["analyze"] == len(fields(ComputeConfig)) - len(not_in_analyze)
    assert not_in_analyze <= {f.name for f in fields(ComputeConfig)}
    # the defaults everything shares, and the library's own (edtool.els.calibrate) agree with them
    from edtool.els import calibrate

    assert CalibrateConfig().sizes == list(calibrate.DEFAULT_SIZES) and ComputeConfig().nsteps == config.NSTEPS
    assert SampleConfig().patch_size == ComputeConfig().patch_size == config.PATCH_SIZE
    assert ComputeConfig().probes == config.PROBES


def test_every_range_comes_from_one_table():
    """Every option named in RANGES (in any command) has RANGES' bounds, so `--help` shows them and Typer
    refuses a number outside them; and the library's check refuses the same numbers."""
    seen = set()
    for command_name, command in _commands().items():
        for name, option in _options(command):
            if name in RANGES:
                assert (option.min, option.max) == OWN_RANGE.get((command_name, name), RANGES[name]), \
                    (command_name, name)
                seen.add(name)
    assert seen == set(RANGES)
    for name, (least, most) in RANGES.items():
        option = "--" + name.replace("_", "-")
        assert check_range(name, least) == least and check_range(name, None) is None
        with pytest.raises(EdtoolError, match=f"^{option} must be "):
            check_range(name, least - 1)
        if most is not None:
            assert check_range(name, most) == most
            with pytest.raises(EdtoolError, match=f"^{option} {most + 1} is more than edtool takes"):
                check_range(name, most + 1)
        with pytest.raises(EdtoolError, match="must be a whole number"):
            check_range(name, True)


@pytest.mark.parametrize("args, option", [
    (["compute", "--nsteps", "0"], "--nsteps"),
    (["compute", "--nsteps", str(10**10)], "--nsteps"),
    (["compute", "--max-samples", "0"], "--max-samples"),
    (["compute", "--probes", "1"], "--probes"),
    (["compute", "--realizations", "0"], "--realizations"),
    (["compute", "--patch-size", "4"], "--patch-size"),
    (["analyze", "--nsteps", "0"], "--nsteps"),
    (["analyze", "--multiple", "0"], "--multiple"),
    (["sample", "--checkpoint", "net.safetensors", "--nsteps", "0"], "--nsteps"),
    (["sample", "--checkpoint", "net.safetensors", "--patch-size", "4"], "--patch-size"),
    (["sample", "--checkpoint", "net.safetensors", "--max-samples", "0"], "--max-samples"),
    (["calibrate", "--checkpoint", "net.safetensors", "--sizes", "3,4"], "candidate size"),
])
def test_range_errors_are_usage_errors_before_any_output(tmp_path, args, option):
    """Through the console script: exit 2, one line naming the option, and nothing created (the
    checkpoint named does not even exist: the settings are refused before anything is read)."""
    out = {"compute": ["--run-dir", tmp_path / "run"], "analyze": ["--output_dir", tmp_path / "run"],
           "sample": ["--out", tmp_path / "run"], "calibrate": ["--out", tmp_path / "run" / "s.json"]}[args[0]]
    proc = edtool_in_process(*args, *out, cwd=tmp_path)
    assert_one_line_error(proc, option)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_library_refuses_what_the_command_line_refuses():
    """Python callers get the same checks, one message per setting (the tool's own wording)."""
    cases = [(dict(nsteps=0), "--nsteps must be at least 1, got 0"),
             (dict(nsteps=10**10), f"--nsteps {10**10} is more than edtool takes (at most {config.MAX_NSTEPS})"),
             (dict(max_samples=0), "--max-samples must be at least 1, got 0"),
             (dict(max_samples=2.5), "--max-samples must be a whole number, got 2.5"),
             (dict(probes=1), "--probes must be at least 2 (the standard error needs a spread), got 1"),
             (dict(seed=-1), "--seed must be 0 or more, got -1"),
             (dict(seed=config.MAX_SEED, realizations=2), "--seed 9223372036854775807 with --realizations 2: seeds"),
             (dict(realizations=10**12), "--realizations 1000000000000 is more than one run holds"),  # no list made
             (dict(patch_size=4), "--patch-size is 4; patch sizes must be odd"),
             (dict(locality_pixels=1), "--locality-pixels must be at least 2"),
             (dict(locality_radius=-1), "--locality-radius must be 0 or more, got -1")]
    for kw, message in cases:
        with pytest.raises(EdtoolError) as err:
            ComputeConfig(models=["is"], **kw).validate()
        assert str(err.value).startswith(message), (kw, str(err.value))
    assert ComputeConfig(models=["is"]).validate().nsteps == config.NSTEPS
    for settings, kw, message in [
            (SampleConfig, dict(patch_size=4), "--patch-size is 4"), (SampleConfig, dict(nsteps=0), "--nsteps must"),
            (SampleConfig, dict(seeds=0), "--seeds must be at least 1"), (SampleConfig, dict(layout="x"), "--layout"),
            (CalibrateConfig, dict(sizes=[3, 4]), "candidate size is 4"),
            (CalibrateConfig, dict(metric="l1"), "--metric"),
            (CalibrateConfig, dict(max_samples=0), "--max-samples must be at least 1, got 0"),
            (CalibrateConfig, dict(batch=0), "--batch must be at least 1, got 0"),
            (CalibrateConfig, dict(seed=config.MAX_SEED, seeds=2), "--seed 9223372036854775807 with --seeds 2")]:
        with pytest.raises(EdtoolError, match=message):
            settings(checkpoint="net.safetensors", **kw).validate()
    with pytest.raises(EdtoolError, match="--checkpoint is required"):
        SampleConfig().validate()
    # the data loader, which Python callers may reach directly, says it the same way
    from edtool.data import first_samples

    with pytest.raises(EdtoolError, match="^--max-samples must be at least 1, got 0$"):
        first_samples(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), 0)


# ------------------------------------------------------------------ one home per concept
# Concepts with one home each: the defaults table,
# "find a schedule, fall back, add a note", "els follows the padding", and the CLI's front door.


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
