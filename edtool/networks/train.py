"""Train a noise predictor with the paper's recipe (SPEC 2), resumable from periodic checkpoints.

Per image t = randint(0, 1000) / 1000, x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps, loss
mse(eps_hat(x_t, t), eps), AdamW with exponential learning-rate decay. All randomness comes
from one generator whose state is saved with the rest (`train_state`: safetensors + JSON), so a
resumed run ends with the same weights as an uninterrupted one, bit for bit.
"""

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from edtool.networks import checkpoints, train_state
from edtool.config import TrainConfig
from edtool.diffusion import TimeGrid, add_noise, ddim_sample, initial_noise
from edtool.errors import EdtoolError
from edtool.fileio import atomic_path, write_json
from edtool.imageio import save_grid
from edtool.networks.models import Network, build_network

READ_LOSSES_EVERY_S = 1.0  # the losses stay on the device and are read (one host sync) about this often


def arch_kwargs(cfg: TrainConfig, channels: int, num_classes: Optional[int]) -> dict:
    """The constructor arguments of the network described by cfg."""
    common = dict(in_channels=channels, out_channels=channels, mode=cfg.padding, conditional=cfg.conditional,
                  num_classes=num_classes if cfg.conditional else None, lastksize=cfg.lastksize)
    if cfg.arch == "unet":
        return dict(common, fsizes=list(cfg.fsizes), emb_dim=cfg.emb_dim)
    return dict(common, emb_dim=cfg.width, num_layers=cfg.layers)


def default_name(cfg: TrainConfig) -> str:
    """checkpoints/<dataset>_<arch>[_circular][_conditional]."""
    name = f"{cfg.dataset}_{cfg.arch}"
    if cfg.padding != "zeros":
        name += f"_{cfg.padding}"
    return name + ("_conditional" if cfg.conditional else "")


def settings_hash(cfg: TrainConfig) -> str:
    """12 hex digits of sha256 over every setting: one resumable work dir per (output, settings)."""
    return hashlib.sha256(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:12]


def work_dir_name(out, cfg: TrainConfig) -> str:
    """`<stem>-<settings hash>`: another run with other settings and the same output name starts afresh
    instead of finding a state it cannot resume."""
    return f"{Path(out).stem}-{settings_hash(cfg)}"


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): exponential decay, lr * gamma**step."""
    return cfg.lr * cfg.gamma() ** step


def train(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, out: Optional[Path], work_dir: Path,
          **options) -> Optional[Path]:
    """`train_unlocked` holding work_dir's lock: a second process training in the same folder is refused."""
    cfg.validate()
    with train_state.lock(work_dir):
        return train_unlocked(cfg, images, labels, out, work_dir, **options)


def train_unlocked(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, out: Optional[Path],
                   work_dir: Path, ckpt_every: int = 250, command: str = "",
                   log: Optional[Callable[[int, float, float], None]] = None,
                   init_weights: Optional[dict] = None, held_out=None, snapshot_every: int = 0, device="cpu",
                   time_limit_s: Optional[float] = None) -> Optional[Path]:
    """Train, resuming from work_dir's state if present; write out.safetensors/.json + PNGs and return
    the weights' path (None when `out` is None: a campaign stretch that only advances its state).

    `log(step, loss, lr)` is called for every step, in order, when the losses are read from the device
    (about every READ_LOSSES_EVERY_S seconds and before every save).
    `init_weights` (a state dict, cfg.init_from its checkpoint's sha256) starts the weights and their
    moving average from a trained network. Every `snapshot_every` steps the moving-average weights are
    evaluated (loss on `held_out` = (images, labels), fixed draws) and sampled into work_dir/snapshots.
    `device` runs the steps there; every random draw still comes from the one CPU generator, so the
    data, times and noise are the same on any device. After `time_limit_s` seconds (of this call) the
    run saves its state at the step it reached and returns None (a job with a wall-clock limit).
    """
    cfg.validate()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    num_classes = int(labels.max()) + 1 if cfg.conditional else None
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    net = build_network(cfg.arch, **arch_kwargs(cfg, images.shape[1], num_classes))
    if init_weights is not None:
        net.load_state_dict(init_weights)
    device = torch.device(device)
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    step, losses, elapsed = 0, [], 0.0

    meta = train_state.read(work_dir)
    if meta is not None:
        check_continues(meta, cfg, work_dir)
        ema, losses = train_state.restore(work_dir, meta, net=net, opt=opt, gen=gen)
        ema = {k: v.to(device) for k, v in ema.items()}
        step, elapsed = meta["step"], meta["elapsed_s"]
    if snapshot_every:
        read_snapshots(work_dir)  # a damaged record is refused now, not at the first snapshot
    on_device = images.to(device), labels.to(device)

    pending = []  # the losses of the steps since they were last read, still on the device

    def read_losses():
        """Read the pending losses in one host sync, check them, and log each step."""
        if not pending:
            return
        values = torch.stack(pending).tolist()
        first = step - len(values) + 1
        pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise EdtoolError(f"training diverged at step {first + i} (loss {value}); nothing was written since "
                                  f"the state saved before: lower --lr (now {cfg.lr:g})")
            losses.append(value)
            if log is not None:
                log(first + i, value, lr_at(cfg, first + i - 1))

    def save_state():
        read_losses()
        if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
            raise EdtoolError(f"training diverged by step {step} (non-finite weights); the state saved before "
                              f"is kept: lower --lr (now {cfg.lr:g})")
        train_state.save(work_dir, config=cfg.identity(), net=net, ema=ema, opt=opt, gen=gen, step=step,
                         losses=losses, info={"elapsed_s": elapsed, "command": command})

    net.train()
    t0 = time.time() - elapsed
    deadline = None if time_limit_s is None else time.time() + time_limit_s
    last_read = time.time()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen).to(device)
        x0, y = on_device[0][idx], on_device[1][idx]
        t = (torch.randint(0, 1000, (cfg.batch,), generator=gen).float() / 1000).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        loss = F.mse_loss(net(add_noise(x0, t, eps), t, y if cfg.conditional else None), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if cfg.ema_decay > 0:  # decay 0 ships the raw weights: nothing to average
            update_ema(ema, net, ema_decay(cfg.ema_decay, step))
        pending.append(loss.detach())
        elapsed = time.time() - t0
        if time.time() - last_read >= READ_LOSSES_EVERY_S:  # a non-finite loss is found here, before any save
            read_losses()
            last_read = time.time()
        if snapshot_every and step % snapshot_every == 0:
            snapshot(work_dir, step, snapshot_every, cfg, net, ema, images, labels, held_out, num_classes, command,
                     elapsed)
        if step % ckpt_every == 0 or step == cfg.steps:
            save_state()
        if deadline is not None and time.time() > deadline and step < cfg.steps:
            if step % ckpt_every:
                save_state()
            return None
    read_losses()
    if out is None:
        return None
    net.to("cpu")  # the final evaluation, checkpoint and figures on CPU, as on a machine without a GPU
    ema = {k: v.cpu() for k, v in ema.items()}

    held = {"raw": eval_loss(net, images, labels, cfg)}
    if cfg.ema_decay > 0:
        net.load_state_dict(ema)
        held["ema"] = eval_loss(net, images, labels, cfg)
    man = manifest(cfg, images, num_classes, command, elapsed, step)
    man["final_loss"] = float(torch.tensor(losses[-100:]).mean())  # raw weights, mean of the last 100 steps
    man["eval_loss"] = held  # fixed noise draws over 2048 training images: raw vs shipped (EMA) weights
    if held_out is not None:  # the shipped weights on held-out digits, as the snapshots record it
        man["held_out_loss"] = eval_loss(net, held_out[0], held_out[1], cfg)
    path = checkpoints.save(Path(out).with_suffix(".safetensors"), net, man)
    write_training_figures(Network(net, man), losses, path, seed=cfg.seed,
                           labels=labels if cfg.conditional else None)
    return path


def check_continues(meta: dict, cfg: TrainConfig, work_dir) -> None:
    """EdtoolError unless cfg continues the run whose state `meta` is (same settings, as many steps or more)."""
    saved, wanted = meta["config"], cfg.identity()
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed == ["steps"]:
        raise EdtoolError(f"{work_dir} holds a run of {saved['steps']} steps whose learning rate decays over exactly "
                          f"those steps (--lr-final-factor), so it cannot go on to {cfg.steps}: give --steps "
                          f"{saved['steps']}, or start a run that can be continued (--lr-gamma) in another folder")
    if changed:
        raise EdtoolError(f"{work_dir} holds a training run with other settings ({', '.join(changed)}); "
                          "delete that folder or use another work folder")
    if cfg.steps < meta["step"]:
        raise EdtoolError(f"{work_dir} holds a run at step {meta['step']}: --steps {cfg.steps} would go back; give "
                          f"--steps {meta['step']} or more")


def manifest(cfg: TrainConfig, images, num_classes, command: str, elapsed: float, step: int) -> dict:
    """The checkpoint manifest of a network trained with cfg for `step` steps (SPEC 4)."""
    return {
        "arch": cfg.arch, "arch_kwargs": arch_kwargs(cfg, images.shape[1], num_classes),
        "dataset": cfg.dataset, "image_shape": list(images.shape[1:]), "conditional": cfg.conditional,
        "num_classes": num_classes, "padding": cfg.padding,
        "training": {**asdict(cfg), "steps": step,
                     "recipe": "t=randint(0,1000)/1000, mse(eps_hat, eps), AdamW, exponential lr decay",
                     "command": command, "wall_time_s": round(elapsed, 1)},
        "weights": "ema" if cfg.ema_decay > 0 else "raw",
    }


def snapshot(work_dir: Path, step: int, every: int, cfg: TrainConfig, net, ema: dict, images, labels, held_out,
             num_classes, command: str = "", elapsed: float = 0.0) -> dict:
    """Evaluate the moving-average weights after `step` steps: loss on fixed held-out and training draws,
    a 64-sample grid; the weights themselves are kept at the first four snapshots and then at steps
    every * 2**j (an agreement curve gets 4 points early; a long campaign keeps a handful). Appends one
    record to work_dir/snapshots.json."""
    import copy

    folder = work_dir / "snapshots"
    avg = copy.deepcopy(net)
    avg.load_state_dict(ema)
    record = {"step": step, "lr": lr_at(cfg, step - 1), "train_draws_loss": eval_loss(avg, images, labels, cfg)}
    if held_out is not None:
        record["held_out_loss"] = eval_loss(avg, held_out[0], held_out[1], cfg)
    records = [r for r in read_snapshots(work_dir) if r["step"] < step]
    name = f"step_{step:08d}"
    man = manifest(cfg, images, num_classes, command, elapsed, step)  # the command that made it, as the final one
    samples = sample_grid(Network(avg, man), folder / f"{name}_samples.png", seed=cfg.seed,
                          labels=labels if cfg.conditional else None)
    record["samples"] = str(samples.relative_to(work_dir))
    k = step // every
    if k <= 4 or k & (k - 1) == 0:  # step = every * (1, 2, 3, 4), then every * 2**j
        record["weights"] = str(checkpoints.save(folder / name, avg, {**man, "held_out_loss": record.get(
            "held_out_loss"), "train_draws_loss": record["train_draws_loss"]}).relative_to(work_dir))
    write_json(work_dir / "snapshots.json", records + [record])
    return record


def read_snapshots(work_dir) -> list:
    """The snapshot records of a training state folder ([] when there are none): a list of records, each
    with its whole-number step (EdtoolError for anything else: an edited or damaged file)."""
    path = Path(work_dir) / "snapshots.json"
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        records = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise EdtoolError(f"cannot read {path} ({e}); restore it from a copy, or move it away to start the "
                          "record afresh") from None
    if not (isinstance(records, list) and all(isinstance(r, dict) and type(r.get("step")) is int for r in records)):
        raise EdtoolError(f"{path} is not a list of snapshot records with their steps; restore it from a copy, or "
                          "move it away to start the record afresh")
    return records


def ema_decay(decay: float, step: int) -> float:
    """EMA decay with a warm-up (early steps forget the random initial weights quickly)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: dict, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every floating tensor of the state dict: two
    multi-tensor kernels for all of them (on the CPU the same per-tensor arithmetic as mul_ then add_)."""
    state = net.state_dict()
    floating = [k for k, v in state.items() if v.dtype.is_floating_point]
    averages = [ema[k] for k in floating]
    torch._foreach_mul_(averages, decay)
    torch._foreach_add_(averages, [state[k].detach() for k in floating], alpha=1 - decay)
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            ema[k].copy_(v)


@torch.no_grad()
def eval_loss(net: torch.nn.Module, images, labels, cfg: TrainConfig, n: int = 2048, seed: int = 12345) -> float:
    """The training loss on fixed draws (same images, times and noise for every call): compares weights.
    The draws are made on CPU and moved to the network's device."""
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, images.shape[0], (n,), generator=gen)
    t = (torch.randint(0, 1000, (n,), generator=gen).float() / 1000).to(device)
    eps = torch.randn((n, *images.shape[1:]), generator=gen).to(device)
    images, labels, idx = images.to(device), labels.to(device), idx.to(device)
    was_training = net.training
    net.eval()
    total = 0.0
    for i in range(0, n, 256):
        sl = slice(i, i + 256)
        y = labels[idx[sl]] if cfg.conditional else None
        total += float(F.mse_loss(net(add_noise(images[idx[sl]], t[sl], eps[sl]), t[sl], y), eps[sl],
                                  reduction="sum"))
    net.train(was_training)
    return total / eps.numel()


def write_training_figures(network: Network, losses, path: Path, seed: int = 0, labels=None, n: int = 64,
                           nsteps: int = 20):
    """Loss curve and a grid of DDIM samples next to the checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="per step")
    k = max(1, len(losses) // 50)
    smooth = torch.tensor(losses).unfold(0, k, 1).mean(1) if len(losses) >= k else torch.tensor(losses)
    ax.plot(range(k - 1, k - 1 + len(smooth)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set(xlabel="training step", ylabel="MSE(eps_hat, eps)", yscale="log", title=path.stem + ": training loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path.with_name(path.stem + "_loss.png")) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)

    sample_grid(network, path.with_name(path.stem + "_samples.png"), seed, labels, n, nsteps)


@torch.no_grad()
def sample_grid(network: Network, path: Path, seed: int = 0, labels=None, n: int = 64, nsteps: int = 20) -> Path:
    """A grid of n DDIM samples from fixed noise (seed + 1): the same draws for every network, on the
    network's device."""
    device = next(network.net.parameters()).device
    was_training = network.net.training
    network.net.eval()
    x = initial_noise(seed + 1, (n, *network.manifest["image_shape"]), device=device)  # n noises, one seed
    lab = None if labels is None else (torch.arange(n) % (int(labels.max()) + 1)).to(device)
    samples = ddim_sample(lambda t, xx: network.eps(t, xx, lab), x, TimeGrid(nsteps))
    network.net.train(was_training)
    return save_grid(samples.cpu(), path)
