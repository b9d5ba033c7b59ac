"""Reduce a run over its realizations (SPEC 8): per-step and per-model statistics.

Only completed cells (done[r, m]) count, so a partly finished run aggregates what it has;
NaN values (failed or non-finite steps) are left out of every statistic and counted.
Standard deviations are sample ones (ddof = 1): NaN from fewer than two values.

Names: `aggregate/<quantity>_<stat>` is (model, step), the statistic over realizations at
each step; `aggregate/<quantity>_<stat>_timeavg` is (model,), the statistic over
realizations of each realization's mean over its steps.

summary_stats.json keeps the seed tool's four keys with the seed's formulas on the seed's field
(`seed_factor`: the network's eps, sqrt(beta(t)) x ed_fro, or the machine's score), and puts edtool's
own statistics of ed_fro under keys of their own (`mean_ed_fro`, ...): DEFINITIONS says which is which.

QCSBM's NAsym = ||J - J^T||_F^2 / (4 ||J||_F^2) = asym^2 (SPEC 13) is averaged two ways, over the
(realization, step) values where ed_fro, jac_fro and asym are all finite: `nasym_mean` (their
mean of per-sample ratios, what their Table 2 reports) and `nasym_ratio_of_means` (mean
||J - J^T||_F^2 / (4 mean ||J||_F^2), less biased); (model, step) per step and `..._overall`
(model,) over all steps.
"""

import datetime
import warnings

import numpy as np
import torch

from edtool import __version__
from edtool.config import MACHINE_NAMES
from edtool.diffusion import beta
from edtool.store.integrity import AGGREGATE_DIGESTS, array_digest
from edtool.store.layout import ALIGN_ARRAYS, EXTRA_ARRAYS, LOCALITY_ARRAYS, consolidate, new_array
from edtool.store.location import local_dir
from edtool.store.locks import access_lock
from edtool.store.ownership import write_summary
from edtool.store.run import open_finished, open_run
from edtool.store.runstore import RunStore

QUANTITIES = ("ed_fro", "asym", "jac_fro")
STATS = ("mean", "std", "cv", "median", "q05", "q95", "n")
QUANTILES = {"median": 0.5, "q05": 0.05, "q95": 0.95}
BLOCK = 64  # realizations read at once by the streaming pass

DEFINITIONS = {
    "mean_ed_magnitude": "the seed tool's: mean over steps of ed_magnitudes_mean, the per-step mean over realizations "
                         "of the seed's ED, ||J - J^T||_F of the network's eps (sqrt(beta(t)) x ed_fro) or of an "
                         "ELS-type machine's score (= ed_fro); field says which",
    "std_ed_magnitude": "the seed tool's: mean over steps of the per-step standard deviation (ddof=0) over "
                        "realizations of the same values (0 with one realization)",
    "max_ed_magnitude": "the seed tool's: largest per-step mean ed_magnitudes_mean (not the largest single value)",
    "field": "what the seed's ED is of for this model: eps (networks) or score (machines)",
    "mean_ed_fro": "edtool's: mean of ed_fro = ||J - J^T||_F of the score over all finite (realization, step) values",
    "std_ed_fro": "edtool's: sample standard deviation (ddof=1) of the same values",
    "max_ed_fro": "edtool's: largest of the same values",
    "num_realizations": "completed realizations of this model (done cells)",
    "num_failed": "completed realizations with at least one non-finite ed_fro step (those steps are excluded)",
    "num_used": "realizations that contribute to mean_ed_fro (at least one finite ed_fro step); the seed's keys "
                "leave out the failed steps the same way, and a step that failed in every realization",
    "mean_asym": "mean of asym = ||J - J^T||_F / (2 ||J||_F) over all finite (realization, step) values",
    "nasym_mean_of_ratios": "QCSBM's NAsym (Chao et al. 2023, Table 2): mean over (realization, step) of "
                            "asym^2 = ||J - J^T||_F^2 / (4 ||J||_F^2), over the values where ed_fro, jac_fro and "
                            "asym are finite; compare it with their table only for --points noised-data",
    "nasym_ratio_of_means": "mean ||J - J^T||_F^2 / (4 mean ||J||_F^2) over the same values: the ratio of the "
                            "averages, less biased than the mean of ratios",
    "per_step": "statistics over realizations at each step; time runs from 1 (noise) to 1/nsteps",
    "loc_jac": "locality profile (SPEC 12): share of ||J||_F^2 in entries whose output and input pixels are at "
               "Chebyshev distance <= radius; aggregate/loc_jac_<stat> is (model, step, radius)",
    "loc_ed": "the same share for J - J^T",
    "r90_jac": "effective radius: the smallest radius holding 90 % of ||J||_F^2 (NaN when beyond the largest "
               "radius stored; such values are left out and counted out of n)",
    "r90_ed": "the same for J - J^T",
    "align_jac": "cosine <J_a, J_ref>_F / (||J_a||_F ||J_ref||_F) with the reference model's Jacobian at the "
                 "same (shared-trajectory) point: 1 = the same linearization up to scale",
    "align_ed": "the same cosine between the antisymmetric parts; NaN where one is zero (a gradient field)",
}
# The locality and alignment arrays (SPEC 12) aggregated when a run has them, their standard errors left out:
# (realization, model, step[, radius]) -> (model, step[, radius])
LOCALITY_ALIGN_QUANTITIES = tuple(q for q in (*LOCALITY_ARRAYS, *ALIGN_ARRAYS) if not q.endswith("_stderr"))
LOCALITY_ALIGN_STATS = ("mean", "std", "median", "q05", "q95", "n")


def aggregate_run(location, block: int = BLOCK) -> dict:
    """Aggregate the run at `location` into its `aggregate/` arrays and return the summary.

    The summary is also written to `<run>/summary_stats.json` when the run is on a local disk
    (atomically; a summary_stats.json edtool did not write is refused, never replaced); for a
    non-local store the caller decides where it goes. A run with damaged cells is refused, naming
    them, and so is a run with no finished cell (nothing is written). Holds the run's access lock exclusively: a second aggregate, a plot or a `compute
    --overwrite` waits for it; cells that compute finishes meanwhile count next time.
    Memory: see `compute_aggregate`.
    """
    with access_lock(location, exclusive=True, doing="aggregating it"):
        run = open_finished(open_run(location, mode="r+"), "aggregate")
        arrays, summary = compute_aggregate(run, block)
        write_aggregate(run, arrays, summary)
        base = local_dir(run.location)
        if base is not None:
            write_summary(base, summary)
    return summary


def compute_aggregate(run: RunStore, block: int = BLOCK) -> tuple:
    """All aggregate arrays {name: ndarray} and the summary dict, without writing anything.

    Mean, std, cv, n and max stream over blocks of `block` realizations (memory ~ block x models
    x steps floats, independent of the run size). Median and quantiles need every value of one
    column: they read one model's (realization, step) slab of one quantity at a time, i.e.
    realizations x steps x 8 bytes.
    """
    done = run.done_mask()  # one snapshot: cells finished after it count next time
    moments, failed = _stream_moments(run, done, block)
    arrays = nasym_from_sums(moments["nasym"]["step"])
    arrays.update({f"{k}_overall": v for k, v in nasym_from_sums(moments["nasym"]["all"]).items()})
    for q in QUANTITIES:
        arrays.update(_finish(q, "", *moments[q]["step"]))
        arrays.update(_finish(q, "_timeavg", *moments[q]["timeavg"]))
        for m in range(len(run.models)):
            slab = run.read(q, model=m)[done[:, m]].astype(np.float64)
            cell_means = _nanmean(slab, axis=1)
            for stat, p in QUANTILES.items():
                arrays.setdefault(f"{q}_{stat}", np.full((len(run.models), run.nsteps), np.nan))
                arrays.setdefault(f"{q}_{stat}_timeavg", np.full(len(run.models), np.nan))
                arrays[f"{q}_{stat}"][m] = _nanquantile(slab, p)
                arrays[f"{q}_{stat}_timeavg"][m] = _nanquantile(cell_means[:, None], p)[0]
    arrays.update(_locality_align_aggregate(run, done))
    summary = _summary(run, done, arrays, moments, failed)
    return arrays, summary


def _locality_align_aggregate(run: RunStore, done: np.ndarray) -> dict:
    """mean, std (ddof=1), median, q05, q95 and n over done realizations of each SPEC 12 array the run
    has, one model's (realization, step[, radius]) slab at a time; NaN values are left out."""
    arrays = {}
    for q in LOCALITY_ALIGN_QUANTITIES:
        if q not in run.group:
            continue
        for m in range(len(run.models)):
            slab = run.read(q, model=m)[done[:, m]].astype(np.float64)
            valid = np.isfinite(slab)
            n = valid.sum(axis=0)
            with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                values = {"mean": np.where(n > 0, np.nanmean(slab, axis=0) if slab.size else np.nan, np.nan),
                          "std": np.where(n > 1, np.nanstd(slab, axis=0, ddof=1) if slab.size else np.nan, np.nan),
                          "n": n}
            values.update({stat: _nanquantile(slab, p) for stat, p in QUANTILES.items()})
            for stat, v in values.items():
                arrays.setdefault(f"{q}_{stat}", np.full((len(run.models), *slab.shape[1:]),
                                                         0 if stat == "n" else np.nan))[m] = v
    return arrays


def _empty_moments(shape) -> list:
    return [np.zeros(shape), np.zeros(shape), np.zeros(shape)]  # n, mean, M2


def _merge(acc: list, values: np.ndarray, valid: np.ndarray, axis):
    """Fold a batch of values (where `valid`) into running (n, mean, M2) — Chan et al.'s parallel update."""
    n_b = valid.sum(axis=axis)
    x = np.where(valid, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_b = np.where(n_b > 0, x.sum(axis=axis) / np.maximum(n_b, 1), 0.0)
    m2_b = (np.where(valid, values - np.expand_dims(mean_b, axis), 0.0) ** 2).sum(axis=axis)
    n_a, mean_a, m2_a = acc
    n = n_a + n_b
    delta = mean_b - mean_a
    safe_n = np.maximum(n, 1)
    acc[0] = n
    acc[1] = mean_a + delta * n_b / safe_n
    acc[2] = m2_a + m2_b + delta ** 2 * n_a * n_b / safe_n


def _stream_moments(run: RunStore, done: np.ndarray, block: int):
    """One pass over realization blocks: running moments per (model, step), per model over all
    values, and per model over realizations' time averages; plus max and failure counts."""
    n_models, n = len(run.models), run.nsteps
    moments = {q: {"step": _empty_moments((n_models, n)), "all": _empty_moments(n_models),
                   "timeavg": _empty_moments(n_models), "max": np.full(n_models, -np.inf)} for q in QUANTITIES}
    moments["nasym"] = {"step": np.zeros((4, n_models, n)), "all": np.zeros((4, n_models))}
    failed = np.zeros(n_models, dtype=np.int64)
    for r0 in range(0, run.n_realizations, block):
        rows = slice(r0, min(r0 + block, run.n_realizations))
        cell_done = done[rows]  # (B, M)
        values = {}
        for q in QUANTITIES:
            x = values[q] = run.read(q, realizations=rows).astype(np.float64)  # (B, M, N)
            valid = cell_done[:, :, None] & np.isfinite(x)
            acc = moments[q]
            _merge(acc["step"], x, valid, axis=0)
            _merge(acc["all"], x.transpose(1, 0, 2).reshape(n_models, -1),
                   valid.transpose(1, 0, 2).reshape(n_models, -1), axis=1)
            cell_means = _nanmean(np.where(valid, x, np.nan), axis=2)  # (B, M)
            _merge(acc["timeavg"], cell_means.T, np.isfinite(cell_means).T, axis=1)
            acc["max"] = np.fmax(acc["max"], np.where(valid, x, -np.inf).max(axis=(0, 2), initial=-np.inf))
            if q == "ed_fro":
                failed += (cell_done & ~np.isfinite(x).all(axis=2)).sum(axis=0)
        sums = nasym_sums(values["ed_fro"], values["jac_fro"], values["asym"], cell_done[:, :, None], axis=0)
        moments["nasym"]["step"] += sums
        moments["nasym"]["all"] += sums.sum(axis=-1)
    return moments, failed


def nasym_sums(ed_fro, jac_fro, asym, valid, axis) -> np.ndarray:
    """Stacked (count, sum asym^2, sum ed_fro^2, sum jac_fro^2) along `axis` over the entries that are
    `valid` and where all three quantities are finite: what nasym_from_sums turns into NAsym."""
    ok = valid & np.isfinite(ed_fro) & np.isfinite(jac_fro) & np.isfinite(asym)
    squares = [(np.where(ok, v, 0.0) ** 2).sum(axis=axis) for v in (asym, ed_fro, jac_fro)]
    return np.stack([ok.sum(axis=axis), *squares]).astype(np.float64)


def nasym_from_sums(sums: np.ndarray) -> dict:
    """QCSBM's NAsym both ways from nasym_sums: `nasym_mean` = mean asym^2 (their mean of per-sample
    ratios) and `nasym_ratio_of_means` = sum ||J - J^T||_F^2 / (4 sum ||J||_F^2); NaN without values."""
    n, asym2, ed2, jac2 = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"nasym_mean": np.where(n > 0, asym2 / np.maximum(n, 1), np.nan),
                "nasym_ratio_of_means": np.where((n > 0) & (jac2 > 0), ed2 / (4 * jac2), np.nan)}


def _finish(q: str, suffix: str, n, mean, m2) -> dict:
    """mean, std (ddof=1), cv = std/mean and n arrays from running moments; NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, mean, np.nan)
        std = np.where(n > 1, np.sqrt(m2 / np.maximum(n - 1, 1)), np.nan)
        cv = np.where(mean != 0, std / mean, np.nan)
    return {f"{q}_mean{suffix}": mean, f"{q}_std{suffix}": std, f"{q}_cv{suffix}": cv,
            f"{q}_n{suffix}": n.astype(np.int64)}


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    """np.nanmean without the all-NaN warning (all-NaN gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis) if x.size else np.full(np.delete(x.shape, axis), np.nan)


def _nanquantile(x: np.ndarray, p: float) -> np.ndarray:
    """Quantile p over axis 0 ignoring NaN; NaN for columns with no value."""
    if x.shape[0] == 0:
        return np.full(x.shape[1:], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(x, p, axis=0)


def seed_field(name: str) -> str:
    """What the seed tool's ED is of for model `name`: "score" for the ELS-type machines (their backbone
    returns a score), "eps" for every network (a UNet's or ResNet's backbone returns its noise prediction).
    Built-in machine names cannot label another model (ComputeConfig reserves them)."""
    return "score" if name in MACHINE_NAMES else "eps"


def seed_factor(run: RunStore, name: str) -> np.ndarray:
    """(step,) float64: the seed tool's ED of model `name` is this times edtool's ed_fro. eps_hat = -sqrt(beta(t)) s
    (SPEC 2), so J_eps = -sqrt(beta(t)) J_s and ||J_eps - J_eps^T||_F = sqrt(beta(t)) ||J_s - J_s^T||_F."""
    if seed_field(name) == "score":
        return np.ones(run.nsteps)
    return beta(torch.from_numpy(np.asarray(run.time, dtype=np.float64))).sqrt().numpy()


def seed_step_stats(values: np.ndarray) -> tuple:
    """The seed's per-step mean and standard deviation (np.std: ddof 0) over realizations (rows), NaN values
    left out; NaN at a step without a value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step without a value (or no row): NaN
        return np.nanmean(values, axis=0), np.nanstd(values, axis=0, ddof=0)


def _seed_summary(run: RunStore, m: int, done: np.ndarray) -> dict:
    """The seed tool's summary_stats.json entry for model m, its formulas on its field: the mean over steps
    of the per-step means and of the per-step stds, the largest per-step mean; steps without a finite
    value are left out."""
    ed_fro = run.read("ed_fro", model=m)[done[:, m]].astype(np.float64)
    mean, std = seed_step_stats(ed_fro * seed_factor(run, run.models[m]))
    ok = np.isfinite(mean)
    if not ok.any():
        return {"mean_ed_magnitude": None, "std_ed_magnitude": None, "max_ed_magnitude": None}
    return {"mean_ed_magnitude": _num(mean[ok].mean()), "std_ed_magnitude": _num(std[ok].mean()),
            "max_ed_magnitude": _num(mean[ok].max())}


def _locality_align_summary(arrays: dict, m: int) -> tuple:
    """Model m's locality and alignment statistics for summary_stats.json: per step (loc_*: per step and
    radius) and, for those with one value per step (r90_*, align_*), the mean over all their values."""
    per_step, overall = {}, {}
    for q in LOCALITY_ALIGN_QUANTITIES:
        if f"{q}_mean" not in arrays:
            continue
        for stat in ("mean", "std", "median"):
            per_step[f"{q}_{stat}"] = _nested(arrays[f"{q}_{stat}"][m])
        per_step[f"{q}_n"] = np.asarray(arrays[f"{q}_n"][m]).tolist()
        if EXTRA_ARRAYS[q] == ("step",):
            n, mean = arrays[f"{q}_n"][m], arrays[f"{q}_mean"][m]
            overall[f"mean_{q}"] = _num(np.nansum(np.where(n > 0, mean * n, 0)) / n.sum()) if n.sum() else None
    return per_step, overall


def _summary(run: RunStore, done, arrays, moments, failed) -> dict:
    """summary_stats.json: the seed tool's keys per model, plus ours and the run-level facts."""
    def overall(q, m):
        n, mean, m2 = (v[m] for v in moments[q]["all"])
        return (_num(mean) if n else None), (_num(np.sqrt(m2 / (n - 1))) if n > 1 else None)

    summary = {}
    for m, name in enumerate(run.models):
        ed_mean, ed_std = overall("ed_fro", m)
        asym_mean, asym_std = overall("asym", m)
        ed_max = moments["ed_fro"]["max"][m]
        per_step = {"time": run.time.tolist(), "n": arrays["ed_fro_n"][m].tolist()}
        for q in ("ed_fro", "asym"):
            for stat in ("mean", "std", "median"):
                per_step[f"{q}_{stat}"] = [_num(v) for v in arrays[f"{q}_{stat}"][m]]
        for k in ("nasym_mean", "nasym_ratio_of_means"):
            per_step[k] = [_num(v) for v in arrays[k][m]]
        per_step_locality_align, overall_locality_align = _locality_align_summary(arrays, m)
        per_step.update(per_step_locality_align)
        summary[name] = {**_seed_summary(run, m, done), "num_realizations": int(done[:, m].sum()),
                         "field": seed_field(name), "mean_ed_fro": ed_mean, "std_ed_fro": ed_std,
                         "max_ed_fro": _num(ed_max) if np.isfinite(ed_max) else None, "num_failed": int(failed[m]),
                         "num_used": int(arrays["ed_fro_n_timeavg"][m]),
                         "mean_asym": asym_mean, "std_asym": asym_std,
                         "mean_jac_fro": overall("jac_fro", m)[0],
                         "nasym_mean_of_ratios": _num(arrays["nasym_mean_overall"][m]),
                         "nasym_ratio_of_means": _num(arrays["nasym_ratio_of_means_overall"][m]),
                         **overall_locality_align, "per_step": per_step}
    summary.update({"models": run.models, "estimator": run.config.get("estimator"),
                    "probes": run.config.get("probes"), "nsteps": run.nsteps,
                    "points": run.config.get("points", {"source": "trajectory"}),
                    "realizations_used": int(done.any(axis=1).sum()), "realizations_total": run.n_realizations,
                    "cells_done": int(done.sum()), "run": str(run.location), "edtool_version": __version__,
                    "definitions": DEFINITIONS})
    for key in ("locality", "align"):  # SPEC 12 settings, when the run measured them
        if run.config.get(key):
            summary[key] = run.config[key]
    return summary


def _nested(values) -> list:
    """A (nested) list of JSON numbers, None for NaN/inf."""
    values = np.asarray(values, dtype=np.float64)
    return [_nested(v) for v in values] if values.ndim > 1 else [_num(v) for v in values]


def _num(v):
    """A JSON number: float, or None for NaN/inf."""
    v = float(v)
    return v if np.isfinite(v) else None


def format_number(value) -> str:
    """A summary number as people read it: 4 significant digits; None (no finite value: every step
    failed) spelled out as NaN."""
    return "NaN" if value is None else f"{value:.4g}"


def write_aggregate(run: RunStore, arrays: dict, summary: dict):
    """Write `aggregate/*` into the store (replacing earlier ones) with dimension names for xarray, and
    last the digest of each array (store/integrity.py); until then the aggregate reads as absent."""
    group = run.group.require_group("aggregate")
    group.attrs.put({})  # an interrupted write leaves no aggregate that claims to be current
    digests = {}
    for name, value in arrays.items():
        dims = ("model", "step", "radius")[:value.ndim] if value.ndim > 1 else ("model",)
        dtype = "int64" if name.split("_timeavg")[0].endswith("_n") else "float32"
        fill = 0 if dtype == "int64" else np.nan
        new_array(group, name, value.shape, dims, dtype, fill, overwrite=True)[:] = value.astype(dtype)
        digests[name] = array_digest(name, value.astype(dtype))
    new_array(group, "model", (len(run.models),), ("model",), str, None, overwrite=True)[:] = np.array(run.models)
    new_array(group, "time", (run.nsteps,), ("step",), "float64", overwrite=True)[:] = run.time
    digests.update(model=array_digest("model", np.array(run.models)), time=array_digest("time", run.time))
    group.attrs.update({"cells_done": summary["cells_done"], "realizations_used": summary["realizations_used"],
                        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "ddof": 1, AGGREGATE_DIGESTS: digests})
    consolidate(run.group.store)


def read_aggregate(run: RunStore):
    """The stored aggregate arrays if they are up to date with the run's done cells and match their
    digests, else None (the caller computes them afresh). An aggregate without digests is read only
    in a run made before edtool kept them."""
    if "aggregate" not in run.group:
        return None
    group = run.group["aggregate"]
    if group.attrs.get("cells_done") != int(run.done_mask().sum()):
        return None
    names = [f"{q}_{s}{suffix}" for q in QUANTITIES for s in STATS for suffix in ("", "_timeavg")]
    names += [f"{q}_{s}" for q in LOCALITY_ALIGN_QUANTITIES if q in run.group for s in LOCALITY_ALIGN_STATS]
    digests = group.attrs.get(AGGREGATE_DIGESTS)
    if not all(name in group for name in names) or (run.integrity and not isinstance(digests, dict)):
        return None
    try:
        arrays = {name: np.asarray(group[name][:]) for name in names}
    except Exception:  # noqa: BLE001 (a damaged chunk or edited metadata: computed afresh)
        return None
    if isinstance(digests, dict) and any(array_digest(n, v) != digests.get(n) for n, v in arrays.items()):
        return None
    return arrays
