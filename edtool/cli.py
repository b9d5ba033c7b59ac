"""The `edtool` command line: a thin Typer layer over functions a notebook can call (SPEC 7).

Bad input raises EdtoolError; `main` prints it as one line on stderr and exits 2 (no traceback
unless --debug).
"""

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from edtool.errors import EdtoolError

app = typer.Typer(
    name="edtool",
    help="Measure how far diffusion score fields are from conservative: the exterior derivative "
    "(antisymmetric part of the score Jacobian) along reverse-diffusion trajectories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _progress(quiet: bool = False):
    """A rich progress display on a terminal; None (plain log lines) otherwise."""
    if quiet or not sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


def _int_list(text: str, what: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise EdtoolError(f"{what} must be integers separated by commas, e.g. 32,64,128 (got {text!r})") from None


@app.command()
def train(
    arch: str = typer.Option(..., help="Network architecture: unet or resnet."),
    dataset: str = typer.Option("mnist5k", help="Training data: mnist5k, mnist, fashionmnist, cifar10."),
    data_root: Optional[Path] = typer.Option(None, help="Data root in torchvision's layout (not needed for mnist5k)."),
    conditional: bool = typer.Option(False, "--conditional", help="Class-conditional network."),
    padding: str = typer.Option("zeros", help="Convolution padding: zeros or circular."),
    steps: int = typer.Option(3000, min=1, help="Optimizer steps."),
    batch: int = typer.Option(64, min=1, help="Images per step."),
    lr: float = typer.Option(2e-3, help="Initial AdamW learning rate."),
    lr_final_factor: float = typer.Option(0.05, help="Learning rate at the last step as a fraction of --lr."),
    seed: int = typer.Option(0, help="Seed of every random choice in training."),
    fsizes: str = typer.Option("32,64,128", help="UNet channel widths per level."),
    emb_dim: int = typer.Option(256, help="UNet time-embedding size."),
    width: int = typer.Option(64, help="ResNet width (multiple of 8)."),
    layers: int = typer.Option(4, help="ResNet residual layers."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint path (default checkpoints/<dataset>_<arch>...)."),
    ckpt_every: int = typer.Option(250, min=1, help="Save resumable training state every N steps."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
):
    """Train a UNet or ResNet noise predictor with the paper's recipe; resumes if interrupted."""
    from edtool.data import load_dataset
    from edtool.paths import cache_dir, checkpoints_dir
    from edtool.train import TrainConfig, default_name, train as run_training

    if arch not in ("unet", "resnet"):
        raise EdtoolError(f"unknown --arch {arch!r}; choose unet or resnet")
    if padding not in ("zeros", "circular"):
        raise EdtoolError(f"unknown --padding {padding!r}; choose zeros or circular")
    if arch == "resnet" and width % 8:
        raise EdtoolError(f"--width must be a multiple of 8 (GroupNorm with 8 groups), got {width}")
    cfg = TrainConfig(arch=arch, dataset=dataset, conditional=conditional, padding=padding, steps=steps,
                      batch=batch, lr=lr, lr_final_factor=lr_final_factor, seed=seed,
                      fsizes=_int_list(fsizes, "--fsizes"), emb_dim=emb_dim, width=width, layers=layers)
    images, labels = load_dataset(dataset, root=data_root)
    out = out or checkpoints_dir() / default_name(cfg)
    work = cache_dir() / "train" / Path(out).stem
    command = "edtool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    progress = _progress(quiet)
    every = max(1, steps // 100)

    if progress is None:
        def log(step, loss, lr_now):
            if step % every == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss:.4f}  lr {lr_now:.2e}", flush=True)
        path = run_training(cfg, images, labels, Path(out), work, ckpt_every=ckpt_every, command=command, log=log)
    else:
        with progress:
            task = progress.add_task(f"train {arch}", total=steps, info="")

            def log(step, loss, lr_now):
                progress.update(task, completed=step, info=f"loss {loss:.4f} lr {lr_now:.1e}")
            path = run_training(cfg, images, labels, Path(out), work, ckpt_every=ckpt_every, command=command, log=log)
    print(f"wrote {path} (+ .json manifest, _loss.png, _samples.png)")


@app.command("import-checkpoint")
def import_checkpoint(
    file: Path = typer.Argument(..., help="A paper checkpoint backbone_<DATASET>_<UNet|ResNet>_<mode>[_conditional].pt."),
    out: Optional[Path] = typer.Option(None, help="Output path (default checkpoints/<dataset>_<arch>..._paper.safetensors)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name for the manifest (default: read from the file name)."),
):
    """Convert a paper checkpoint (a pickled DDIM) into edtool's format, unpickling only known classes."""
    from edtool.paper_import import import_checkpoint as run_import

    path = run_import(file, out=out, dataset=dataset)
    print(f"wrote {path} (+ .json manifest)")


def main():
    """Console entry point: run the app, turning EdtoolError into one line and exit code 2."""
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except EdtoolError as e:
        if debug:
            raise
        print(f"edtool: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("edtool: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            print("edtool: aborted", file=sys.stderr)
            sys.exit(130)
        raise
