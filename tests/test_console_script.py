"""The command line as a user meets it: the installed `edtool` console script in a subprocess.

Bad command lines (usage errors) and bad input end as help or one line on stderr with exit code 2,
never a traceback; the slow test proves it in a fresh virtual environment (no click installed).
"""

import os
import shutil
import subprocess
import venv

import pytest
import torch
from helpers import assert_one_line_error, edtool, REPO


USAGE_ERRORS = [
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["compute", "--nsteps", "abc"], "'--nsteps'"),
    (["compute", "--no-such-flag"], "No such option: --no-such-flag"),
    (["compute", "--nsteps"], "requires an argument"),
    (["calibrate"], "Missing option '--checkpoint'"),
    (["status", "a", "b"], "unexpected extra argument"),
]


@pytest.mark.parametrize("args,expected", USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(args, expected, tmp_path):
    assert_one_line_error(edtool(*args, cwd=tmp_path), expected, "--help")


def test_no_arguments_shows_the_help_with_exit_2(tmp_path):
    proc = edtool(cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "compute" in proc.stdout + proc.stderr and "calibrate" in proc.stdout + proc.stderr


def test_help_and_a_good_command_exit_0(tmp_path):
    """Friendly input next to the hostile: --help and `status` on an empty cache succeed."""
    assert edtool("--help", cwd=tmp_path).returncode == 0
    proc = edtool("compute", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--nsteps" in proc.stdout
    proc = edtool("status", cwd=tmp_path, env={"EDTOOL_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0 and "no runs" in proc.stdout, proc.stderr


def test_debug_shows_the_traceback_of_a_usage_error(tmp_path):
    proc = edtool("--debug", "nosuchcommand", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_usage_errors_in_a_fresh_venv(tmp_path):
    """pip install of the package into a new venv: only what pyproject.toml brings (Typer 0.29 brings no
    click), whatever the development environment has."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "cache", "results", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    torch_version = torch.__version__.split("+")[0]
    for spec in (f"torch=={torch_version}", str(src)):
        subprocess.run([str(py), "-m", "pip", "install", "-q", spec], check=True, timeout=1200)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    exe = [str(env_dir / "bin" / "edtool")]
    for args, expected in USAGE_ERRORS[:3]:
        proc = subprocess.run([*exe, *args], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300)
        assert_one_line_error(proc, expected)
