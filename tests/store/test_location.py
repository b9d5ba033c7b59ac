"""edtool.store.location.run_location: the one answer to where a run lives, for compute (--run-dir, --run)
and for the commands that read a run (a path, a URL or a name under the cache)."""

import pytest

from edtool.errors import EdtoolError
from edtool.store.location import run_location


def test_a_path_is_taken_as_given_and_its_store_path_names_the_run(tmp_path):
    assert run_location(tmp_path / "run") == str(tmp_path / "run")
    assert run_location(f"{tmp_path}/run/ed.zarr") == run_location(f"{tmp_path}/run/") == str(tmp_path / "run")
    assert run_location("memory://x/run/ed.zarr") == "memory://x/run"


def test_a_name_is_a_folder_under_the_cache_and_must_be_plain(tmp_path, monkeypatch):
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    assert run_location(name="trial") == str(tmp_path / "cache" / "trial")
    assert run_location(None, name="trial") == run_location(name="trial")
    assert run_location(tmp_path / "elsewhere", name="trial") == str(tmp_path / "elsewhere")  # --run-dir wins
    for bad in ("a/b", "..", "."):
        with pytest.raises(EdtoolError, match="--run must be a plain name"):
            run_location(name=bad)


def test_an_existing_run_is_a_url_a_path_or_a_name_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache" / "trial").mkdir(parents=True)
    (tmp_path / "here" / "ed.zarr").mkdir(parents=True)
    assert run_location("s3://bucket/run", existing=True) == "s3://bucket/run"  # never looked up locally
    assert run_location("here", existing=True) == "here"  # a local folder wins over the cache
    assert run_location(f"{tmp_path}/here/ed.zarr", existing=True) == str(tmp_path / "here")
    assert run_location("trial", existing=True) == str(tmp_path / "cache" / "trial")
    with pytest.raises(EdtoolError, match="no run 'absent'.*neither a directory nor a name under"):
        run_location("absent", existing=True)
