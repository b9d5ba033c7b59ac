"""The figures of a run (SPEC 9), rendered from the run store alone.

Files (in the run directory unless `out_dir` is given):
- `ed_analysis_single.<fmt>`: one realization: ED vs time (linear, log), final images, mean ED per model
- `ed_analysis_aggregated.<fmt>`: >= 2 realizations: mean +- std, coefficient of variation,
  heatmaps realizations x steps, summary of mean and std per model
- `asym_vs_time.<fmt>`: the scale-free asymmetry over time
- `curl_maps.<fmt>`: where the rotation lives (steps x models), only when the run stored maps
- `locality_r90.<fmt>`, `locality_profile.<fmt>`: how far each score Jacobian reaches (SPEC 12), with the
  ELS machine's calibrated patch half-width; only when the run measured --locality
- `alignment_vs_time.<fmt>`: cosine of each model's Jacobian with the reference's; only with --align

This module decides which figures a run gets and writes them (whole, recorded in the folder's ledger,
never over a file edtool did not write); how each one looks is `edtool.study.figures`.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from edtool.study.aggregate import compute_aggregate, read_aggregate
from edtool.errors import EdtoolError
from edtool.fileio import (check_output, read_ledger, record_entry, recorded_paths, refuse_folders, refuse_foreign,
                           written_by_edtool)
from edtool.store.location import local_dir
from edtool.store.locks import access_lock
from edtool.store.run import open_finished, open_run
from edtool.store.runstore import RunStore
from edtool.study.figures import (aggregated_figure, alignment_figure, asym_figure, curl_figure, profile_figure,
                                  r90_figure, single_figure)

FORMATS = ("png", "pdf", "svg")


FIGURES = ("ed_analysis_single", "ed_analysis_aggregated", "asym_vs_time", "curl_maps", "locality_r90",
           "locality_profile", "alignment_vs_time")  # every figure name plot_run may write


FIGURES_OF = "figures of run (edtool plot)"  # the ledger entry naming the run whose figures a folder holds


def check_figure_folder(out_dir, fmt: str = "png", overwrite: bool = False, flag: str = "--out") -> str:
    """Before any work: the format is one we write, `out_dir` is a folder that takes files, it holds no
    folder of a figure's name, and no file of a figure's name that edtool did not write there (the seed
    tool's figures have the same names) unless `overwrite`. Returns the format, normalised; EdtoolError
    otherwise, naming `flag` (the option that names the folder) where another folder is the way out."""
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise EdtoolError(f"figure format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    refuse_folders([Path(out_dir) / f"{name}.{fmt}" for name in FIGURES], flag)
    check_output([Path(out_dir) / f"{FIGURES[0]}.{fmt}"], force=True, flag=flag)
    if not overwrite:
        refuse_foreign([Path(out_dir) / f"{name}.{fmt}" for name in FIGURES],
                       "pass --overwrite to replace it, or write the figures to another folder")
    return fmt


def _figures_key(run: RunStore) -> str:
    """What makes two runs' figures the same: their settings (two stores of equal settings hold equal numbers)."""
    return hashlib.sha256(json.dumps([run.config, run.models], sort_keys=True, default=str).encode()).hexdigest()


def _stale_figures(out_dir: Path, run: RunStore, own_folder: bool, fmt: str, names, overwrite: bool) -> list:
    """The figures edtool wrote in `out_dir` that this plot will not replace and that would otherwise
    stay beside its own as if they were of this run: those of another run (all formats; in a folder
    other than the run's own only with `overwrite`, else refused), or of this run a figure it no longer
    makes (a run recomputed with fewer realizations has no aggregated figure)."""
    ours = [out_dir / f"{n}.{f}" for n in FIGURES for f in FORMATS if written_by_edtool(out_dir / f"{n}.{f}")]
    previous = read_ledger(out_dir).get(FIGURES_OF)
    if ours and previous not in (None, _figures_key(run)):
        if not (own_folder or overwrite):
            shown = ", ".join(p.name for p in ours[:2]) + (", ..." if len(ours) > 2 else "")
            raise EdtoolError(f"{out_dir} holds figures of another run ({shown}); pass --overwrite to replace them, "
                              "or --out another folder, so that one folder never mixes runs")
        return [p for p in ours if not (p.suffix == f".{fmt}" and p.stem in names)]
    return [p for p in ours if p.suffix == f".{fmt}" and p.stem not in names]


def plot_run(location, out_dir=None, fmt: str = "png", overwrite: bool = False) -> list:
    """Render every figure the run supports and return their paths.

    Uses the stored aggregate when it is up to date, otherwise computes it in memory (the store
    is only read). A non-local run needs an explicit local `out_dir`. A file of a figure's name that
    edtool did not write there is refused unless `overwrite`; each figure is written whole (temp +
    rename) and recorded in the folder's ledger.
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:  # checked again with the folder (check_figure_folder), here before opening the run
        raise EdtoolError(f"figure format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    with access_lock(location):  # shared: no aggregate rewrites, no --overwrite deletes the run meanwhile
        return _plot_run(location, out_dir, fmt, overwrite)


def _plot_run(location, out_dir, fmt: str, overwrite: bool) -> list:
    run = open_run(location)
    own = local_dir(run.location)
    if out_dir is None:
        out_dir = own
        if out_dir is None:
            raise EdtoolError(f"run {run.location} is not on a local disk: give an output directory for the figures")
    out_dir = Path(out_dir)
    own_folder = own is not None and out_dir.resolve() == Path(own).resolve()
    check_figure_folder(out_dir, fmt, overwrite)
    figures = run_figures(run)
    stale = _stale_figures(out_dir, run, own_folder, fmt, figures, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.{fmt}"
        with recorded_paths([path]) as (tmp,):  # a kill mid-write never leaves a truncated figure for a good one
            fig.savefig(tmp, format=fmt, dpi=150)
        paths.append(path)
    record_entry(out_dir, FIGURES_OF, _figures_key(run))
    for path in stale:  # after the new figures are in place: a kill before leaves the old ones, not none
        path.unlink(missing_ok=True)
    return paths


def run_figures(run) -> dict:
    """The figures a run supports, by file name (SPEC 9): ed_analysis_single, asym_vs_time, and with
    two or more realizations ed_analysis_aggregated; curl_maps, locality_* and alignment_vs_time when
    the run stores them. `run` is a location or an open RunStore; nothing is written."""
    run = open_finished(run, "plot")
    done = run.done_mask()
    agg = read_aggregate(run) or compute_aggregate(run)[0]
    r0 = first_realization(done)

    figures = {"ed_analysis_single": single_figure(run, done, r0)}
    if agg["ed_fro_n"].max() >= 2:
        figures["ed_analysis_aggregated"] = aggregated_figure(run, done, agg)
    figures["asym_vs_time"] = asym_figure(run, done, agg, r0)
    if run.has_maps:
        figures["curl_maps"] = curl_figure(run, done, r0)
    if "loc_jac" in run.extra_arrays:
        figures["locality_r90"] = r90_figure(run, done, agg)
        figures["locality_profile"] = profile_figure(run, done, agg)
    if "align_jac" in run.extra_arrays:
        figures["alignment_vs_time"] = alignment_figure(run, done, agg)
    return figures


def first_realization(done: np.ndarray) -> int:
    """The first realization with every model done, else the first with any model done."""
    complete = np.flatnonzero(done.all(axis=1))
    return int(complete[0] if complete.size else np.flatnonzero(done.any(axis=1))[0])
