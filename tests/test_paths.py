"""Option values and environment variables a user can get wrong, through the console script: one line,
exit 2, before any work (or, for an empty variable, the default it stands for)."""

import pytest
from helpers import assert_one_line_error, edtool_in_process


@pytest.mark.parametrize("args, expected", [
    (["compute", "--probes", "1000000000"], "--probes"),
    (["analyze", "--probes", "1000000000"], "--probes"),
    (["compute", "--probes", "1"], "--probes"),
    (["train", "--arch", "unet", "--fsizes", "8,,16"], "--fsizes must be integers separated by commas"),
    (["train", "--arch", "unet", "--fsizes", "8,16,"], "--fsizes must be integers separated by commas"),
    (["train", "--arch", "unet", "--fsizes", ",8,16"], "--fsizes must be integers separated by commas"),
    (["calibrate", "--checkpoint", "x.safetensors", "--sizes", "3,,5"], "--sizes must be integers"),
])
def test_out_of_range_or_malformed_values_are_one_line(args, expected, tmp_path):
    proc = edtool_in_process(*args, "--nsteps" if args[0] != "train" else "--steps", "2", cwd=tmp_path)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()


def test_an_empty_cache_variable_means_unset(tmp_path):
    """EDTOOL_CACHE="" is ./cache (not the working directory itself), as an empty EDTOOL_CHECKPOINTS
    adds no folder."""
    proc = edtool_in_process("status", cwd=tmp_path, env={"EDTOOL_CACHE": ""})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"no runs under {tmp_path / 'cache'}" in proc.stdout


def test_empty_location_variables_are_the_defaults(tmp_path, monkeypatch):
    from edtool.paths import cache_dir, search_dirs, shipped_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDTOOL_CACHE", "")
    monkeypatch.setenv("EDTOOL_CHECKPOINTS", "")
    assert cache_dir() == tmp_path / "cache"
    assert search_dirs() == [tmp_path / "checkpoints", shipped_dir()]
