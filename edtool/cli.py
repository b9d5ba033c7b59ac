"""The `edtool` command line: a thin Typer layer over functions a notebook can call (SPEC 7).

Each command's options take their defaults and ranges from its settings dataclass (edtool.config), build
it, check it, and call the library. Bad input raises EdtoolError; `main` (edtool.console) prints it as
one line on stderr and exits 2 (no traceback unless --debug).
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from edtool.cli_networks import calibrate, import_checkpoint, sample, train
from edtool.cli_options import compute_option, name_list, settings_from
from edtool.config import ComputeConfig
from edtool.console import (print_aggregate, print_results_table, print_status, print_verify, print_warnings,
                            reporter, run_command_line, run_compute)
from edtool.errors import EdtoolError
from edtool.store.location import run_location
from edtool.store.urls import check_location

app = typer.Typer(
    name="edtool",
    help="Measure how far diffusion score fields are from conservative: the exterior derivative "
    "(antisymmetric part of the score Jacobian) along reverse-diffusion trajectories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: wraps to the terminal (or 80 columns in a pipe) and never truncates a flag's name,
    # which rich's option table does at 80 columns
    rich_markup_mode=None,
)

def _print_version(value: bool):
    if value:
        from edtool import __version__

        print(f"edtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """--debug is read by main() from sys.argv; declared here so that it shows in --help."""


def _shard(text: Optional[str]):
    if text is None:
        return None
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise EdtoolError(f"--shard must look like i/K (e.g. 0/4), got {text!r}") from None
    if not (k >= 1 and 0 <= i < k):
        raise EdtoolError(f"--shard {text}: need 0 <= i < K")
    return (i, k)


def _compute_config(params: dict, **given):
    """ComputeConfig from a command's parameters (compute() checks the settings); a --run-dir that cannot be
    written is refused here."""
    cfg = settings_from(ComputeConfig, params, **given)
    _refuse_memory_url(cfg.run_dir)
    if cfg.run_dir is not None:
        check_location(cfg.run_dir, writing=True)
    return cfg


def _refuse_memory_url(location):
    """memory:// lives only as long as one process: from the command line a run there would vanish
    at exit while the command reports success (the Python API keeps it, for notebooks and tests)."""
    if location is not None and str(location).lower().startswith("memory://"):
        raise EdtoolError(f"{location}: a memory:// store vanishes when edtool exits, so nothing would be kept; "
                          "use a directory or a persistent URL (file://, s3://, ...), or memory:// from Python")


# the commands for networks and machines live in edtool.cli_networks
app.command()(train)
app.command("import-checkpoint")(import_checkpoint)
app.command(context_settings={"allow_extra_args": True})(calibrate)
app.command()(sample)


@app.command()
def compute(
    ctx: typer.Context,
    dataset: str = compute_option("dataset", help="mnist5k (bundled), mnist, fashionmnist or cifar10."),
    data_root: Optional[Path] = compute_option("data_root", help="Data root in torchvision's layout."),
    models: str = compute_option("models", help="Comma-separated: unet, resnet, els, els-borders, els-circular, ls, "
                                 "is, or LABEL=SOURCE with SOURCE a diffusers folder, hf:ORG/NAME, "
                                 "py:package.module:attr or a checkpoint (docs/models.md)."),
    scheduler: Optional[Path] = compute_option("scheduler", help="Scheduler folder (scheduler_config.json) of a "
                                               "diffusers UNet2DModel folder given in --models."),
    unet: Optional[Path] = compute_option("unet", "--unet", "--unet_path", "--unet-path", help="UNet checkpoint, ours "
                                          "or a paper backbone_*.pt (default: found in ./checkpoints, "
                                          "$EDTOOL_CHECKPOINTS, shipped)."),
    resnet: Optional[Path] = compute_option("resnet", "--resnet", "--resnet_path", "--resnet-path", help="ResNet "
                                            "checkpoint, ours or a paper backbone_*.pt (default: found like --unet)."),
    scales: Optional[Path] = compute_option("scales", help="ELS scales: our calibration JSON or a paper scales_*.pt."),
    patch_size: int = compute_option("patch_size", help="ELS patch size when no calibrated scales exist."),
    max_samples: Optional[int] = compute_option("max_samples", "--max-samples", help="Give the machines only the first "
                                                "N training images (per class for conditional runs)."),
    nsteps: int = compute_option("nsteps", help="DDIM steps (the exterior derivative is measured at each)."),
    realizations: int = compute_option("realizations", help="Noise realizations (seeds seed, seed+1, ...)."),
    seed: int = compute_option("seed", help="Seed of the first realization."),
    label: Optional[int] = compute_option("label", help="Class label for conditional models (default: random per "
                                          "realization)."),
    estimator: str = compute_option("estimator", help="auto, exact, hutchinson or analytic (ELS machines)."),
    probes: int = compute_option("probes", help="Hutchinson probes per point (per round with --rtol)."),
    rtol: Optional[float] = compute_option("rtol", help="Add probes until the relative standard error of ED is below "
                                           "this."),
    maps: bool = compute_option("maps", "--maps", help="Also store curl maps (where in the image the rotation lives)."),
    save_points: bool = compute_option("save_points", "--save-points", help="Also store the point x of every "
                                       "measurement (array point), so any number can be recomputed independently."),
    trajectory: Optional[str] = typer.Option(None, help="own: each model follows its own DDIM path; shared: all "
                                             "measured on the reference model's path (default: own; shared with "
                                             "--align)."),
    reference: Optional[str] = compute_option("reference", help="Reference model for --trajectory shared (default: "
                                              "first)."),
    points: str = compute_option("points", help="trajectory: along DDIM paths; noised-data: at forward-noised held-out "
                                 "images at t = 1, (N-1)/N, ..., 1/N (QCSBM's protocol, see docs/measurements.md)."),
    held_out: Optional[str] = compute_option("held_out", help="Data set whose test split gives --points noised-data "
                                             "its images (default: the training set's; mnist for mnist5k)."),
    locality: bool = compute_option("locality", "--locality", help="Also store how local each score Jacobian is (see "
                                    "docs/locality.md): share of ||J||_F^2 within each pixel distance, and the radius "
                                    "r90 holding 90%."),
    locality_radius: Optional[int] = compute_option("locality_radius", help="Largest pixel distance of the locality "
                                                    "profile (default: half the image size)."),
    locality_method: str = compute_option("locality_method", help="auto (exact Jacobian when it fits in memory, else "
                                          "probes), exact or probe."),
    locality_pixels: int = compute_option("locality_pixels", help="Output pixels drawn by the locality probe "
                                          "estimator."),
    align: Optional[str] = compute_option("align", help="Also store the cosine between every model's score Jacobian "
                                          "and this model's at the same points, e.g. --align els (implies --trajectory "
                                          "shared unless --points noised-data)."),
    device: str = compute_option("device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    tf32: bool = compute_option("tf32", "--tf32", help="On CUDA, allow TF32 (faster, asym moves by ~1e-2; recorded)."),
    batch: int = compute_option("batch", help="Realizations processed together."),
    run: Optional[str] = compute_option("run", help="Run name under cache/ (default derived from the settings)."),
    run_dir: Optional[str] = compute_option("run_dir", help="Run directory or fsspec URL (overrides --run)."),
    overwrite: bool = compute_option("overwrite", "--overwrite", help="Discard an existing run with other settings."),
    retry_failed: bool = compute_option("retry_failed", "--retry-failed", help="Recompute finished cells that hold NaN "
                                        "(a failure, e.g. out of memory); other cells are kept."),
    shard: Optional[str] = typer.Option(None, help="i/K: compute only realizations r with r % K == i (job arrays)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable progress and summary."),
):
    """Run trajectories for realizations x models and stream the measurements into the run store (resumable)."""
    cfg = _compute_config(ctx.params, models=name_list(models), shard=_shard(shard),
                          trajectory=trajectory or ("shared" if align and points == "trajectory" else "own"))
    summary = run_compute(cfg, quiet, as_json)
    if summary.get("shard") and summary["shard"][0] != 0 and "RANK" in os.environ:
        return  # under torchrun, rank 0 reports
    if as_json:
        print(json.dumps({"event": "done", **summary, "results": print_results_table(summary["location"], True)}))
    elif not quiet:
        print_results_table(summary["location"])
        t = summary["timings"]
        print(f"time: total {t['total']:.1f}s (sampling {t['sampling']:.1f}s, jacobian {t['jacobian']:.1f}s, "
              f"store {t['store']:.2f}s); run stored in {summary['location']}")
    if not as_json:  # on stderr even with --quiet: these say a number is not what was asked for
        print_warnings(summary["failures"] + summary["warnings"])


@app.command()
def aggregate(
    run: str = typer.Argument(..., help="Run directory (or name under cache/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Reduce a run over its finished realizations into aggregate/* and summary_stats.json."""
    from edtool.study.aggregate import aggregate_run

    summary = aggregate_run(_resolve_run(run))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print_aggregate(summary, _resolve_run(run))


def _resolve_run(run: str) -> str:
    """The run a reading command was given (a path/URL, or a name under cache/), refused early when its
    location can never hold a run (edtool.store.urls.check_location)."""
    _refuse_memory_url(run)
    check_location(run, writing=False)
    return run_location(run, existing=True)


@app.command()
def plot(
    run: str = typer.Argument(..., help="Run directory (or name under cache/)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the figures (default: the run directory)."),
    fmt: str = typer.Option("png", "--format", help="png, pdf or svg."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files of the figures' names that edtool "
                                   "did not write (e.g. the seed tool's)."),
):
    """Render the figures of a run from its store alone (see docs/store.md)."""
    from edtool.study.plots import plot_run

    for path in plot_run(_resolve_run(run), out_dir=out, fmt=fmt, overwrite=overwrite):
        print(f"wrote {path}")


@app.command()
def analyze(
    ctx: typer.Context,
    dataset: str = compute_option("dataset", help="mnist5k (bundled), mnist, fashionmnist or cifar10."),
    single: bool = typer.Option(False, "--single", help="One realization (the default)."),
    multiple: Optional[int] = typer.Option(None, "--multiple", min=1, help="N noise realizations."),
    nsteps: int = compute_option("nsteps", help="DDIM steps."),
    output_dir: Path = typer.Option(Path("results/exterior_derivative"), "--output_dir", "--output-dir",
                                    help="Results folder; runs land in {output_dir}/{dataset}/..."),
    unet: Optional[Path] = compute_option("unet", "--unet_path", "--unet-path", "--unet", help="UNet checkpoint, ours "
                                          "or a paper backbone_*.pt (default: found in ./checkpoints, "
                                          "$EDTOOL_CHECKPOINTS, shipped)."),
    resnet: Optional[Path] = compute_option("resnet", "--resnet_path", "--resnet-path", "--resnet", help="ResNet "
                                            "checkpoint, ours or a paper backbone_*.pt."),
    scales: Optional[Path] = compute_option("scales", "--scales_path", "--scales-path", "--scales", help="ELS scales "
                                            "file."),
    models: str = compute_option("models", help="Models to compare."),
    data_root: Optional[Path] = compute_option("data_root", help="Data root in torchvision's layout."),
    max_samples: Optional[int] = compute_option("max_samples", "--max-samples", help="Give the machines only the first "
                                                "N training images (per class for conditional runs)."),
    seed: int = compute_option("seed", help="Seed of the first realization."),
    estimator: str = compute_option("estimator", help="auto, exact, hutchinson or analytic."),
    probes: int = compute_option("probes", help="Hutchinson probes per point."),
    maps: bool = compute_option("maps", "--maps", help="Also store and draw curl maps."),
    points: str = compute_option("points", help="trajectory, or noised-data: forward-noised held-out images at "
                                 "uniformly spaced t (QCSBM's protocol, see docs/measurements.md), in "
                                 ".../<layout>_noised_data/."),
    held_out: Optional[str] = compute_option("held_out", help="Data set whose test split gives --points noised-data "
                                             "its images (default: the training set's; mnist for mnist5k)."),
    device: str = compute_option("device", help="auto, cpu, cuda."),
    overwrite: bool = compute_option("overwrite", "--overwrite", help="Discard an existing run with other settings, "
                                     "and replace files of the figures' names that edtool did not write."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png, pdf or svg."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """compute + aggregate + plot in one go, with the seed tool's flags and folder layout."""
    from edtool.study.aggregate import aggregate_run
    from edtool.study.plots import check_figure_folder, plot_run
    from edtool.study.seed_files import check_seed_files_folder, export_seed_files

    if single and multiple:
        raise EdtoolError("use either --single or --multiple N, not both")
    layout = "multiple_realizations" if multiple is not None else "single_realization"
    if points == "noised-data":  # never the trajectory study's folder: a different run, not a changed setting
        layout += "_noised_data"
    run_dir = output_dir / dataset / layout
    cfg = _compute_config(ctx.params, models=name_list(models), realizations=multiple or 1, run_dir=str(run_dir))
    check_figure_folder(run_dir, fmt, overwrite, "--output_dir")  # before computing: the seed tool's figures
    check_seed_files_folder(run_dir, overwrite, "--output_dir")  # and its numeric files have these names
    summary = run_compute(cfg, quiet)
    t0 = time.perf_counter()
    aggregate_run(str(run_dir))
    t_agg = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = plot_run(str(run_dir), fmt=fmt, overwrite=overwrite)
    t_plot = time.perf_counter() - t0
    paths += export_seed_files(str(run_dir), overwrite=overwrite, flag="--output_dir")  # the seed's .pt files
    if quiet:
        print_warnings(summary["failures"] + summary["warnings"])
        return
    print_results_table(str(run_dir))
    t = summary["timings"]
    print(f"time: compute {t['total']:.1f}s (sampling {t['sampling']:.1f}s, jacobian {t['jacobian']:.1f}s, "
          f"store {t['store']:.2f}s), aggregate {t_agg:.2f}s, plot {t_plot:.1f}s")
    print(f"results in {run_dir}: ed.zarr, summary_stats.json, " + ", ".join(p.name for p in paths))
    print_warnings(summary["failures"] + summary["warnings"])


@app.command()
def demo(
    out: Path = typer.Option(Path("results/exterior_derivative_demo"), "--out", "--output_dir",
                             help="Folder for the demo's run store, summary and figures."),
    models: str = compute_option("models", help="Models to compare (the shipped checkpoints and ELS)."),
    nsteps: int = compute_option("nsteps", default=10, help="DDIM steps (fewer = quicker tour)."),
    seed: int = compute_option("seed", help="Seed of the initial noise."),
    device: str = compute_option("device", help="auto, cpu, cuda."),
):
    """A short guided tour on the bundled data and checkpoints that explains each number as it appears."""
    from rich.console import Console

    from edtool.study.demo import run_demo

    console = Console()
    run_demo(out, models=name_list(models), nsteps=nsteps, seed=seed, device=device,
             reporter=reporter(False, False), say=console.print)


@app.command()
def status(
    run: Optional[str] = typer.Argument(None, help="One run (directory or name); default: every run under cache/."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List runs and how complete each is (per model, and per shard)."""
    from edtool.store.status import run_status, find_runs

    locations = [_resolve_run(run)] if run else find_runs()
    rows = [run_status(loc) for loc in locations]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print_status(rows)


@app.command()
def verify(
    run: str = typer.Argument(..., help="Run directory (or name under cache/)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Check every chunk of a run (present, checksum, length) and name the damaged cells; exit 1 if any.

    Damaged cells are recomputed by rerunning the `edtool compute` that made the run (same settings);
    aggregate and plot refuse a run with damaged cells.
    """
    from edtool.store.status import verify_run

    report = verify_run(_resolve_run(run))
    if as_json:
        print(json.dumps(report, indent=2))
    if not print_verify(report, quiet=as_json):
        sys.exit(1)


# The commands in the order a user meets them (`edtool --help` lists them so: measuring first, then the
# tools for machines and networks), each with the line that list shows (click would cut the first sentence
# of the docstring at 80 columns).
COMMANDS = {
    "analyze": "compute + aggregate + plot, with the seed tool's flags",
    "demo": "a short guided tour on the bundled data and checkpoints",
    "compute": "measure along trajectories into a run store (resumable)",
    "aggregate": "reduce a run over realizations: summary_stats.json",
    "plot": "the figures of a run, from its store alone",
    "status": "runs, their settings, completion and damage",
    "verify": "read every chunk of a run; name damaged cells",
    "sample": "ELS / LS / IS samples, their agreement r with a network",
    "calibrate": "per-step ELS patch sizes against a trained network",
    "train": "train a UNet or ResNet, the paper's recipe (resumable)",
    "import-checkpoint": "convert a paper checkpoint without running code from it",
}
for _command in app.registered_commands:
    _command.name = _command.name or _command.callback.__name__.replace("_", "-")
    _command.short_help = COMMANDS[_command.name]
app.registered_commands.sort(key=lambda c: list(COMMANDS).index(c.name))


def main():
    """Console entry point: every error ends as one line (see edtool.console.run_command_line)."""
    run_command_line(app)
