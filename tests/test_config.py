"""Configuration in one place: each command's settings are one dataclass in edtool.config
with its defaults and checks; the command line takes its defaults and number ranges from there, so a number
out of range is a usage error (exit 2, one line) before any work, and Python callers get the same refusal."""

import inspect
from dataclasses import fields

import pytest
import torch
import typer

from edtool import cli, config
from edtool.config import RANGES, CalibrateConfig, ComputeConfig, SampleConfig, TrainConfig, check_range
from edtool.errors import EdtoolError
from helpers import assert_one_line_error, edtool_in_process

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
