"""edtool.study.prepare: what a run of models loads. A run of `py:` models alone never imports the ELS
engine, kernel or machine modules (they are imported where a machine is asked for), and still measures
the right numbers."""

import json
import os
import subprocess
import sys
import textwrap

ELS_MODULES = ("edtool.els.engine", "edtool.els.kernel", "edtool.els.machine")

# s(x) = -x + (x shifted one pixel along the rows) / 2 on 1x4x4 images: J = -I + P/2 with P a permutation
# whose transpose (the shift the other way) shares no entry with it, so ||J - J^T||_F = sqrt(2 * 16) / 2.
LINEAR_MODULE = '''
import torch


class Shift:
    image_shape = (1, 4, 4)

    def score(self, t, x, label=None):
        return -x + 0.5 * torch.roll(x, 1, dims=-1)
'''

SCRIPT = """
import json, sys
from edtool.config import ComputeConfig
{body}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("edtool.els."))))
"""


def _els_modules_loaded(tmp_path, body: str) -> list:
    """The edtool.els modules a fresh interpreter has loaded after running `body`."""
    (tmp_path / "shiftmod.py").write_text(LINEAR_MODULE)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(body=textwrap.dedent(body))], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1",
                               "EDTOOL_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_py_only_compute_does_not_import_the_els_engine(tmp_path):
    """compute() of a `py:` model: the exact ED of its linear field, without loading the ELS engine."""
    loaded = _els_modules_loaded(tmp_path, f"""
        from edtool.study.compute import compute
        from edtool.store.run import open_run
        summary = compute(ComputeConfig(models=["shift=py:shiftmod:Shift"], nsteps=2, realizations=2,
                                        estimator="exact", run_dir={str(tmp_path / "run")!r}, device="cpu"))
        ed = open_run(summary["location"]).read("ed_fro", "shift")
        assert abs(ed - 32 ** 0.5 / 2).max() < 1e-5, ed
    """)
    assert not set(ELS_MODULES) & set(loaded), loaded


def test_a_machine_run_imports_the_els_engine_where_it_builds_the_machine(tmp_path):
    """The control: prepare() of the `is` machine loads the modules the test above finds absent."""
    loaded = _els_modules_loaded(tmp_path, """
        from edtool.study.prepare import prepare
        prepared = prepare(ComputeConfig(models=["is"], nsteps=2, realizations=1, max_samples=20, device="cpu"))
        assert prepared.config["models"]["is"]["machine"] == "is"
    """)
    assert set(ELS_MODULES) <= set(loaded), loaded


def test_extra_arrays_follow_the_settings_and_are_the_results_compute_copies():
    """extra_array_dims picks the store layout's arrays by the settings a run records, and every per-cell array
    name is a field of the result compute copies it from (ed: EDResult; locality, alignment: their results),
    so a name is written once, in edtool.store.layout."""
    from dataclasses import fields

    from edtool.jacobian.ed import EDResult
    from edtool.jacobian.locality import AlignmentResult, LocalityResult
    from edtool.store.layout import ALIGN_ARRAYS, LOCALITY_ARRAYS, POINT_ARRAYS, STEP_ARRAYS
    from edtool.study.prepare import extra_array_dims

    assert extra_array_dims({}) == {}
    assert extra_array_dims({"locality": {"radius": 3}}) == LOCALITY_ARRAYS
    assert extra_array_dims({"align": {"reference": "unet"}, "save_points": True}) == {**ALIGN_ARRAYS, **POINT_ARRAYS}
    for names, result in ((STEP_ARRAYS, EDResult), (LOCALITY_ARRAYS, LocalityResult), (ALIGN_ARRAYS, AlignmentResult)):
        assert set(names) <= {f.name for f in fields(result)}, result
