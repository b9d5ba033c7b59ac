"""The `edtool` command line: a thin Typer layer over functions a notebook can call (SPEC 7).

Each command's options take their defaults and ranges from its settings dataclass (edtool.config), build
it, check it, and call the library. Bad input raises EdtoolError; `main` (edtool.console) prints it as
one line on stderr and exits 2 (no traceback unless --debug).
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from edtool.config import RANGES, CalibrateConfig, ComputeConfig, SampleConfig, TrainConfig, default
from edtool.console import (print_aggregate, print_results_table, print_status, print_verify, print_warnings,
                            progress_bar, reporter, run_command_line, run_compute)
from edtool.errors import EdtoolError
from edtool.fileio import check_output
from edtool.store.urls import check_location

app = typer.Typer(
    name="edtool",
    help="Measure how far diffusion score fields are from conservative: the exterior derivative "
    "(antisymmetric part of the score Jacobian) along reverse-diffusion trajectories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def _int_list(text: str, what: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise EdtoolError(f"{what} must be integers separated by commas, e.g. 32,64,128 (got {text!r})") from None


def _opt(settings, name: str, *flags, **kw):
    """An option whose default is the settings dataclass's (a list shown as 3,5,7) and whose range is
    edtool.config.RANGES' (Typer refuses a number outside as a usage error, before any work), so the
    command and the library agree (`default=` overrides the default, as demo's shorter tour does)."""
    value = kw.pop("default") if "default" in kw else default(settings, name)
    if isinstance(value, list):
        value = ",".join(map(str, value))
    least, most = RANGES.get(name, (None, None))
    return typer.Option(value, *flags, **{"min": least, "max": most, **kw})


def _T(name: str, *flags, **kw):
    return _opt(TrainConfig, name, *flags, **kw)


def _C(name: str, *flags, **kw):
    return _opt(ComputeConfig, name, *flags, **kw)


@app.command()
def train(
    ctx: typer.Context,
    arch: Optional[str] = typer.Option(None, help="Network architecture: unet or resnet (required unless --state "
                                       "holds a run)."),
    dataset: str = _T("dataset", help="Training data: mnist5k, mnist, fashionmnist, cifar10."),
    data_root: Optional[Path] = typer.Option(None, help="Data root in torchvision's layout (not needed for mnist5k)."),
    conditional: bool = _T("conditional", "--conditional", help="Class-conditional network."),
    padding: str = _T("padding", help="Convolution padding: zeros or circular."),
    steps: int = _T("steps", min=1, max=10**9, help="Optimizer steps (in all, counting those done)."),
    batch: int = _T("batch", max=1 << 20, help="Images per step."),
    lr: float = _T("lr", help="Initial AdamW learning rate."),
    lr_final_factor: float = _T("lr_final_factor", help="Learning rate at the last step as a fraction of --lr."),
    lr_gamma: Optional[float] = typer.Option(None, help="Per-step learning-rate factor instead of "
                                             "--lr-final-factor (the paper: 0.999965); such a run can be continued "
                                             "to more --steps."),
    ema_decay: float = _T("ema_decay", help="Ship the exponential moving average of the weights with this decay "
                          "(0: the raw weights)."),
    seed: int = _T("seed", help="Seed of every random choice in training."),
    fsizes: str = _T("fsizes", help="UNet channel widths per level."),
    emb_dim: int = _T("emb_dim", help="UNet time-embedding size."),
    width: int = _T("width", help="ResNet width (a multiple of 8, at least 16)."),
    layers: int = _T("layers", help="ResNet residual layers."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this edtool checkpoint's weights (same "
                                             "architecture) instead of random ones."),
    state: Optional[Path] = typer.Option(None, help="Keep the complete resumable state (safetensors + JSON) and "
                                         "the snapshots in this folder; if it holds a run, continue it (settings "
                                         "not given come from it): edtool train --state DIR --steps N."),
    snapshot_every: int = typer.Option(0, min=0, help="Every N steps record the moving average's loss on "
                                       "held-out digits and a sample grid in --state (0: never)."),
    held_out_root: Optional[Path] = typer.Option(None, help="Data root holding the test split for the snapshots' "
                                                 "held-out loss (mnist5k: MNIST t10k; default: --data-root)."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint path (default ./checkpoints/<dataset>_<arch>... in the "
                                       "working directory; with --state: none unless given)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint at the output path."),
    ckpt_every: int = typer.Option(250, min=1, help="Save resumable training state every N steps."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
):
    """Train a UNet or ResNet noise predictor with the paper's recipe; resumes if interrupted."""
    from edtool.networks import checkpoints, train_state
    from edtool.data import load_dataset
    from edtool.paths import cache_dir, local_checkpoints_dir
    from edtool.networks.train import default_name, train as run_training, work_dir_name

    given = {k for k in ctx.params if ctx.get_parameter_source(k).name == "COMMANDLINE"}  # typer vendors click
    settings = {k: v for k, v in ctx.params.items() if k in TrainConfig.__dataclass_fields__}
    settings["fsizes"] = _int_list(fsizes, "--fsizes")
    init = None
    if init_from is not None:
        net = checkpoints.load(init_from)
        init = net.net.state_dict()
        settings["init_from"] = checkpoints.file_hash(init_from.with_suffix(".safetensors"))
    previous = train_state.read(state) if state is not None else None
    if previous is not None:  # continue it: settings not given on the command line come from the state
        settings = {**settings, **previous["config"],
                    **{k: settings[k] for k in given if k in settings}}
        settings["steps"] = steps if "steps" in given else previous["config"].get("steps", previous["step"])
        if "init_from" not in given:
            init = None  # the state holds the weights
    if settings["arch"] is None:
        raise EdtoolError("--arch is required (unet or resnet), unless --state names a folder holding a run")
    cfg = TrainConfig(**settings).validate()  # before the data is loaded (train() checks it again)
    if init is not None and checkpoints.read_manifest(init_from.with_suffix(".safetensors"))["arch"] != cfg.arch:
        raise EdtoolError(f"--init-from {init_from} is not a {cfg.arch}; give a checkpoint of the same architecture")
    if out is None and state is None:
        out = local_checkpoints_dir() / default_name(cfg)
    if out is not None:
        out = Path(out).with_suffix(".safetensors")
        check_output([out, out.with_suffix(".json"), out.with_name(out.stem + "_loss.png"),
                      out.with_name(out.stem + "_samples.png")], force)
    images, labels = load_dataset(cfg.dataset, root=data_root)
    levels = 2 ** (len(cfg.fsizes) - 1)  # each UNet level halves the image: the sides must divide evenly
    if cfg.arch == "unet" and any(side % levels for side in images.shape[-2:]):
        raise EdtoolError(f"--fsizes with {len(cfg.fsizes)} levels halves the image {len(cfg.fsizes) - 1} times; "
                          f"{cfg.dataset}'s {images.shape[-2]}x{images.shape[-1]} images do not divide by {levels}: "
                          "give fewer widths")
    held_out = None
    if snapshot_every:
        if state is None:
            raise EdtoolError("--snapshot-every needs --state DIR (the snapshots are kept there)")
        name = "mnist" if cfg.dataset == "mnist5k" else cfg.dataset
        held_out = load_dataset(name, root=held_out_root or data_root, split="test", download=False)
    work = state if state is not None else cache_dir() / "train" / work_dir_name(out, cfg)
    command = "edtool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    progress = progress_bar(quiet)
    steps = cfg.steps
    every = max(1, steps // 100)
    kw = dict(ckpt_every=ckpt_every, command=command, init_weights=init, held_out=held_out,
              snapshot_every=snapshot_every)

    if progress is None:
        def log(step, loss, lr_now):
            if step % every == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss:.4f}  lr {lr_now:.2e}", flush=True)
        path = run_training(cfg, images, labels, out, work, log=log, **kw)
    else:
        with progress:
            task = progress.add_task(f"train {cfg.arch}", total=steps, info="")

            def log(step, loss, lr_now):
                progress.update(task, completed=step, info=f"loss {loss:.4f} lr {lr_now:.1e}")
            path = run_training(cfg, images, labels, out, work, log=log, **kw)
    if path is not None:
        print(f"wrote {path} (+ .json manifest, _loss.png, _samples.png)")
    if state is not None:
        print(f"training state at step {steps} in {state}; continue with: edtool train --state {state} --steps N")


@app.command("import-checkpoint")
def import_checkpoint(
    file: Path = typer.Argument(..., help="A paper checkpoint backbone_<DATASET>_<UNet|ResNet>_<mode>[_conditional].pt."),
    out: Optional[Path] = typer.Option(None, help="Output path (default ./checkpoints/<dataset>_<arch>..._paper."
                                       "safetensors in the working directory)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name for the manifest (default: read from the file name)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint at the output path."),
):
    """Convert a paper checkpoint (a pickled DDIM) into edtool's format, unpickling only known classes."""
    from edtool.networks.paper_import import import_checkpoint as run_import

    path = run_import(file, out=out, dataset=dataset, force=force)
    print(f"wrote {path} (+ .json manifest)")


# ------------------------------------------------------------------ calibrate and sample (edtool.els.calibrate)


def _network_and_data(cfg):
    """The checkpoint's network (ours, or a paper .pt imported on the fly) and its training data (the
    first max_samples images, per class for a conditional network: the seed tool's ELS max_samples)."""
    from edtool.data import first_samples, load_dataset
    from edtool.networks import discovery
    from edtool.study.prepare import resolve_device

    dev = resolve_device(cfg.device)
    net = discovery.load(cfg.checkpoint, dataset=cfg.dataset, device=dev, note=print)
    dataset = cfg.dataset or net.manifest.get("dataset") or "mnist5k"
    images, labels = load_dataset(dataset, root=cfg.data_root)
    shape = net.manifest.get("image_shape")
    if shape is not None and list(shape) != list(images.shape[1:]):
        raise EdtoolError(f"checkpoint {cfg.checkpoint} expects images of shape {list(shape)}, {dataset} has "
                          f"{list(images.shape[1:])}")
    images, labels = first_samples(images, labels, cfg.max_samples, per_class=net.conditional)
    return net, images.to(dev), labels.to(dev), dataset


def _K(name: str, *flags, **kw):
    return _opt(CalibrateConfig, name, *flags, **kw)


def _S(name: str, *flags, **kw):
    return _opt(SampleConfig, name, *flags, **kw)


def _settings(settings, params: dict, **given):
    """The settings dataclass from a command's parameters of the same names (and `given`), checked."""
    return settings(**{**{k: v for k, v in params.items() if k in settings.__dataclass_fields__}, **given}).validate()


@app.command(context_settings={"allow_extra_args": True})
def calibrate(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="Network checkpoint (.safetensors) to calibrate against."),
    machine: str = _K("machine", help="els-borders, els (follows the padding), els-circular or ls."),
    sizes: str = _K("sizes", help="Candidate odd patch sizes: --sizes 3 5 7 or 3,5,7."),
    seeds: int = _K("seeds", help="Number of seeds (trajectories), scored together."),
    seed: int = _K("seed", help="First seed."),
    nsteps: int = _K("nsteps", help="DDIM steps (one scale per step)."),
    metric: str = _K("metric", help="cosine (default) or l2 (relative distance)."),
    dataset: Optional[str] = _K("dataset", help="Training data of the machine (default: the checkpoint's)."),
    data_root: Optional[Path] = _K("data_root", help="Data root in torchvision's layout."),
    max_samples: Optional[int] = _K("max_samples", "--max-samples", "--n-images", help="Give the machines only the "
                                    "first N training images (per class for a conditional network)."),
    label: Optional[int] = _K("label", help="Class label for a conditional network (default: per seed)."),
    batch: Optional[int] = _K("batch", help="At most this many (step, seed) points per machine call."),
    device: str = _K("device", help="auto, cpu, cuda, cuda:N."),
    out: Optional[Path] = typer.Option(None, help="Scales JSON (default: ./checkpoints/<checkpoint stem>_scales_"
                                       "<machine>.json in the working directory, where compute finds it first)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing scales file at the output path."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
    merge: Optional[str] = typer.Option(None, help="Comma-separated scales JSONs of runs with disjoint --sizes "
                                        "(same checkpoint, seeds, steps): write the schedule of all their sizes, "
                                        "computing nothing."),
):
    """Calibrate an ELS machine's patch size per step against a network; writes a scales JSON (see docs/els.md)."""
    from edtool.diffusion import realization_seeds
    from edtool.els.calibrate import calibrate as run_calibration, calibration_meta, machine_kind
    from edtool.networks.checkpoints import file_hash
    from edtool.els.schedule import write_scales_json
    from edtool.networks.discovery import local_scales_path

    command = "edtool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    weights = Path(checkpoint) if Path(checkpoint).suffix == ".pt" else Path(checkpoint).with_suffix(".safetensors")
    if merge is not None:
        _merge_calibrations(merge, weights, out, force, command)
        return
    # --sizes 3 5 7: the rest arrive as extra args
    cfg = _settings(CalibrateConfig, ctx.params, sizes=_int_list(" ".join([sizes, *ctx.args]), "--sizes"))
    if out is not None:  # before the network and data are loaded (the default path needs the network)
        check_output([out], force)
    net, images, labels, dataset = _network_and_data(cfg)
    out = out or local_scales_path(checkpoint, machine_kind(machine, net))
    check_output([out], force)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    res = run_calibration(net, images, labels, machine=cfg.machine, sizes=cfg.sizes,
                          seeds=realization_seeds(cfg.seed, cfg.seeds), nsteps=cfg.nsteps, metric=cfg.metric,
                          batch=cfg.batch, label=cfg.label, log=log)
    path = write_scales_json(out, res["scales"], **calibration_meta(
        res, checkpoint=weights.name, checkpoint_sha256=file_hash(weights), dataset=dataset, command=command))
    print(f"schedule ({res['machine']}, t = 1/{nsteps} .. 1): {' '.join(map(str, res['scales']))}")
    print(f"wrote {path} ({res['seconds']['total']:.0f}s)")


def _merge_calibrations(merge: str, weights: Path, out: Optional[Path], force: bool, command: str) -> None:
    """calibrate --merge: one scales JSON from calibrations of disjoint sizes of this checkpoint."""
    from edtool.els.calibrate import calibration_meta, merge_calibrations
    from edtool.networks.checkpoints import file_hash
    from edtool.els.schedule import write_scales_json
    from edtool.networks.discovery import local_scales_path

    if not weights.is_file():
        raise EdtoolError(f"checkpoint {weights} does not exist")
    sha = file_hash(weights)
    parts, names = [], [p.strip() for p in merge.split(",") if p.strip()]
    for name in names:
        try:
            part = json.loads(Path(name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdtoolError(f"--merge {name}: cannot read it as a calibration JSON ({e})") from None
        if not isinstance(part, dict) or "sizes" not in part or "seconds" not in part:
            raise EdtoolError(f"--merge {name} is not a calibration written by edtool calibrate")
        if part.get("checkpoint_sha256") != sha:
            raise EdtoolError(f"--merge {name} was calibrated for other weights than {weights} (sha256 differs)")
        parts.append(part)
    res = merge_calibrations(parts, names)
    out = out or local_scales_path(weights, res["machine"])
    check_output([out], force)
    meta = calibration_meta(res, checkpoint=weights.name, command=command,
                            part_commands=[part.get("command") for part in parts])
    path = write_scales_json(out, res["scales"], **meta)
    print(f"schedule ({res['machine']}, sizes {' '.join(map(str, res['sizes']))}): {' '.join(map(str, res['scales']))}")
    print(f"wrote {path}")


@app.command()
def sample(
    ctx: typer.Context,
    machine: str = _S("machine", help="Comma-separated machines: els-borders, els, els-circular, ls, is."),
    checkpoint: Path = typer.Option(..., help="Network checkpoint whose samples the machines are compared with."),
    seeds: int = _S("seeds", help="Number of seeds."),
    seed: int = _S("seed", help="First seed."),
    out: Path = typer.Option(..., help="Output folder (seeds/, els_outputs/, network_outputs/, r2_summary.json)."),
    scales: Optional[Path] = _S("scales", help="Scales JSON or paper scales_*.pt (default: the calibration JSON "
                                "beside the checkpoint)."),
    patch_size: int = _S("patch_size", help="Fixed patch size when no scales are found."),
    nsteps: int = _S("nsteps", help="DDIM steps."),
    dataset: Optional[str] = _S("dataset", help="Training data of the machines (default: the checkpoint's)."),
    data_root: Optional[Path] = _S("data_root", help="Data root in torchvision's layout."),
    max_samples: Optional[int] = _S("max_samples", "--max-samples", "--n-images", help="Give the machines only the "
                                    "first N training images (per class for a conditional network)."),
    label: Optional[int] = _S("label", help="Class label for a conditional network (default: per seed)."),
    batch: Optional[int] = _S("batch", help="Seeds sampled together (default: all)."),
    device: str = _S("device", help="auto, cpu, cuda, cuda:N."),
    layout: str = _S("layout", help="Per-seed files: edtool (seed_<s>.npy) or paper (0000.pt ...: plain tensors, "
                     "as the paper's scripts write them)."),
    baseline: bool = _S("baseline", "--baseline/--no-baseline", help="Also sample the ideal score machine (is) "
                        "when not asked for, to report on how many seeds each machine beats it (the paper's "
                        "comparison)."),
    overwrite: bool = _S("overwrite", "--overwrite", help="Replace samples of other settings in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
):
    """Sample ELS/LS/IS machines and the network from the same seeds; agreement r and r^2 of each machine with the
    network (see docs/els.md)."""
    from edtool.diffusion import realization_seeds
    from edtool.els.calibrate import SETTINGS_NAME, agreement_report, machine_kind, sample as run_sample
    from edtool.networks.discovery import schedule_for

    cfg = _settings(SampleConfig, ctx.params, machine=_models(machine))
    check_output([out / SETTINGS_NAME], force=True)  # before any work: --out takes files (a folder, writable)
    net, images, labels, _ = _network_and_data(cfg)
    schedule, sources, notes = {}, {}, []
    for name in cfg.machine:
        kind = machine_kind(name, net)
        if kind != "is":
            schedule[kind], sources[kind] = schedule_for(kind, scales, [checkpoint], cfg.nsteps, cfg.patch_size,
                                                         notes)
    for line in notes:
        print(f"note: {line}")
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    summary = run_sample(cfg.machine, net, images, labels, realization_seeds(cfg.seed, cfg.seeds), nsteps=cfg.nsteps,
                         scales=schedule, out_dir=out, label=cfg.label, patch_size=cfg.patch_size, batch=cfg.batch,
                         scales_source=sources, log=log, baseline=cfg.baseline, overwrite=cfg.overwrite,
                         layout=cfg.layout)
    print(agreement_report(summary))
    print(f"wrote {out}/ (r2_summary.json, samples_grid.png)")


# ------------------------------------------------------------------ the pipeline commands


def _models(text: str) -> List[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


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
    """ComputeConfig from a command's parameters, checked; a --run-dir that cannot be written is refused too."""
    cfg = _settings(ComputeConfig, params, **given)
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


@app.command()
def compute(
    ctx: typer.Context,
    dataset: str = _C("dataset", help="mnist5k (bundled), mnist, fashionmnist or cifar10."),
    data_root: Optional[Path] = _C("data_root", help="Data root in torchvision's layout."),
    models: str = _C("models", help="Comma-separated: unet, resnet, els, els-borders, els-circular, ls, is, or "
                     "LABEL=SOURCE with SOURCE a diffusers folder, hf:ORG/NAME, py:package.module:attr or a "
                     "checkpoint (docs/models.md)."),
    scheduler: Optional[Path] = _C("scheduler", help="Scheduler folder (scheduler_config.json) of a diffusers "
                                   "UNet2DModel folder given in --models."),
    unet: Optional[Path] = _C("unet", "--unet", "--unet_path", "--unet-path", help="UNet checkpoint, ours or a "
                              "paper backbone_*.pt (default: found in ./checkpoints, $EDTOOL_CHECKPOINTS, shipped)."),
    resnet: Optional[Path] = _C("resnet", "--resnet", "--resnet_path", "--resnet-path", help="ResNet checkpoint, "
                                "ours or a paper backbone_*.pt (default: found like --unet)."),
    scales: Optional[Path] = _C("scales", help="ELS scales: our calibration JSON or a paper scales_*.pt."),
    patch_size: int = _C("patch_size", help="ELS patch size when no calibrated scales exist."),
    max_samples: Optional[int] = _C("max_samples", "--max-samples", help="Give the machines only the first N "
                                    "training images (per class for conditional runs)."),
    nsteps: int = _C("nsteps", help="DDIM steps (the exterior derivative is measured at each)."),
    realizations: int = _C("realizations", help="Noise realizations (seeds seed, seed+1, ...)."),
    seed: int = _C("seed", help="Seed of the first realization."),
    label: Optional[int] = _C("label", help="Class label for conditional models (default: random per realization)."),
    estimator: str = _C("estimator", help="auto, exact, hutchinson or analytic (ELS machines)."),
    probes: int = _C("probes", help="Hutchinson probes per point (per round with --rtol)."),
    rtol: Optional[float] = _C("rtol", help="Add probes until the relative standard error of ED is below this."),
    maps: bool = _C("maps", "--maps", help="Also store curl maps (where in the image the rotation lives)."),
    save_points: bool = _C("save_points", "--save-points", help="Also store the point x of every measurement "
                           "(array point), so any number can be recomputed independently."),
    trajectory: Optional[str] = typer.Option(None, help="own: each model follows its own DDIM path; shared: all "
                                             "measured on the reference model's path (default: own; shared with "
                                             "--align)."),
    reference: Optional[str] = _C("reference", help="Reference model for --trajectory shared (default: first)."),
    points: str = _C("points", help="trajectory: along DDIM paths; noised-data: at forward-noised held-out images "
                     "at t = 1, (N-1)/N, ..., 1/N (QCSBM's protocol, see docs/measurements.md)."),
    held_out: Optional[str] = _C("held_out", help="Data set whose test split gives --points noised-data its images "
                                 "(default: the training set's; mnist for mnist5k)."),
    locality: bool = _C("locality", "--locality", help="Also store how local each score Jacobian is (see "
                        "docs/locality.md): share of ||J||_F^2 within each pixel distance, and the radius r90 "
                        "holding 90%."),
    locality_radius: Optional[int] = _C("locality_radius", help="Largest pixel distance of the locality profile "
                                        "(default: half the image size)."),
    locality_method: str = _C("locality_method", help="auto (exact Jacobian when it fits in memory, else probes), "
                              "exact or probe."),
    locality_pixels: int = _C("locality_pixels", help="Output pixels drawn by the locality probe estimator."),
    align: Optional[str] = _C("align", help="Also store the cosine between every model's score Jacobian and this "
                              "model's at the same points, e.g. --align els (implies --trajectory shared unless "
                              "--points noised-data)."),
    device: str = _C("device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    batch: int = _C("batch", help="Realizations processed together."),
    run: Optional[str] = _C("run", help="Run name under cache/ (default derived from the settings)."),
    run_dir: Optional[str] = _C("run_dir", help="Run directory or fsspec URL (overrides --run)."),
    overwrite: bool = _C("overwrite", "--overwrite", help="Discard an existing run with other settings."),
    retry_failed: bool = _C("retry_failed", "--retry-failed", help="Recompute finished cells that hold NaN (a "
                            "failure, e.g. out of memory); other cells are kept."),
    shard: Optional[str] = typer.Option(None, help="i/K: compute only realizations r with r % K == i (job arrays)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable progress and summary."),
):
    """Run trajectories for realizations x models and stream the measurements into the run store (resumable)."""
    cfg = _compute_config(ctx.params, models=_models(models), shard=_shard(shard),
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
    """A run given as a path/URL, or as a name under cache/."""
    from edtool.paths import cache_dir

    _refuse_memory_url(run)
    check_location(run, writing=False)
    if "://" in run or Path(run).exists():
        return run
    candidate = cache_dir() / run
    if candidate.exists():
        return str(candidate)
    raise EdtoolError(f"no run {run!r} (neither a directory nor a name under {cache_dir()}); "
                      "`edtool status` lists runs")


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
    dataset: str = _C("dataset", help="mnist5k (bundled), mnist, fashionmnist or cifar10."),
    single: bool = typer.Option(False, "--single", help="One realization (the default)."),
    multiple: Optional[int] = typer.Option(None, "--multiple", min=1, help="N noise realizations."),
    nsteps: int = _C("nsteps", help="DDIM steps."),
    output_dir: Path = typer.Option(Path("results/exterior_derivative"), "--output_dir", "--output-dir",
                                    help="Results folder; runs land in {output_dir}/{dataset}/..."),
    unet: Optional[Path] = _C("unet", "--unet_path", "--unet-path", "--unet", help="UNet checkpoint, ours or a "
                              "paper backbone_*.pt (default: found in ./checkpoints, $EDTOOL_CHECKPOINTS, shipped)."),
    resnet: Optional[Path] = _C("resnet", "--resnet_path", "--resnet-path", "--resnet", help="ResNet checkpoint, "
                                "ours or a paper backbone_*.pt."),
    scales: Optional[Path] = _C("scales", "--scales_path", "--scales-path", "--scales", help="ELS scales file."),
    models: str = _C("models", help="Models to compare."),
    data_root: Optional[Path] = _C("data_root", help="Data root in torchvision's layout."),
    max_samples: Optional[int] = _C("max_samples", "--max-samples", help="Give the machines only the first N "
                                    "training images (per class for conditional runs)."),
    seed: int = _C("seed", help="Seed of the first realization."),
    estimator: str = _C("estimator", help="auto, exact, hutchinson or analytic."),
    probes: int = _C("probes", help="Hutchinson probes per point."),
    maps: bool = _C("maps", "--maps", help="Also store and draw curl maps."),
    points: str = _C("points", help="trajectory, or noised-data: forward-noised held-out images at uniformly "
                     "spaced t (QCSBM's protocol, see docs/measurements.md), in .../<layout>_noised_data/."),
    held_out: Optional[str] = _C("held_out", help="Data set whose test split gives --points noised-data its images "
                                 "(default: the training set's; mnist for mnist5k)."),
    device: str = _C("device", help="auto, cpu, cuda."),
    overwrite: bool = _C("overwrite", "--overwrite", help="Discard an existing run with other settings, and "
                         "replace files of the figures' names that edtool did not write."),
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
    cfg = _compute_config(ctx.params, models=_models(models), realizations=multiple or 1, run_dir=str(run_dir))
    check_figure_folder(run_dir, fmt, overwrite)  # before computing: the seed tool's figures have these names
    check_seed_files_folder(run_dir, overwrite)  # and its numeric files
    summary = run_compute(cfg, quiet)
    t0 = time.perf_counter()
    aggregate_run(str(run_dir))
    t_agg = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = plot_run(str(run_dir), fmt=fmt, overwrite=overwrite)
    t_plot = time.perf_counter() - t0
    paths += export_seed_files(str(run_dir), overwrite=overwrite)  # the seed tool's .pt files, from the store
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
    models: str = _C("models", help="Models to compare (the shipped checkpoints and ELS)."),
    nsteps: int = _C("nsteps", default=10, help="DDIM steps (fewer = quicker tour)."),
    seed: int = _C("seed", help="Seed of the initial noise."),
    device: str = _C("device", help="auto, cpu, cuda."),
):
    """A short guided tour on the bundled data and checkpoints that explains each number as it appears."""
    from rich.console import Console

    from edtool.study.demo import run_demo

    console = Console()
    run_demo(out, models=_models(models), nsteps=nsteps, seed=seed, device=device,
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


# The order a user meets the commands in (`edtool --help` lists them so): measuring first, then the
# tools for machines and networks.
COMMAND_ORDER = ("analyze", "demo", "compute", "aggregate", "plot", "status", "verify",
                 "sample", "calibrate", "train", "import-checkpoint")
app.registered_commands.sort(key=lambda c: COMMAND_ORDER.index(c.name or c.callback.__name__.replace("_", "-")))


def main():
    """Console entry point: every error ends as one line (see edtool.console.run_command_line)."""
    run_command_line(app)
