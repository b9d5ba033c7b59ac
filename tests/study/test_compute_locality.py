"""compute --locality / --align end to end (SPEC 8, 9, 12): the stored arrays against an
independent recomputation at the stored points, resume, aggregate, xarray, figures, refusals."""

import numpy as np
import pytest
import torch

from edtool.study.aggregate import aggregate_run
from edtool.diffusion import ddim_sample, initial_noise
from edtool.jacobian.ed import exterior_derivative
from edtool.jacobian.operators import FieldJacobian, jacobian_operator
from edtool.jacobian.locality import alignment, locality
from edtool.study.compute import compute
from edtool.study.prepare import prepare
from edtool.study.plots import plot_run
from edtool.store.location import store_url
from edtool.store.run import open_run
from helpers import cli, config, PNG, snapshot

pytestmark = pytest.mark.usefixtures("tiny_networks")

WHOLE = ("loc_jac", "loc_ed", "loc_jac_stderr", "loc_ed_stderr", "r90_jac", "r90_ed",
         "align_jac", "align_ed", "align_jac_stderr", "align_ed_stderr")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, tiny_checkpoints):  # noqa: F811
    """resnet and the ideal machine on resnet's path, with --locality (radius 4) and --align resnet."""
    run = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDTOOL_CHECKPOINTS", str(tiny_checkpoints))
        cfg = config(run, nsteps=1, realizations=2, trajectory="shared", locality=True, locality_radius=4,
                     align="resnet")
        summary = compute(cfg)
        study = prepare(cfg)
    return run, cfg, study, summary


def test_stored_arrays_equal_a_recomputation_at_the_same_points(whole_run):
    run_dir, cfg, study, summary = whole_run
    assert not summary["failures"]
    run = open_run(run_dir)
    assert run.done_mask().all() and run.radius.tolist() == [0, 1, 2, 3, 4]
    for name in WHOLE:
        dims = tuple(run.group[name].metadata.dimension_names)
        assert dims == (("realization", "model", "step", "radius") if name.startswith("loc") else
                        ("realization", "model", "step")), name
    net, ideal = study.models["resnet"], study.models["is"]
    for r in range(2):
        path = []
        ddim_sample(lambda t, x: net.eps(t, x), initial_noise(study.seeds[r], (1, 1, 32, 32)), 1,
                    on_step=lambda j, t, x: path.append((t, x.clone())))
        for j, (t, x) in enumerate(path):
            tb = torch.full((1,), t)
            op_net = FieldJacobian(lambda v: net.score(tb, v), x)
            op_is = jacobian_operator(ideal.field(tb), x)
            for m, op in enumerate((op_net, op_is)):
                loc = locality(op, 4, method="exact")
                np.testing.assert_allclose(run.read("loc_jac")[r, m, j], loc.loc_jac[0].numpy(), rtol=1e-5)
                np.testing.assert_allclose(run.read("r90_jac")[r, m, j], loc.r90_jac[0].numpy())
                assert np.all(run.read("loc_jac_stderr")[r, m, j] == 0)  # exact
            # the machine's ED came from the Jacobian built for SPEC 12: the same numbers as its own closed form
            ed = exterior_derivative(ideal.field(tb), x)
            np.testing.assert_allclose(run.read("jac_fro")[r, 1, j], ed.jac_fro[0].item(), rtol=1e-6)
            al = alignment(op_is, op_net, method="exact")  # --locality builds both dense Jacobians
            np.testing.assert_allclose(run.read("align_jac")[r, 1, j], al.align_jac[0].item(), rtol=1e-5)
    # the network against itself: exactly 1; the ideal machine is a gradient field: align_ed and loc_ed NaN
    np.testing.assert_array_equal(run.read("align_jac")[:, 0], 1)
    np.testing.assert_array_equal(run.read("align_ed")[:, 0], 1)
    assert np.isnan(run.read("align_ed")[:, 1]).all() and np.isnan(run.read("loc_ed")[:, 1]).all()
    assert np.isfinite(run.read("align_jac")[:, 1]).all() and (run.read("align_jac_stderr") == 0).all()


def test_aggregate_summary_xarray_and_figures(whole_run, tmp_path):
    import xarray as xr

    run_dir = whole_run[0]
    summary = aggregate_run(run_dir)
    run = open_run(run_dir)
    loc = run.read("loc_jac")
    agg = xr.open_zarr(store_url(run_dir), group="aggregate")
    assert agg["loc_jac_mean"].dims == ("model", "step", "radius")
    np.testing.assert_allclose(agg["loc_jac_mean"].values, loc.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(agg["r90_jac_median"].values, np.median(run.read("r90_jac"), axis=0))
    assert agg["align_ed_n"].values[1].tolist() == [0]  # undefined values are left out, and counted
    assert summary["resnet"]["mean_align_jac"] == pytest.approx(1.0)
    assert summary["is"]["mean_align_ed"] is None
    assert summary["locality"] == {"radius": 4, "method": "auto", "pixels": 64, "patch_half_width": {}}
    assert len(summary["resnet"]["per_step"]["loc_jac_mean"][0]) == 5
    ds = xr.open_zarr(store_url(run_dir))
    assert ds["loc_jac"].dims == ("realization", "model", "step", "radius")
    paths = plot_run(run_dir, out_dir=tmp_path)
    names = {p.name for p in paths}
    assert {"locality_r90.png", "locality_profile.png", "alignment_vs_time.png"} <= names
    for p in paths:
        assert p.read_bytes()[:8] == PNG


def test_rerun_resumes_and_other_settings_refuse(whole_run):
    from edtool.errors import EdtoolError

    run_dir, cfg, _, _ = whole_run
    before = snapshot(run_dir / "ed.zarr")
    assert compute(cfg)["progress"]["done"] == 4  # nothing left to do, nothing rewritten
    assert snapshot(run_dir / "ed.zarr") == before
    with pytest.raises(EdtoolError, match="locality"):
        compute(config(run_dir, nsteps=1, realizations=2, trajectory="shared", locality=True, locality_radius=3,
                       align="resnet"))
    assert snapshot(run_dir / "ed.zarr") == before


def test_locality_alone_on_own_paths_and_the_probe_method(tmp_path):
    cfg = config(tmp_path / "probe", nsteps=1, realizations=1, models=["resnet"], locality=True,
                 locality_method="probe", locality_pixels=8, locality_radius=2)
    compute(cfg)
    run = open_run(tmp_path / "probe")
    assert "align_jac" not in run.group and run.extra_arrays == list(WHOLE[:6])
    assert (run.read("loc_jac_stderr")[0, 0, 0, :2] > 0).all()
    assert np.isfinite(run.read("loc_jac")).all()


@pytest.mark.parametrize("args,message", [
    (["--align", "els"], "--align 'els' is not among --models"),
    (["--align", "resnet", "--trajectory", "own"], "--align compares Jacobians at the same points"),
    (["--locality", "--locality-method", "fast"], "unknown --locality-method 'fast'"),
    (["--locality", "--locality-pixels", "1"], "Invalid value for '--locality-pixels'"),
    (["--locality", "--locality-radius", "-1"], "Invalid value for '--locality-radius'"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, message):
    code, out, err = cli(capsys, monkeypatch, "compute", "--models", "resnet,is", "--nsteps", 1,
                         "--device", "cpu", "--run-dir", tmp_path / "bad", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_align_implies_a_shared_trajectory(tmp_path, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "compute", "--models", "resnet,is", "--nsteps", 1, "--probes", 2,
                         "--device", "cpu", "--run-dir", tmp_path / "al", "--align", "is", "--quiet")
    assert code == 0, err
    run = open_run(tmp_path / "al")
    assert run.config["trajectory"] == "shared" and run.config["align"] == {"reference": "is", "probes": 2}
    np.testing.assert_array_equal(run.read("align_jac")[:, 1], 1)  # the machine against itself
    assert (run.read("align_jac_stderr")[:, 0] > 0).all()  # the network without --locality: Hutchinson
    assert np.isnan(run.read("align_ed")).all()  # the reference is a gradient field: undefined, not 0


def test_config_records_each_machine_patch_half_width_per_step():
    """The r90 figure's step line: (k - 1)/2 of the machine's own patch size at every stored step."""
    from edtool.els.factory import make_machine
    from edtool.config import ComputeConfig
    from edtool.study.prepare import locality_alignment_config

    images = torch.zeros(2, 1, 8, 8)
    fields = {"els": make_machine("els-borders", images, scales=[3, 7]), "is": make_machine("is", images)}
    cfg = ComputeConfig(nsteps=4, locality=True, models=["els", "is"])
    out = locality_alignment_config(cfg, (1, 8, 8), fields)
    # times 1, 0.75, 0.5, 0.25: entry 1 (k = 7) for t > 0.5, entry 0 (k = 3) for t <= 0.5
    assert out["locality"] == {"radius": 4, "method": "auto", "pixels": 64, "patch_half_width": {"els": [3, 3, 1, 1]}}
    assert locality_alignment_config(ComputeConfig(nsteps=4), (1, 8, 8), fields) == {}  # off: the config is as before
