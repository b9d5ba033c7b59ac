"""How each figure of a run looks (SPEC 9, 12): one function per figure, from the run's numbers and its
aggregate to a matplotlib Figure; every model keeps one color everywhere. `plots` decides which
figures a run gets and writes them.

Figures are built with matplotlib's object API (no pyplot, no global backend switch), so this
works headless and never disturbs a notebook's backend.
"""

import warnings
import zlib

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from edtool.store.runstore import RunStore

MODEL_COLORS = {"unet": "#1f77b4", "resnet": "#ff7f0e", "els": "#2ca02c", "els-borders": "#8c564b",
                "els-circular": "#9467bd", "ls": "#d62728", "is": "#7f7f7f"}
_SPARE_COLORS = ("#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939")

TIME_LABEL = "diffusion time t (1 = noise → 0 = data)"
# J = ds/dx of the score s = grad log p(x) has the units of 1 / x^2, x being pixel values in [-1, 1]
UNIT = "per pixel value squared, pixels in [−1, 1]"
ED_LABEL = r"ED $=\|J - J^\top\|_F$ of the score" + f"\n({UNIT})"
ASYM_LABEL = r"asym $=\|J - J^\top\|_F \,/\, (2\,\|J\|_F)$" + "\n(0 = gradient field, 1 = pure rotation)"
CV_LABEL = "coefficient of variation of ED (std / mean, unitless)"


def model_color(name: str) -> str:
    """The fixed color of a model; unknown names get a stable spare color."""
    return MODEL_COLORS.get(name, _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)])


def _time_axis(ax):
    """t runs from 1 (noise) on the left to 0 (data) on the right, as the reverse process does."""
    ax.set_xlim(1.0, 0.0)
    ax.set_xlabel(TIME_LABEL)
    ax.grid(alpha=0.3)


def _noised_data(run: RunStore) -> bool:
    """Whether the run measured at forward-noised held-out images (--points noised-data, SPEC 13)."""
    return run.config.get("points", {}).get("source") == "noised-data"


def _realization_title(run: RunStore, r: int) -> str:
    label = int(run.labels[r])
    image = f", held-out image {run.config['points']['indices'][r]}" if _noised_data(run) else ""
    return f"realization {r} (seed {int(run.seeds[r])}{image}{'' if label < 0 else f', label {label}'})"


def _legend(ax, **kw):
    """A legend only where something was labeled (an empty legend warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", **kw)


def _off_log(values) -> str:
    """A legend note for a curve a log axis cannot show (all values zero or negative)."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return " (all 0: not on a log axis)" if finite.size and (finite <= 0).all() else ""


def _log_scale_if_possible(ax, values) -> bool:
    """Log y axis when there is positive data; otherwise say so on the panel."""
    values = np.asarray(values, dtype=float)
    if np.any(np.isfinite(values) & (values > 0)):
        ax.set_yscale("log")
        return True
    ax.text(0.5, 0.5, "no positive values to show on a log scale", ha="center", va="center",
            transform=ax.transAxes, color="gray")
    return False


# ------------------------------------------------------------------ single realization


def single_figure(run: RunStore, done: np.ndarray, r: int) -> Figure:
    """ED vs time (linear and log), mean ED per model as bars, and the final image of each model."""
    models = [m for m in range(len(run.models)) if done[r, m]]
    ed = run.read("ed_fro", realizations=[r])[0]  # (M, N)
    stderr = run.read("ed_stderr", realizations=[r])[0]  # 0 where exact or analytic, > 0 with random probes
    fig = Figure(figsize=(16, 9), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.3, 1])
    ax_lin, ax_log, ax_bar = (fig.add_subplot(grid[0, i]) for i in range(3))
    for m in models:
        name = run.models[m]
        probed = bool(np.nan_to_num(stderr[m]).max() > 0)
        label = name + (" (bars: ±1 standard error of the probes)" if probed else "")
        for ax, note in ((ax_lin, ""), (ax_log, _off_log(ed[m]))):
            ax.errorbar(run.time, ed[m], yerr=np.nan_to_num(stderr[m]) if probed else None, marker="o", ms=3,
                        capsize=3, color=model_color(name), label=label + note)
    where = "at the noised held-out image" if _noised_data(run) else "along the reverse process"
    # a linear axis is ruled by the steps nearest the data, where ED is largest (the seed tool's plot too)
    for ax, title in ((ax_lin, f"ED {where}\n(linear scale: the steps nearest the data dominate)"),
                      (ax_log, "ED, log scale (every step readable)")):
        _time_axis(ax)
        ax.set_ylabel(ED_LABEL)
        ax.set_title(title)
        _legend(ax, loc="upper left")  # ED grows towards the data, on the right
    _log_scale_if_possible(ax_log, ed[models])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model whose steps all failed
        means = [np.nanmean(ed[m]) for m in models]
    names = [run.models[m] for m in models]
    bars = ax_bar.bar(names, np.nan_to_num(means, nan=0.0), color=[model_color(n) for n in names])
    for bar, value in zip(bars, means):
        ax_bar.annotate("failed" if np.isnan(value) else f"{value:.3g}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize="small")
    ax_bar.set_ylabel(r"mean over steps of $\|J - J^\top\|_F$" + f"\n({UNIT})")
    ax_bar.set_xlabel("model")
    ax_bar.set_title("mean ED per model")
    if len(names) < 3:  # keep one or two bars from filling the panel
        ax_bar.set_xlim(-1, len(names))
    ax_bar.grid(axis="y", alpha=0.3)

    image_grid = grid[1, :].subgridspec(1, len(run.models))
    for m, name in enumerate(run.models):
        ax = fig.add_subplot(image_grid[0, m])
        missing = np.full(run.image_shape, np.nan)
        _show_image(ax, run.read("final", model=m, realizations=[r])[0] if done[r, m] else missing)
        ax.set_title(f"{name}: {'held-out image x_0' if _noised_data(run) else 'final image'}",
                     color=model_color(name), fontsize="medium")
    fig.suptitle(f"Exterior derivative of the score, {_realization_title(run, r)}", fontsize="x-large")
    return fig


def _show_image(ax, image: np.ndarray):
    """A generated (C, H, W) image in [-1, 1] shown as [0, 1] gray or RGB; a note when it is all NaN."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_box_aspect(image.shape[1] / image.shape[2])  # the "not computed" placeholder keeps the shape
    if not np.isfinite(image).any():
        ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    shown = np.clip((np.nan_to_num(image, nan=0.0) + 1) / 2, 0, 1)
    if shown.shape[0] == 3:
        ax.imshow(shown.transpose(1, 2, 0))
    else:
        ax.imshow(shown[0], cmap="gray", vmin=0, vmax=1)


# ------------------------------------------------------------------ many realizations


def aggregated_figure(run: RunStore, done: np.ndarray, agg: dict) -> Figure:
    """Mean +- std over realizations, CV, summary bars, and one heatmap (realizations x steps) per model."""
    fig = Figure(figsize=(16, 10), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.1])
    ax_mean, ax_cv, ax_sum = (fig.add_subplot(grid[0, i]) for i in range(3))
    models = [m for m in range(len(run.models)) if done[:, m].any()]
    _mean_and_cv(ax_mean, ax_cv, run, models, agg)
    _summary_bars(ax_sum, [run.models[m] for m in models], agg["ed_fro_mean_timeavg"][models],
                  agg["ed_fro_std_timeavg"][models])
    _realization_heatmaps(fig, grid[1, :], run, done, models)
    used = int(done.any(axis=1).sum())
    fig.suptitle(f"Exterior derivative of the score over {used} of {run.n_realizations} realizations",
                 fontsize="x-large")
    return fig


def _mean_and_cv(ax_mean, ax_cv, run: RunStore, models: list, agg: dict) -> None:
    """ED's mean +- std over realizations per step, and its coefficient of variation."""
    for m in models:
        name = run.models[m]
        color = model_color(name)
        n_max = int(agg["ed_fro_n"][m].max())
        ax_mean.errorbar(run.time, agg["ed_fro_mean"][m], yerr=np.nan_to_num(agg["ed_fro_std"][m]), marker="o",
                         ms=3, capsize=3, color=color, label=f"{name} (n = {n_max}){_off_log(agg['ed_fro_mean'][m])}")
        undefined = "" if np.isfinite(agg["ed_fro_cv"][m]).any() else " (undefined: mean 0 or n < 2)"
        ax_cv.plot(run.time, agg["ed_fro_cv"][m], marker="o", ms=3, color=color, label=name + undefined)
    for ax, title, label in ((ax_mean, "mean ED over realizations, bars = ±1 std", ED_LABEL),
                             (ax_cv, "variability across realizations", CV_LABEL)):
        _time_axis(ax)
        ax.set_ylabel(label)
        ax.set_title(title)
        _legend(ax)
    if _log_scale_if_possible(ax_mean, agg["ed_fro_mean"][models]):  # ED spans decades over t
        ax_mean.set_title("mean ED over realizations (log scale), bars = ±1 std")


def _summary_bars(ax, names: list, mean: np.ndarray, std: np.ndarray) -> None:
    """Time-averaged ED per model: its mean and its std over realizations side by side, each labelled."""
    x = np.arange(len(names))
    colors = [model_color(n) for n in names]
    for offset, values, style in ((-0.2, mean, {}), (0.2, std, {"alpha": 0.45, "hatch": "//"})):
        bars = ax.bar(x + offset, np.nan_to_num(values), 0.4, color=colors, **style)
        for bar, value in zip(bars, values):
            ax.annotate("n/a" if np.isnan(value) else f"{value:.3g}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(x, names)
    ax.set_xlabel("model")
    ax.set_ylabel(r"time-averaged $\|J - J^\top\|_F$" + f"\n({UNIT})")
    ax.set_title("mean and std over realizations")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Patch(color="0.35", label="mean"), Patch(facecolor="0.35", alpha=0.45, hatch="//",
              label="std (spread between realizations)")], fontsize="small")


def _realization_heatmaps(fig: Figure, cell, run: RunStore, done: np.ndarray, models: list) -> None:
    """One heatmap of ED per model (realizations x steps) on a shared colour scale; gray where not done."""
    heat = cell.subgridspec(1, len(models))
    slabs = [np.where(done[:, m, None], run.read("ed_fro", model=m), np.nan) for m in models]
    norm, floor = _shared_norm(np.concatenate([s.ravel() for s in slabs]))
    dt = 1.0 / run.nsteps
    extent = [run.time[0] + dt / 2, run.time[-1] - dt / 2, run.n_realizations - 0.5, -0.5]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray", under="white")
    image, heat_axes = None, []
    for i, (m, slab) in enumerate(zip(models, slabs)):
        ax = fig.add_subplot(heat[0, i])
        heat_axes.append(ax)
        shown = slab if floor is None else np.where(slab <= 0, floor, slab)  # zeros: "under" color, not NaN
        image = ax.imshow(shown, aspect="auto", interpolation="nearest", extent=extent, norm=norm, cmap=cmap)
        if np.isfinite(slab).any() and (slab[np.isfinite(slab)] == 0).all():
            ax.text(0.5, 0.5, "ED = 0 at every step", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{run.models[m]}: ED per realization", color=model_color(run.models[m]), fontsize="medium")
        ax.set_xlabel("t (1 = noise → 0 = data)")
        ax.set_ylabel("realization" if i == 0 else "")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar = fig.colorbar(image, ax=heat_axes, label=ED_LABEL, shrink=0.9, extend="min" if floor else "neither")
    bar.ax.set_title("gray: not\ndone/failed" + ("\nwhite: 0" if floor else ""), fontsize="x-small")


def _shared_norm(values: np.ndarray):
    """One color scale for all heatmaps, logarithmic over the positive values when there are any.

    Returns (norm, floor): with a log scale, values <= 0 (an exactly conservative model) are drawn
    at `floor`, below the scale, in the colormap's "under" color; floor is None for a linear scale.
    """
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size and positive.max() > positive.min():
        lo = positive.min()
        return LogNorm(lo, positive.max()), (lo / 10 if (finite <= 0).any() else None)
    if finite.size == 0:
        return Normalize(0, 1), None
    lo, hi = finite.min(), finite.max()
    return Normalize(lo, hi if hi > lo else lo + 1), None


# ------------------------------------------------------------------ asym and curl maps


def asym_figure(run: RunStore, done: np.ndarray, agg: dict, r: int) -> Figure:
    """asym over time: mean with a ±1 std band over realizations (a single line for one realization)."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for m, name in enumerate(run.models):
        if not done[:, m].any():
            continue
        color, n_max = model_color(name), int(agg["asym_n"][m].max())
        mean, std = agg["asym_mean"][m], agg["asym_std"][m]
        ax.plot(run.time, mean, marker="o", ms=3, color=color, label=f"{name} (n = {n_max})")
        if n_max >= 2:
            ax.fill_between(run.time, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    _time_axis(ax)
    ax.set_ylabel(ASYM_LABEL)
    top = np.nanmax(np.r_[agg["asym_mean"].ravel() + np.nan_to_num(agg["asym_std"].ravel()), 0])
    ax.set_ylim(0, min(1.0, 1.1 * top) if top > 0 else 1.0)
    used = int(done.any(axis=1).sum())
    ax.set_title("non-conservativeness of the score, " + (_realization_title(run, r) if used == 1 else
                 f"mean ± 1 std over {used} realizations"))
    _legend(ax)
    return fig


def curl_figure(run: RunStore, done: np.ndarray, r: int, max_steps: int = 6) -> Figure:
    """Curl maps of one realization: rows = models, columns = a few steps from noise to data.

    Each panel is divided by its own maximum (printed above it): the magnitude changes by orders
    across t, the shape is what the map shows.
    """
    models = [m for m in range(len(run.models)) if done[r, m]]
    steps = np.unique(np.linspace(0, run.nsteps - 1, min(max_steps, run.nsteps)).round().astype(int))
    fig = Figure(figsize=(2.1 * len(steps) + 1.2, 2.2 * len(models) + 0.8), layout="constrained")
    axes = fig.subplots(len(models), len(steps), squeeze=False)
    image = None
    for row, m in enumerate(models):
        maps = run.read("curl_map", model=m, realizations=[r])[0]  # (N, H, W)
        for col, j in enumerate(steps):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            peak = np.nanmax(maps[j]) if np.isfinite(maps[j]).any() else np.nan
            if np.isfinite(peak) and peak > 0:
                image = ax.imshow(maps[j] / peak, cmap="magma", vmin=0, vmax=1)
                ax.set_title(f"t = {run.time[j]:.2f}, max {peak:.2g}", fontsize="small")
            else:
                ax.set_title(f"t = {run.time[j]:.2f}", fontsize="small")
                ax.text(0.5, 0.5, "all zero" if peak == 0 else "no data", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
            if col == 0:
                ax.set_ylabel(run.models[m], color=model_color(run.models[m]), fontsize="large")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="$r_p$ / max over the image")
    fig.suptitle(r"curl maps $r_p = \|(J - J^\top)[p,:]\|_2$: where in the image the rotation lives, "
                 + _realization_title(run, r))
    return fig


# ------------------------------------------------------------------ SPEC 12: locality and alignment

R90_LABEL = "effective radius r90 [pixels]\n(smallest pixel distance holding 90 % of the Jacobian's energy)"
LOC_LABEL = r"share of the squared Frobenius norm within distance $\leq r$"


def patch_half_widths(run: RunStore, name: str):
    """(k - 1)/2 of an ELS machine's patch size at each stored step, as compute recorded it (calibrated
    scales or the fixed patch size); None for networks and the `is` machine (the whole image)."""
    half = (run.config.get("locality") or {}).get("patch_half_width", {}).get(name)
    return None if half is None else np.asarray(half, dtype=float)


def _step_line(ax, time, values, **kw):
    """A per-step value drawn as a step line: each value holds over its step's width in t."""
    dt = 1.0 / len(time)
    edges = np.r_[time + dt / 2, time[-1] - dt / 2]
    ax.stairs(values, edges, baseline=None, **kw)


def r90_figure(run: RunStore, done: np.ndarray, agg: dict) -> Figure:
    """r90 of J and of J - J^T vs t per model (median over realizations, 5-95 % band), with each ELS
    machine's calibrated patch half-width (k - 1)/2 as a step line."""
    R = int(run.radius[-1])
    fig = Figure(figsize=(14, 5.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, q, what in ((axes[0], "r90_jac", r"the score Jacobian $J$"),
                        (axes[1], "r90_ed", r"its antisymmetric part $J - J^\top$")):
        for m, name in enumerate(run.models):
            if not done[:, m].any():
                continue
            color = model_color(name)
            med, lo, hi, n = agg[f"{q}_median"][m], agg[f"{q}_q05"][m], agg[f"{q}_q95"][m], agg[f"{q}_n"][m]
            # r90 is NaN when the profile never reaches 90 % within R, or is undefined (zero energy)
            last = run.read(q.replace("r90", "loc"), model=m)[done[:, m], :, -1]  # (realizations, step)
            beyond = np.flatnonzero((last < 0.9).any(axis=0))
            note = "" if np.isfinite(med).any() or beyond.size else " (undefined: zero energy)"
            ax.plot(run.time, med, marker="o", ms=3, color=color, label=f"{name} (n = {int(n.max())}){note}")
            if n.max() >= 2:
                ax.fill_between(run.time, lo, hi, color=color, alpha=0.15, linewidth=0)
            if beyond.size:
                ax.plot(run.time[beyond], np.full(beyond.size, R + 0.5), "^", color=color, ms=6,
                        label=f"{name}: r90 > {R} in some realizations")
            half = patch_half_widths(run, name)
            if half is not None:
                _step_line(ax, run.time, half, color=color, linestyle="--", linewidth=1.5,
                           label=f"{name}: calibrated patch half-width (k-1)/2")
        _time_axis(ax)
        ax.set_title(f"how far {what} reaches")
        _legend(ax)
    axes[0].set_ylabel(R90_LABEL)
    top = max([line.get_ydata().max() for ax in axes for line in ax.lines if np.isfinite(line.get_ydata()).any()]
              + [1.0], key=lambda v: np.nan_to_num(v))
    axes[0].set_ylim(-0.5, min(R + 1, np.nanmax([top, 1.0]) + 1.5))  # the shared y axis, fitted to what is drawn
    used = int(done.any(axis=1).sum())
    fig.suptitle("Locality of the score: an output pixel depends on input pixels within r90 (Chebyshev distance); "
                 f"median over {used} realization(s), band 5-95 %", fontsize="large")
    return fig


def profile_figure(run: RunStore, done: np.ndarray, agg: dict) -> Figure:
    """The mean locality profile as a heatmap (t x radius) per model, for J and J - J^T; white line:
    where 90 % is reached; dashed: the machine's patch half-width."""
    models = [m for m in range(len(run.models)) if done[:, m].any()]
    fig = Figure(figsize=(3.6 * len(models) + 1.5, 7.5), layout="constrained")
    axes = fig.subplots(2, len(models), squeeze=False, sharex=True, sharey=True)
    R = int(run.radius[-1])
    dt = 1.0 / run.nsteps
    extent = [-0.5, R + 0.5, run.time[-1] - dt / 2, run.time[0] + dt / 2]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    image = None
    for col, m in enumerate(models):
        name = run.models[m]
        for row, (q, what) in enumerate((("loc_jac", "J"), ("loc_ed", "J - J^T"))):
            ax = axes[row, col]
            mean = agg[f"{q}_mean"][m]  # (step, radius)
            image = ax.imshow(mean, aspect="auto", origin="upper", extent=extent, vmin=0, vmax=1, cmap=cmap,
                              interpolation="nearest")
            r90 = np.array([np.argmax(v >= 0.9) if (v >= 0.9).any() else np.nan for v in mean])
            ax.plot(r90, run.time, "o-", color="white", ms=3, linewidth=1, label="r90: 90 % reached")
            half = patch_half_widths(run, name)
            if half is not None:
                ax.plot(half, run.time, "s--", color="red", ms=3, linewidth=1, label="calibrated patch half-width (k-1)/2")
            if not np.isfinite(mean).any():
                ax.text(0.5, 0.5, "undefined\n(J - J^T = 0)" if q == "loc_ed" else "no data", ha="center",
                        va="center", transform=ax.transAxes)
            ax.set_title(f"{name}: ${what}$", color=model_color(name), fontsize="medium")
            ax.set_xlabel("pixel distance r (Chebyshev)" if row == 1 else "")
            if col == 0:
                ax.set_ylabel("t (1 = noise → 0 = data)")
            if row == 0 and col == 0:
                _legend(ax, loc="lower right")
    fig.colorbar(image, ax=axes, label=LOC_LABEL + "  (mean over realizations)", shrink=0.85)
    fig.suptitle("Locality profile: how much of the Jacobian's energy lies within distance r of the output pixel",
                 fontsize="large")
    return fig


def alignment_figure(run: RunStore, done: np.ndarray, agg: dict) -> Figure:
    """align_jac and align_ed vs t per model (mean, ±1 std band over realizations)."""
    ref = run.config["align"]["reference"]
    fig = Figure(figsize=(14, 5.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, q, what in ((axes[0], "align_jac", r"Jacobians $J$"),
                        (axes[1], "align_ed", r"antisymmetric parts $J - J^\top$")):
        for m, name in enumerate(run.models):
            if not done[:, m].any():
                continue
            color, n = model_color(name), agg[f"{q}_n"][m]
            mean, std = agg[f"{q}_mean"][m], agg[f"{q}_std"][m]
            note = "" if np.isfinite(mean).any() else " (undefined: a symmetric Jacobian has no rotation)"
            ax.plot(run.time, mean, marker="o", ms=3, color=color,
                    label=f"{name}{' (the reference)' if name == ref else ''} (n = {int(n.max())}){note}")
            if n.max() >= 2:
                ax.fill_between(run.time, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.axhline(0, color="gray", linewidth=0.8)
        _time_axis(ax)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"cosine between the {what} of each model and of {ref}")
        _legend(ax)
    axes[0].set_ylabel(r"alignment $\langle A, B\rangle_F / (\|A\|_F \|B\|_F)$" + "\n(1 = same linearization up to "
                       "scale, 0 = unrelated, -1 = opposite)")
    used = int(done.any(axis=1).sum())
    fig.suptitle(f"Alignment with {ref} at the same points (shared trajectory), mean ± 1 std over {used} "
                 "realization(s)", fontsize="large")
    return fig
