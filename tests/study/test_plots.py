"""Figures from a run store (SPEC 9): which files appear, in which format, from the store alone."""

import uuid

import matplotlib
import numpy as np
import pytest

from matplotlib.figure import Figure

import edtool.study.plots as plots
from edtool.study.aggregate import aggregate_run
from edtool.errors import EdtoolError
from edtool.study.plots import plot_run, run_figures
from edtool.store.run import create_run

HEADERS = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF"}


def filled_run(location, models=("unet", "els"), n_real=3, nsteps=4, maps=False, channels=1, skip=(), nan=(),
               zero=()):
    """A small run with ED growing toward t = 1; `skip` cells stay undone, `nan` cells fail (all NaN),
    models in `zero` are exactly conservative (ED = 0, like the ideal score machine)."""
    rng = np.random.default_rng(0)
    run = create_run(location, {"estimator": "exact"}, list(models), list(range(n_real)), [-1] * n_real, nsteps,
                     (channels, 6, 6), maps=maps)
    for r in range(n_real):
        for m in range(len(models)):
            if (r, m) in skip:
                continue
            ed = (m + 1) * (1 + 10 * run.time) * rng.uniform(0.8, 1.2, nsteps)
            if (r, m) in nan:
                ed = np.full(nsteps, np.nan)
            if models[m] in zero:
                ed = np.zeros(nsteps)
            jac = 3 * ed
            curl = rng.random((nsteps, 6, 6)) * ed[:, None, None] if maps else None
            with np.errstate(invalid="ignore"):
                asym = ed / (2 * jac)  # 0/0 = NaN for the conservative model: undefined, honestly
            run.write_cell(r, m, ed, jac, asym, 0 * ed, rng.uniform(-1, 1, (channels, 6, 6)), curl)
    return run


def check_files(paths, names, fmt="png"):
    assert sorted(p.name for p in paths) == sorted(f"{n}.{fmt}" for n in names)
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000
        if fmt in HEADERS:
            assert data.startswith(HEADERS[fmt])
        else:
            assert b"<svg" in data[:2000]


def test_multi_realization_with_maps_and_failures(tmp_path):
    filled_run(tmp_path / "r", models=("unet", "resnet", "is"), maps=True, skip={(2, 1)}, nan={(1, 0)}, zero={"is"})
    backend = matplotlib.get_backend()
    paths = plot_run(tmp_path / "r")
    check_files(paths, ["ed_analysis_single", "ed_analysis_aggregated", "asym_vs_time", "curl_maps"])
    assert all(p.parent == tmp_path / "r" for p in paths)  # the run directory by default
    assert matplotlib.get_backend() == backend  # a notebook's backend is left alone


def test_single_realization_without_maps(tmp_path):
    filled_run(tmp_path / "r", n_real=1, channels=3)
    check_files(plot_run(tmp_path / "r", out_dir=tmp_path / "figs"), ["ed_analysis_single", "asym_vs_time"])


def test_partial_run_plots_what_is_done(tmp_path):
    filled_run(tmp_path / "r", skip={(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)})  # only (0, els) done
    check_files(plot_run(tmp_path / "r"), ["ed_analysis_single", "asym_vs_time"])


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_formats(tmp_path, fmt):
    filled_run(tmp_path / "r", n_real=1, nsteps=3)  # the format is figure-independent: keep it cheap
    check_files(plot_run(tmp_path / "r", fmt=fmt.upper()), ["ed_analysis_single", "asym_vs_time"], fmt)


def test_bad_format_and_empty_run(tmp_path):
    filled_run(tmp_path / "r", n_real=1)
    with pytest.raises(EdtoolError, match="format 'jpg' is not supported"):
        plot_run(tmp_path / "r", fmt="jpg")
    create_run(tmp_path / "empty", {}, ["unet"], [0], [-1], 2, (1, 2, 2), maps=False)
    with pytest.raises(EdtoolError, match="no finished cells"):
        plot_run(tmp_path / "empty")
    with pytest.raises(EdtoolError, match="not on a local disk"):
        plot_run(filled_run(f"memory://edtool-plots-{uuid.uuid4().hex}/run", n_real=1, nsteps=2).location)


def test_uses_fresh_stored_aggregate_and_recomputes_stale_one(tmp_path, monkeypatch):
    run = filled_run(tmp_path / "r", n_real=2, nsteps=2, skip={(1, 1)})
    aggregate_run(tmp_path / "r")
    calls = []
    real = plots.compute_aggregate
    monkeypatch.setattr(plots, "compute_aggregate", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("single_figure", "aggregated_figure", "asym_figure"):  # rendering is tested elsewhere
        monkeypatch.setattr(plots, name, lambda *a: Figure(figsize=(1, 1)))
    plot_run(tmp_path / "r")
    assert calls == []  # read from the store
    run.write_cell(1, 1, [1.0, 2.0], [3.0, 4.0], [0.1, 0.2], [0, 0], np.zeros((1, 6, 6)))
    plot_run(tmp_path / "r")
    assert calls == [1]  # the stored aggregate is out of date: computed in memory


def test_figures_hold_the_panels_spec_9_lists(tmp_path):
    """Inspect the Figures themselves: every panel SPEC 9 names, with axis labels, a legend per model,
    std error bars, a log-scale panel, one image per model, and the models in fixed distinct colors."""
    from matplotlib.container import ErrorbarContainer

    filled_run(tmp_path / "r", models=("unet", "resnet", "is"), maps=True)
    figs = run_figures(tmp_path / "r")
    assert set(figs) == {"ed_analysis_single", "ed_analysis_aggregated", "asym_vs_time", "curl_maps"}

    lin, log, bars, *images = figs["ed_analysis_single"].axes
    assert lin.get_yscale() == "linear" and log.get_yscale() == "log"
    for ax in (lin, log, bars):
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    for ax in (lin, log):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["unet", "resnet", "is"]
        assert len({line.get_color() for line in ax.get_lines()}) == 3
    assert [t.get_text() for t in bars.get_xticklabels()] == ["unet", "resnet", "is"]
    assert [ax.get_title() for ax in images[:3]] == [f"{m}: final image" for m in ("unet", "resnet", "is")]
    assert all(ax.get_images() for ax in images[:3])

    mean, cv, summary, *heat = figs["ed_analysis_aggregated"].axes
    errorbars = [c for c in mean.containers if isinstance(c, ErrorbarContainer)]
    assert len(errorbars) == 3 and all(c.has_yerr for c in errorbars)
    assert "std" in mean.get_title() and mean.get_ylabel() and cv.get_ylabel() and summary.get_ylabel()
    assert [t.get_text().split(" ")[0] for t in mean.get_legend().get_texts()] == ["unet", "resnet", "is"]
    assert [t.get_text() for t in summary.get_legend().get_texts()][:1] == ["mean"]
    heatmaps = [ax for ax in heat if ax.get_images()]
    assert len(heatmaps) == 3 and all(ax.get_ylabel() in ("realization", "") for ax in heatmaps)
    assert any("colorbar" in ax.get_label() or ax.get_title().startswith("gray") for ax in heat)

    (asym,) = figs["asym_vs_time"].axes
    assert asym.get_xlabel() and asym.get_ylabel() and asym.get_ylim()[0] == 0
    assert len(asym.get_legend().get_texts()) == 3
    assert all(ax.get_images() for ax in figs["curl_maps"].axes if not ax.get_label() == "<colorbar>")

def test_single_figure_draws_the_stored_probe_errors_and_plain_labels(tmp_path):
    """ed_analysis_single: a model measured with random probes (ed_stderr > 0) gets ±1 standard-error bars of
    exactly the stored sizes on both ED panels, an exact one none; the labels say the units in words, asym's
    denominator is bracketed, and the linear panel says that the last steps rule it."""
    from matplotlib.container import ErrorbarContainer

    run = filled_run(tmp_path / "r", models=("resnet", "els"), n_real=1)
    ed = run.read("ed_fro", model=0)[0]
    stderr = 0.05 * ed + np.arange(run.nsteps)
    run.write_cell(0, 0, ed, 3 * ed, ed / (6 * ed), stderr, np.zeros((1, 6, 6)))
    figs = run_figures(tmp_path / "r")
    lin, log, bars, *_ = figs["ed_analysis_single"].axes
    for ax in (lin, log):
        probed, exact = (c for c in ax.containers if isinstance(c, ErrorbarContainer))
        assert probed.has_yerr and not exact.has_yerr
        segments = probed.lines[2][0].get_segments()  # one vertical bar per step: (t, ed - se) to (t, ed + se)
        np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segments], 2 * stderr, rtol=1e-6)
        assert ax.get_legend().get_texts()[0].get_text() == "resnet (bars: ±1 standard error of the probes)"
        assert "pixel value" in ax.get_ylabel() and "data" not in ax.get_ylabel()
    assert "dominate" in lin.get_title() and "pixel value" in bars.get_ylabel()
    (asym,) = figs["asym_vs_time"].axes
    assert r"\,/\, (2\,\|J\|_F)" in asym.get_ylabel()
