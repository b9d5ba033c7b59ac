"""edtool.paths: an empty location variable stands for its default, through the console script and in Python."""

from helpers import edtool_in_process


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
