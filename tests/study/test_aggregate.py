"""Aggregation over realizations checked against numpy on the full arrays (SPEC 8)."""

import json
import uuid
import warnings

import numpy as np
import pytest

from edtool.errors import EdtoolError
from edtool.study.aggregate import QUANTITIES, aggregate_run, compute_aggregate, read_aggregate
from edtool.store.run import create_run, open_run
from helpers import assert_one_line_error, edtool_in_process

MODELS = ["unet", "resnet", "els"]


def random_run(location, n_real=9, nsteps=6, done_fraction=0.7, nan_fraction=0.1, seed=0):
    """A run filled with lognormal numbers; some cells left undone, some steps NaN (failures)."""
    rng = np.random.default_rng(seed)
    run = create_run(location, {"estimator": "hutchinson", "probes": 16}, MODELS, list(range(n_real)),
                     [-1] * n_real, nsteps, (1, 4, 4), maps=False)
    for r in range(n_real):
        for m in range(len(MODELS)):
            if rng.random() > done_fraction:
                continue
            ed = rng.lognormal(m, 1.0, nsteps)
            ed[rng.random(nsteps) < nan_fraction] = np.nan
            jac = ed * rng.uniform(2, 5, nsteps)
            run.write_cell(r, m, ed, jac, ed / (2 * jac), ed / 20, rng.uniform(-1, 1, (1, 4, 4)))
    return run


def reference(run):
    """The statistics computed directly with numpy on the whole arrays (done cells only)."""
    done = run.done_mask()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for q in QUANTITIES:
            x = np.where(done[:, :, None], run.read(q).astype(np.float64), np.nan)  # (R, M, N)
            cell = np.nanmean(x, axis=2)  # (R, M): each realization's mean over steps
            for suffix, v in (("", x), ("_timeavg", cell)):
                n = np.isfinite(v).sum(axis=0)
                std = np.nanstd(v, axis=0, ddof=1)
                out[f"{q}_n{suffix}"] = n
                out[f"{q}_mean{suffix}"] = np.nanmean(v, axis=0)
                out[f"{q}_std{suffix}"] = np.where(n > 1, std, np.nan)
                out[f"{q}_cv{suffix}"] = out[f"{q}_std{suffix}"] / out[f"{q}_mean{suffix}"]
                out[f"{q}_median{suffix}"] = np.nanmedian(v, axis=0)
                out[f"{q}_q05{suffix}"] = np.nanquantile(v, 0.05, axis=0)
                out[f"{q}_q95{suffix}"] = np.nanquantile(v, 0.95, axis=0)
    return out


def assert_matches(arrays, ref, rtol=1e-6):
    assert set(ref) <= set(arrays)
    for name, expected in ref.items():
        np.testing.assert_allclose(arrays[name], expected, rtol=rtol, atol=0, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("block", [1, 4, 1000])
def test_aggregate_equals_numpy_on_full_arrays(tmp_path, block):
    run = random_run(tmp_path / "r")
    assert 0 < run.done_mask().sum() < run.done_mask().size  # partial on purpose
    arrays, _ = compute_aggregate(run, block=block)
    assert_matches(arrays, reference(run))
    assert arrays["ed_fro_mean"].shape == (3, 6) and arrays["ed_fro_mean_timeavg"].shape == (3,)


def test_stored_aggregate_matches_and_xarray_reads_it(tmp_path):
    xr = pytest.importorskip("xarray")
    random_run(tmp_path / "r")
    aggregate_run(tmp_path / "r")
    run = open_run(tmp_path / "r")
    stored = read_aggregate(run)
    assert stored is not None
    assert_matches(stored, reference(run), rtol=1e-6 * 10)  # stored as float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(str(tmp_path / "r" / "ed.zarr"), group="aggregate")
    assert ds["ed_fro_mean"].dims == ("model", "step") and ds["asym_q95_timeavg"].dims == ("model",)
    assert list(ds["model"].values) == MODELS and ds["time"].dims == ("step",)
    assert xr.open_zarr(str(tmp_path / "r" / "ed.zarr"))["ed_fro"].dims == ("realization", "model", "step")


def test_summary_stats(tmp_path):
    run = random_run(tmp_path / "r")
    summary = aggregate_run(tmp_path / "r")
    on_disk = json.loads((tmp_path / "r" / "summary_stats.json").read_text())  # strict JSON: no NaN
    assert on_disk == summary
    done = run.done_mask()
    ed, asym = run.read("ed_fro").astype(np.float64), run.read("asym").astype(np.float64)
    for m, name in enumerate(MODELS):
        values = ed[done[:, m], m].ravel()
        values = values[np.isfinite(values)]
        s = summary[name]
        assert s["num_realizations"] == done[:, m].sum()
        assert s["num_failed"] == (~np.isfinite(ed[done[:, m], m])).any(axis=1).sum()
        np.testing.assert_allclose(s["mean_ed_fro"], values.mean(), rtol=1e-9)
        np.testing.assert_allclose(s["std_ed_fro"], values.std(ddof=1), rtol=1e-9)
        np.testing.assert_allclose(s["max_ed_fro"], values.max(), rtol=1e-9)
        # the seed's keys: its formulas on its field, per step over the finite values, then over the steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            seed = ed[done[:, m], m] * seed_factor_by_hand(run.time, name)
            step_mean, step_std = np.nanmean(seed, axis=0), np.nanstd(seed, axis=0)
        ok = np.isfinite(step_mean)
        np.testing.assert_allclose([s["mean_ed_magnitude"], s["std_ed_magnitude"], s["max_ed_magnitude"]],
                                   [step_mean[ok].mean(), step_std[ok].mean(), step_mean[ok].max()], rtol=1e-9)
        assert s["field"] == ("score" if name == "els" else "eps")
        a = asym[done[:, m], m].ravel()
        np.testing.assert_allclose(s["mean_asym"], np.nanmean(a), rtol=1e-9)
        np.testing.assert_allclose(s["std_asym"], np.nanstd(a, ddof=1), rtol=1e-9)
        table = s["per_step"]
        assert table["time"] == run.time.tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_allclose(np.array(table["ed_fro_median"], dtype=float),
                                       np.nanmedian(ed[done[:, m], m], axis=0), rtol=1e-9)
    assert summary["models"] == MODELS and summary["estimator"] == "hutchinson" and summary["probes"] == 16
    assert summary["nsteps"] == 6 and summary["realizations_total"] == 9
    assert summary["realizations_used"] == done.any(axis=1).sum()


def seed_factor_by_hand(time, name) -> np.ndarray:
    """What the seed tool's ED is of ed_fro: its ELS backbone returns the score (1); a network's returns
    eps = -sqrt(beta(t)) s, so sqrt(beta(t)) with beta(t) = 1 - cos((t / 1.008) pi / 2)^2 (SPEC 2)."""
    return np.ones(len(time)) if name == "els" else np.sqrt(1 - np.cos(np.asarray(time) / 1.008 * np.pi / 2) ** 2)


def test_summary_stats_keeps_the_seed_tools_formulas(tmp_path):
    """summary_stats.json's four seed keys are what the seed's analyze_exterior_derivative.py computes,
    here with its own numpy calls on its field, from the store's arrays: mean over steps of the per-step
    means, mean over steps of the per-step np.std (ddof 0), largest per-step mean."""
    run = random_run(tmp_path / "r", nan_fraction=0.0)
    summary = json.loads(json.dumps(aggregate_run(tmp_path / "r")))
    done, ed = run.done_mask(), run.read("ed_fro").astype(np.float64)
    assert json.loads((tmp_path / "r" / "summary_stats.json").read_text()) == summary
    for m, name in enumerate(MODELS):
        ed_magnitudes_all = ed[done[:, m], m] * seed_factor_by_hand(run.time, name)  # realizations x steps
        ed_magnitudes_mean = np.mean(ed_magnitudes_all, axis=0)
        ed_magnitudes_std = np.std(ed_magnitudes_all, axis=0)
        s = summary[name]
        assert s["mean_ed_magnitude"] == pytest.approx(float(np.mean(ed_magnitudes_mean)), rel=1e-12)
        assert s["std_ed_magnitude"] == pytest.approx(float(np.mean(ed_magnitudes_std)), rel=1e-12)
        assert s["max_ed_magnitude"] == pytest.approx(float(np.max(ed_magnitudes_mean)), rel=1e-12)
        assert s["num_realizations"] == len(ed_magnitudes_all) >= 2
        # not edtool's own statistics of the score, which have keys of their own
        assert s["std_ed_fro"] == pytest.approx(ed[done[:, m], m].std(ddof=1), rel=1e-9)
        assert s["std_ed_magnitude"] < 0.9 * s["std_ed_fro"] and s["max_ed_fro"] > s["max_ed_magnitude"]
    assert summary["els"]["mean_ed_magnitude"] == pytest.approx(summary["els"]["mean_ed_fro"], rel=1e-9)
    assert summary["unet"]["mean_ed_magnitude"] < summary["unet"]["mean_ed_fro"]  # sqrt(beta) < 1 before t = 1
    assert {"mean_ed_magnitude", "std_ed_magnitude", "max_ed_magnitude", "mean_ed_fro"} <= set(summary["definitions"])


def test_aggregate_refuses_a_run_with_nothing_finished(tmp_path):
    """No finished cell: `edtool aggregate` says so in one line, exit 2, and writes nothing, as `plot` does."""
    create_run(tmp_path / "r", {}, ["unet"], [0], [-1], 2, (1, 2, 2), maps=False)
    with pytest.raises(EdtoolError, match="no finished cells yet: nothing to aggregate"):
        aggregate_run(tmp_path / "r")
    for command in ("aggregate", "plot"):
        assert_one_line_error(edtool_in_process(command, "r", cwd=tmp_path), "has no finished cells yet",
                              "edtool status")
    assert not (tmp_path / "r" / "summary_stats.json").exists()
    assert "aggregate" not in open_run(tmp_path / "r").group


@pytest.mark.parametrize("block", [1, 4])
def test_nasym_both_averages_from_the_stored_ed_and_jac(tmp_path, block):
    """QCSBM's NAsym = ||J - J^T||^2 / (4 ||J||^2): the mean of per-sample ratios and the ratio of the
    averages, per step and overall, recomputed with numpy from the stored ed_fro and jac_fro alone."""
    run = random_run(tmp_path / "r")
    arrays, _ = compute_aggregate(run, block=block)
    summary = aggregate_run(tmp_path / "r", block=block)
    done = run.done_mask()[:, :, None]
    ed, jac = run.read("ed_fro").astype(np.float64), run.read("jac_fro").astype(np.float64)
    ok = done & np.isfinite(ed) & np.isfinite(jac)
    e2, j2 = np.where(ok, ed ** 2, 0), np.where(ok, jac ** 2, 0)
    ratio = np.where(ok, e2 / (4 * np.where(ok, j2, 1)), 0)
    n = ok.sum(axis=0)
    np.testing.assert_allclose(arrays["nasym_mean"], ratio.sum(0) / n, rtol=1e-5)  # asym is float32
    np.testing.assert_allclose(arrays["nasym_ratio_of_means"], e2.sum(0) / (4 * j2.sum(0)), rtol=1e-12)
    overall = ratio.sum((0, 2)) / n.sum(1)
    np.testing.assert_allclose(arrays["nasym_mean_overall"], overall, rtol=1e-5)
    np.testing.assert_allclose(arrays["nasym_ratio_of_means_overall"], e2.sum((0, 2)) / (4 * j2.sum((0, 2))),
                               rtol=1e-12)
    assert not np.allclose(arrays["nasym_mean_overall"], arrays["nasym_ratio_of_means_overall"])  # two numbers
    for m, name in enumerate(MODELS):
        assert summary[name]["nasym_mean_of_ratios"] == pytest.approx(overall[m], rel=1e-5)
        assert summary[name]["per_step"]["nasym_ratio_of_means"] == pytest.approx(
            list(e2.sum(0)[m] / (4 * j2.sum(0)[m])), rel=1e-9)
    assert "QCSBM" in summary["definitions"]["nasym_mean_of_ratios"] and summary["points"]["source"] == "trajectory"
    stored = open_run(tmp_path / "r").group["aggregate"]
    np.testing.assert_allclose(stored["nasym_ratio_of_means"][:], arrays["nasym_ratio_of_means"], rtol=1e-6)
    assert stored["nasym_mean_overall"].metadata.dimension_names == ("model",)


def test_model_without_finished_cells_and_single_realization(tmp_path):
    run = create_run(tmp_path / "r", {}, ["unet", "els"], [5, 6], [-1, -1], 3, (1, 2, 2), maps=False)
    run.write_cell(1, "unet", [3.0, 2.0, 1.0], [6.0, 4.0, 2.0], [0.25] * 3, [0.0] * 3, np.zeros((1, 2, 2)))
    summary = aggregate_run(tmp_path / "r")
    arrays = read_aggregate(open_run(tmp_path / "r"))
    np.testing.assert_array_equal(arrays["ed_fro_mean"][0], [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(arrays["ed_fro_n"], [[1, 1, 1], [0, 0, 0]])
    assert np.isnan(arrays["ed_fro_std"][0]).all()  # one realization: no spread to estimate
    assert np.isnan(arrays["ed_fro_mean"][1]).all() and np.isnan(arrays["ed_fro_median_timeavg"][1])
    assert arrays["ed_fro_mean_timeavg"][0] == pytest.approx(2.0)
    assert summary["unet"]["mean_ed_fro"] == pytest.approx(2.0)
    assert summary["unet"]["std_ed_fro"] == pytest.approx(1.0)  # over the 3 step values, ddof=1
    assert summary["unet"]["std_ed_magnitude"] == 0.0  # the seed's: per step over one realization
    assert summary["els"]["num_realizations"] == 0 and summary["els"]["mean_ed_magnitude"] is None
    assert summary["els"]["mean_ed_fro"] is None
    assert summary["realizations_used"] == 1 and summary["realizations_total"] == 2


def test_failed_cell_excluded_and_counted(tmp_path):
    run = create_run(tmp_path / "r", {}, ["unet"], [0, 1, 2], [-1] * 3, 2, (1, 2, 2), maps=False)
    img = np.zeros((1, 2, 2))
    run.write_cell(0, 0, [1.0, 2.0], [2.0, 4.0], [0.25, 0.25], [0, 0], img)
    run.write_cell(1, 0, [3.0, np.nan], [6.0, np.inf], [0.25, np.nan], [0, 0], img)  # partly failed
    run.write_cell(2, 0, [np.nan, np.nan], [np.nan] * 2, [np.nan] * 2, [0, 0], img)  # wholly failed
    summary = aggregate_run(tmp_path / "r")
    arrays = read_aggregate(open_run(tmp_path / "r"))
    np.testing.assert_allclose(arrays["ed_fro_mean"][0], [2.0, 2.0])
    np.testing.assert_array_equal(arrays["ed_fro_n"][0], [2, 1])
    np.testing.assert_allclose(arrays["ed_fro_mean_timeavg"][0], (1.5 + 3.0) / 2)
    assert arrays["ed_fro_n_timeavg"][0] == 2
    assert summary["unet"]["num_failed"] == 2 and summary["unet"]["num_realizations"] == 3
    assert summary["unet"]["mean_ed_fro"] == pytest.approx(2.0)
    factor = seed_factor_by_hand(run.time, "unet")  # the seed's per-step means: [2, 2] times it, NaN left out
    assert summary["unet"]["mean_ed_magnitude"] == pytest.approx((2 * factor[0] + 2 * factor[1]) / 2)
    assert summary["unet"]["std_ed_magnitude"] == pytest.approx((1 * factor[0] + 0 * factor[1]) / 2)


def test_read_aggregate_goes_stale_when_cells_finish(tmp_path):
    run = random_run(tmp_path / "r", done_fraction=0.5)
    aggregate_run(tmp_path / "r")
    assert read_aggregate(open_run(tmp_path / "r")) is not None
    r, m = run.pending()[0]
    open_run(tmp_path / "r", mode="r+").write_cell(r, m, np.ones(6), np.ones(6), np.ones(6) / 2, np.zeros(6),
                                                   np.zeros((1, 4, 4)))
    assert read_aggregate(open_run(tmp_path / "r")) is None
    aggregate_run(tmp_path / "r")
    assert_matches(read_aggregate(open_run(tmp_path / "r")), reference(open_run(tmp_path / "r")), rtol=1e-5)


def test_non_local_run_returns_summary_without_writing_files(tmp_path):
    url = f"memory://edtool-agg-{uuid.uuid4().hex}/run"
    run = random_run(url, n_real=4)
    summary = aggregate_run(url)
    assert summary["realizations_total"] == 4 and summary["run"] == url
    assert_matches(read_aggregate(open_run(url)), reference(run), rtol=1e-5)
