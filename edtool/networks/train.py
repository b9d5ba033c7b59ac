"""Train a noise predictor with the paper's recipe (SPEC 2), resumable from periodic checkpoints.

Per image t = randint(0, 1000) / 1000, x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps, loss
mse(eps_hat(x_t, t), eps), AdamW with exponential learning-rate decay. All randomness comes
from one generator whose state is checkpointed, so a resumed run ends with the same weights
as an uninterrupted one.
"""

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from edtool.networks import checkpoints
from edtool.config import TrainConfig
from edtool.diffusion import add_noise, ddim_sample
from edtool.errors import EdtoolError
from edtool.fileio import atomic_path
from edtool.imageio import save_grid
from edtool.networks.models import Network, build_network


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
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def work_dir_name(out, cfg: TrainConfig) -> str:
    """`<stem>-<settings hash>`: another run with other settings and the same output name starts afresh
    instead of finding a state it cannot resume."""
    return f"{Path(out).stem}-{settings_hash(cfg)}"


def _state_path(work_dir: Path) -> Path:
    return work_dir / "train_state.pt"


def train(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, out: Path, work_dir: Path,
          ckpt_every: int = 250, command: str = "", log: Optional[Callable[[int, float, float], None]] = None,
          stop_after: Optional[int] = None) -> Optional[Path]:
    """Train, resuming from work_dir's state if present; write out.safetensors/.json + PNGs and return
    the weights' path.

    `log(step, loss, lr)` is called every step; `stop_after` ends the run early (tests use it
    to simulate an interruption) without writing the final checkpoint, and returns None.
    """
    cfg.validate()
    out = Path(out).with_suffix(".safetensors")
    work_dir.mkdir(parents=True, exist_ok=True)
    num_classes = int(labels.max()) + 1 if cfg.conditional else None
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    net = build_network(cfg.arch, **arch_kwargs(cfg, images.shape[1], num_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gamma = cfg.lr_final_factor ** (1.0 / max(cfg.steps, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    step, losses, elapsed = 0, [], 0.0

    state_file = _state_path(work_dir)
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        if state["config"] != asdict(cfg):
            changed = sorted(k for k in set(state["config"]) | set(asdict(cfg))
                             if state["config"].get(k) != asdict(cfg).get(k))
            raise EdtoolError(f"{state_file} belongs to a training run with other settings ({', '.join(changed)}); "
                              "delete that folder or use another work folder")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        ema = state["ema"]
        step, losses, elapsed = state["step"], list(state["losses"]), state["elapsed"]

    def save_state():
        with atomic_path(state_file) as tmp:
            torch.save({"config": asdict(cfg), "model": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "generator": gen.get_state(), "ema": ema, "step": step,
                        "losses": losses, "elapsed": elapsed}, tmp)

    net.train()
    t0 = time.time() - elapsed
    while step < cfg.steps:
        idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen).float() / 1000
        eps = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(net(add_noise(x0, t, eps), t, y if cfg.conditional else None), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if cfg.ema_decay > 0:  # decay 0 ships the raw weights: nothing to average
            update_ema(ema, net, ema_decay(cfg.ema_decay, step))
        losses.append(loss.item())
        elapsed = time.time() - t0
        if log is not None:
            log(step, losses[-1], sched.get_last_lr()[0])
        if step % ckpt_every == 0 or step == cfg.steps:
            save_state()
        if stop_after is not None and step >= stop_after and step < cfg.steps:
            return None

    final_loss = float(torch.tensor(losses[-100:]).mean())
    held_out = {"raw": eval_loss(net, images, labels, cfg)}
    if cfg.ema_decay > 0:
        net.load_state_dict(ema)
        held_out["ema"] = eval_loss(net, images, labels, cfg)
    manifest = {
        "arch": cfg.arch, "arch_kwargs": arch_kwargs(cfg, images.shape[1], num_classes),
        "dataset": cfg.dataset, "image_shape": list(images.shape[1:]), "conditional": cfg.conditional,
        "num_classes": num_classes, "padding": cfg.padding,
        "training": {**asdict(cfg), "recipe": "t=randint(0,1000)/1000, mse(eps_hat, eps), AdamW, ExponentialLR",
                     "command": command, "wall_time_s": round(elapsed, 1)},
        "final_loss": final_loss,  # raw weights, mean training loss of the last 100 steps
        "eval_loss": held_out,  # fixed noise draws over 2048 training images: raw vs shipped (EMA) weights
        "weights": "ema" if cfg.ema_decay > 0 else "raw",
    }
    path = checkpoints.save(out, net, manifest)
    write_training_figures(Network(net, manifest), losses, path, seed=cfg.seed,
                           labels=labels if cfg.conditional else None)
    return path


def ema_decay(decay: float, step: int) -> float:
    """EMA decay with a warm-up (early steps forget the random initial weights quickly)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: dict, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every floating tensor of the state dict."""
    for k, v in net.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


@torch.no_grad()
def eval_loss(net: torch.nn.Module, images, labels, cfg: TrainConfig, n: int = 2048, seed: int = 12345) -> float:
    """The training loss on fixed draws (same images, times and noise for every call): compares weights."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, images.shape[0], (n,), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen).float() / 1000
    eps = torch.randn((n, *images.shape[1:]), generator=gen)
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

    network.net.eval()
    x = torch.randn((n, *network.manifest["image_shape"]), generator=torch.Generator().manual_seed(seed + 1))
    lab = None if labels is None else torch.arange(n) % (int(labels.max()) + 1)
    samples = ddim_sample(lambda t, xx: network.eps(t, xx, lab), x, nsteps)
    save_grid(samples, path.with_name(path.stem + "_samples.png"))
