"""`edtool --version`: the installed package's version, exit 0, nothing else run."""

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import edtool

REPO = Path(__file__).resolve().parent.parent


def test_version_prints_the_package_version(tmp_path):
    try:
        expected = version("edtool")
    except PackageNotFoundError:
        expected = edtool.__version__
    proc = subprocess.run([sys.executable, "-m", "edtool", "--version"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"edtool {expected}\n" and proc.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no cache, no results: it ran nothing
    help_text = subprocess.run([sys.executable, "-m", "edtool", "--help"], capture_output=True, text=True,
                               timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}).stdout
    assert "--version" in help_text
