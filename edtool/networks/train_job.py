"""`edtool train` as a function: the settings (a state folder's, unless given again), the outputs checked
and the data loaded before any training, then the run. What the command prints is the caller's.

    with training_job({"arch": "resnet", "steps": 100}, state=Path("st")) as job:
        job.run(device=torch.device("cpu"), log=lambda step, loss, lr: print(step, loss))
        print(job.reached())   # the step the state in job.work_dir holds
"""

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from edtool import data
from edtool.config import TrainConfig
from edtool.errors import EdtoolError
from edtool.fileio import check_output
from edtool.networks import checkpoints, train_state
from edtool.networks.train import default_name, run_training, work_dir_name
from edtool.paths import cache_dir, local_checkpoints_dir


@dataclass
class TrainingJob:
    """One `edtool train`: checked settings, where the weights and the resumable state go, and the data."""

    cfg: TrainConfig
    out: Optional[Path]  # the checkpoint (None: only the state advances)
    work_dir: Path  # the resumable state: --state, else a folder under the cache named by output and settings
    images: torch.Tensor
    labels: torch.Tensor
    held_out: Optional[tuple] = None  # (images, labels) of the snapshots' held-out loss
    init_weights: Optional[dict] = None  # the weights of --init-from, unless a state holds the run
    snapshot_every: int = 0
    command: str = ""

    def run(self, *, device, log=None, ckpt_every: int = 250, time_limit_s: Optional[float] = None) -> Optional[Path]:
        """Train (edtool.networks.train.run_training); the checkpoint's path, or None (no `out`, or stopped at
        the time limit)."""
        return run_training(self.cfg, self.images, self.labels, self.out, self.work_dir, ckpt_every=ckpt_every,
                            command=self.command, log=log, init_weights=self.init_weights, held_out=self.held_out,
                            snapshot_every=self.snapshot_every, device=device, time_limit_s=time_limit_s)

    def reached(self) -> int:
        """The step the saved state holds."""
        return train_state.read(self.work_dir)["step"]


@contextmanager
def training_job(given: dict, *, state: Optional[Path] = None, init_from: Optional[Path] = None,
                 out: Optional[Path] = None, force: bool = False, data_root: Optional[Path] = None,
                 held_out_root: Optional[Path] = None, snapshot_every: int = 0,
                 command: str = "") -> Iterator[TrainingJob]:
    """The job of `edtool train` with the settings `given` (TrainConfig's names; the others are the state's
    when `state` holds a run, else the defaults), every refusal before any training, holding the lock of
    its state folder until the block ends (a second trainer there is refused)."""
    with ExitStack() as locks:
        if state is not None and state.is_dir():  # nobody else trains in it while we read and continue it
            locks.enter_context(train_state.lock(state, doing=command))
        cfg, init_weights = job_settings(given, state, init_from)
        out = checkpoint_path(out, state, cfg, force)
        images, labels = data.load_dataset(cfg.dataset, root=data_root)
        cfg.check_images(images.shape)
        held_out = None
        if snapshot_every:
            if state is None:
                raise EdtoolError("--snapshot-every needs --state DIR (the snapshots are kept there)")
            name = "mnist" if cfg.dataset == "mnist5k" else cfg.dataset
            held_out = data.load_dataset(name, root=held_out_root or data_root, split="test", download=False)
        work = state if state is not None else cache_dir() / "train" / work_dir_name(out, cfg)
        locks.enter_context(train_state.lock(work, doing=command))
        yield TrainingJob(cfg, out, work, images, labels, held_out, init_weights, snapshot_every, command)


def job_settings(given: dict, state: Optional[Path], init_from: Optional[Path]) -> tuple:
    """(TrainConfig, initial weights or None): the settings given, the rest from the run `state` holds (its
    step count too) or the defaults; checked, with --init-from's checkpoint of the same architecture."""
    given = dict(given)
    init = None
    if init_from is not None:
        init = checkpoints.load(init_from).net.state_dict()
        given["init_from"] = checkpoints.file_hash(init_from.with_suffix(".safetensors"))
    previous = train_state.read(state) if state is not None else None
    settings = dict(given)
    if previous is not None:  # continue it: settings not given come from the state
        settings = {**previous["config"], **given}
        settings.setdefault("steps", previous["config"].get("steps", previous["step"]))
        if init_from is None:
            init = None  # the state holds the weights
    if settings.get("arch") is None:
        raise EdtoolError("--arch is required (unet or resnet), unless --state names a folder holding a run")
    cfg = TrainConfig(**settings).validate()  # before the data is loaded
    if init is not None and checkpoints.read_manifest(init_from.with_suffix(".safetensors"))["arch"] != cfg.arch:
        raise EdtoolError(f"--init-from {init_from} is not a {cfg.arch}; give a checkpoint of the same architecture")
    return cfg, init


def checkpoint_path(out: Optional[Path], state: Optional[Path], cfg: TrainConfig, force: bool) -> Optional[Path]:
    """Where the checkpoint goes (default ./checkpoints/<dataset>_<arch>..., none with a state folder), its
    four files checked (edtool.fileio.check_output: a file edtool did not write is replaced only with force)."""
    if out is None and state is None:
        out = local_checkpoints_dir() / default_name(cfg)
    if out is None:
        return None
    if out.exists() and not out.is_file():  # a folder or /dev/null: not where a checkpoint file goes
        raise EdtoolError(f"--out {out} is a folder or a device, not a file; give the checkpoint's file path, "
                          f"e.g. {out / 'model.safetensors' if out.is_dir() else 'model.safetensors'}")
    out = Path(out).with_suffix(".safetensors")
    check_output([out, out.with_suffix(".json"), out.with_name(out.stem + "_loss.png"),
                  out.with_name(out.stem + "_samples.png")], force)
    return out
