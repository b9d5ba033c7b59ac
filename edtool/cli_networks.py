"""The commands that make networks and run the ELS machines against them: train, import-checkpoint,
calibrate, sample (registered on the app by edtool.cli). Their options come from edtool.cli_options."""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from edtool.cli_options import (calibrate_option, command_line, dataset_option, given_on_command_line, int_list,
                                name_list, sample_option, settings_from, train_option)
from edtool.config import CalibrateConfig, SampleConfig, TrainConfig
from edtool.console import progress_bar
from edtool.errors import EdtoolError
from edtool.fileio import check_output


def train(
    ctx: typer.Context,
    arch: Optional[str] = typer.Option(None, help="Network architecture: unet or resnet (required unless --state "
                                       "holds a run)."),
    dataset: str = train_option("dataset", help="Training data: mnist5k, mnist, fashionmnist, cifar10."),
    data_root: Optional[Path] = typer.Option(None, help="Data root in torchvision's layout (not needed for mnist5k)."),
    conditional: bool = train_option("conditional", "--conditional", help="Class-conditional network."),
    padding: str = train_option("padding", help="Convolution padding: zeros or circular."),
    steps: int = train_option("steps", min=1, max=10**9, help="Optimizer steps (in all, counting those done)."),
    batch: int = train_option("batch", max=1 << 20, help="Images per step."),
    lr: float = train_option("lr", help="Initial AdamW learning rate."),
    lr_final_factor: float = train_option("lr_final_factor", help="Learning rate at the last step as a fraction of "
                                          "--lr."),
    lr_gamma: Optional[float] = typer.Option(None, help="Per-step learning-rate factor instead of "
                                             "--lr-final-factor (the paper: 0.999965); such a run can be continued "
                                             "to more --steps."),
    ema_decay: float = train_option("ema_decay", help="Ship the exponential moving average of the weights with this "
                                    "decay (0: the raw weights)."),
    seed: int = train_option("seed", help="Seed of every random choice in training."),
    fsizes: str = train_option("fsizes", help="UNet channel widths per level."),
    emb_dim: int = train_option("emb_dim", help="UNet time-embedding size."),
    width: int = train_option("width", help="ResNet width (a multiple of 8, at least 16)."),
    layers: int = train_option("layers", help="ResNet residual layers."),
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
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N; the random draws are "
                               "the same on every device."),
    time_limit: Optional[float] = typer.Option(None, min=0, help="Stop after this many seconds, saving the state at "
                                               "the step reached (for jobs with a wall-clock limit); rerun to go on."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
):
    """Train a UNet or ResNet noise predictor with the paper's recipe; resumes if interrupted."""
    from edtool.networks.train_job import training_job
    from edtool.device import resolve_device

    given = {k: ctx.params[k] for k in given_on_command_line(ctx) if k in TrainConfig.__dataclass_fields__}
    given.pop("init_from", None)  # a checkpoint's path: the settings record its sha256 (training_job)
    if "fsizes" in given:
        given["fsizes"] = int_list(fsizes, "--fsizes")
    device = resolve_device(device)
    job = ctx.with_resource(training_job(  # its state folder stays locked until the command ends
        given, state=state, init_from=init_from, out=out, force=force, data_root=data_root,
        held_out_root=held_out_root, snapshot_every=snapshot_every, command=command_line()))
    with training_progress(quiet, job.cfg) as log:
        path = job.run(device=device, log=log, ckpt_every=ckpt_every, time_limit_s=time_limit)
    if path is not None:
        print(f"wrote {path} (+ .json manifest, _loss.png, _samples.png)")
    reached, steps = job.reached(), job.cfg.steps
    if reached < steps:
        print(f"stopped at the time limit at step {reached} of {steps}; the state is saved: rerun the same command "
              "to go on")
    elif state is not None and job.cfg.lr_gamma is not None:
        print(f"training state at step {reached} in {state}; continue with: edtool train --state {state} --steps N "
              f"(any N above {reached})")
    elif state is not None:
        print(f"training state at step {reached} in {state}, the end of its learning-rate schedule "
              "(--lr-final-factor): it cannot be continued; a run started with --lr-gamma can be")


@contextmanager
def training_progress(quiet: bool, cfg: TrainConfig):
    """The `log(step, loss, lr)` of `edtool train`: None with --quiet, a progress bar on a terminal, else a
    line every 1% of the steps."""
    progress = progress_bar(quiet)
    if quiet:
        yield None
    elif progress is None:
        every = max(1, cfg.steps // 100)

        def log(step, loss, lr_now):
            if step % every == 0 or step == cfg.steps:
                print(f"step {step}/{cfg.steps}  loss {loss:.4f}  lr {lr_now:.2e}", flush=True)
        yield log
    else:
        with progress:
            task = progress.add_task(f"train {cfg.arch}", total=cfg.steps, info="")
            yield lambda step, loss, lr_now: progress.update(task, completed=step,
                                                             info=f"loss {loss:.4f} lr {lr_now:.1e}")


def import_checkpoint(
    file: Path = typer.Argument(..., help="A paper checkpoint backbone_<DATASET>_<UNet|ResNet>_<mode>[_conditional].pt."),
    out: Optional[Path] = typer.Option(None, help="Output path (default ./checkpoints/<dataset>_<arch>..._paper."
                                       "safetensors in the working directory)."),
    dataset: Optional[str] = typer.Option(None, callback=dataset_option, help="Dataset name for the manifest "
                                          "(default: read from the file name)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint at the output path."),
):
    """Convert a paper checkpoint (a pickled DDIM) into edtool's format, unpickling only known classes."""
    from edtool.networks.paper_import import import_checkpoint as run_import

    path = run_import(file, out=out, dataset=dataset, force=force)
    print(f"wrote {path} (+ .json manifest)")


# ------------------------------------------------------------------ calibrate and sample (edtool.els.calibrate, .sampling)


def _network_and_data(cfg):
    """The checkpoint's network (ours, or a paper .pt imported on the fly) and its training data (the
    first max_samples images, per class for a conditional network: the seed tool's ELS max_samples)."""
    from edtool.data import first_samples, load_dataset
    from edtool.networks import discovery
    from edtool.device import resolve_device

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


def calibrate(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="Network checkpoint (.safetensors) to calibrate against."),
    machine: str = calibrate_option("machine", help="els-borders, els (follows the padding), els-circular or ls."),
    sizes: str = calibrate_option("sizes", help="Candidate odd patch sizes: --sizes 3 5 7 or 3,5,7."),
    seeds: int = calibrate_option("seeds", help="Number of seeds (trajectories), scored together."),
    seed: int = calibrate_option("seed", help="First seed."),
    nsteps: int = calibrate_option("nsteps", help="DDIM steps (one scale per step)."),
    metric: str = calibrate_option("metric", help="cosine (default) or l2 (relative distance)."),
    dataset: Optional[str] = calibrate_option("dataset", help="Training data of the machine (default: the "
                                              "checkpoint's)."),
    data_root: Optional[Path] = calibrate_option("data_root", help="Data root in torchvision's layout."),
    max_samples: Optional[int] = calibrate_option("max_samples", "--max-samples", "--n-images", help="Give the "
                                                  "machines only the first N training images (per class for a "
                                                  "conditional network)."),
    label: Optional[int] = calibrate_option("label", help="Class label for a conditional network (default: per seed)."),
    batch: Optional[int] = calibrate_option("batch", help="At most this many (step, seed) points per machine call."),
    device: str = calibrate_option("device", help="auto, cpu, cuda, cuda:N."),
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
    from edtool.device import cuda_numerics

    command = command_line()
    weights = Path(checkpoint) if Path(checkpoint).suffix == ".pt" else Path(checkpoint).with_suffix(".safetensors")
    if merge is not None:
        _merge_calibrations(merge, weights, out, force, command)
        return
    # --sizes 3 5 7: the rest arrive as extra args
    cfg = settings_from(CalibrateConfig, ctx.params, sizes=int_list(" ".join([sizes, *ctx.args]), "--sizes")).validate()
    if out is not None:  # before the network and data are loaded (the default path needs the network)
        check_output([out], force)
    net, images, labels, dataset = _network_and_data(cfg)
    out = out or local_scales_path(checkpoint, machine_kind(machine, net))
    check_output([out], force)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    with cuda_numerics(images.device):  # on CUDA: no TF32, deterministic kernels, as compute measures
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


def sample(
    ctx: typer.Context,
    machine: str = sample_option("machine", help="Comma-separated machines: els-borders, els, els-circular, ls, is."),
    checkpoint: Path = typer.Option(..., help="Network checkpoint whose samples the machines are compared with."),
    seeds: int = sample_option("seeds", help="Number of seeds."),
    seed: int = sample_option("seed", help="First seed."),
    out: Path = typer.Option(..., help="Output folder (seeds/, els_outputs/, network_outputs/, r2_summary.json)."),
    scales: Optional[Path] = sample_option("scales", help="Scales JSON or paper scales_*.pt (default: the calibration "
                                           "JSON beside the checkpoint)."),
    patch_size: int = sample_option("patch_size", help="Fixed patch size when no scales are found."),
    nsteps: int = sample_option("nsteps", help="DDIM steps."),
    dataset: Optional[str] = sample_option("dataset", help="Training data of the machines (default: the "
                                           "checkpoint's)."),
    data_root: Optional[Path] = sample_option("data_root", help="Data root in torchvision's layout."),
    max_samples: Optional[int] = sample_option("max_samples", "--max-samples", "--n-images", help="Give the machines "
                                               "only the first N training images (per class for a conditional "
                                               "network)."),
    label: Optional[int] = sample_option("label", help="Class label for a conditional network (default: per seed)."),
    batch: Optional[int] = sample_option("batch", help="Seeds sampled together (default: all)."),
    device: str = sample_option("device", help="auto, cpu, cuda, cuda:N."),
    layout: str = sample_option("layout", help="Per-seed files: edtool (seed_<s>.npy) or paper (0000.pt ...: plain "
                                "tensors, as the paper's scripts write them)."),
    baseline: bool = sample_option("baseline", "--baseline/--no-baseline", help="Also sample the ideal score machine "
                                   "(is) when not asked for, to report on how many seeds each machine beats it (the "
                                   "paper's comparison)."),
    overwrite: bool = sample_option("overwrite", "--overwrite", help="Replace samples of other settings in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
):
    """Sample ELS/LS/IS machines and the network from the same seeds; agreement r and r^2 of each machine with the
    network (see docs/els.md)."""
    from edtool.diffusion import realization_seeds
    from edtool.els.agreement import agreement_report
    from edtool.els.calibrate import machine_kind
    from edtool.els.sample_folder import SETTINGS_NAME
    from edtool.els.sampling import sample as run_sample
    from edtool.device import cuda_numerics
    from edtool.networks.discovery import schedule_for

    cfg = settings_from(SampleConfig, ctx.params, machine=name_list(machine)).validate()
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
    with cuda_numerics(images.device):  # on CUDA: no TF32, deterministic kernels, as compute measures
        summary = run_sample(cfg.machine, net, images, labels, realization_seeds(cfg.seed, cfg.seeds),
                             nsteps=cfg.nsteps, scales=schedule, out_dir=out, label=cfg.label,
                             patch_size=cfg.patch_size, batch=cfg.batch, scales_source=sources, log=log,
                             baseline=cfg.baseline, overwrite=cfg.overwrite, layout=cfg.layout)
    print(agreement_report(summary))
    print(f"wrote {out}/ (r2_summary.json, samples_grid.png)")


# ------------------------------------------------------------------ the pipeline commands
