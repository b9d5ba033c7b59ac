"""How many of a network's samples are recognizable digits (the grid target, "3 in 4", made a number).

A small classifier trained on the 60,000 real MNIST training digits, plus an eleventh class "no digit" (the same
digits cut into 8x8 patches and shuffled, or collages of crops of them: strokes that are locally right and
globally wrong, the failure a local score makes), judges each sample: it counts as recognizable when one digit
gets probability >= 0.9. Reference rows say what the number means: real held-out t10k digits (the ceiling),
Gaussian noise and the ResNet's patch mosaics (what must score low).
Samples come from the grid's sampler (deterministic DDIM, 20 steps, as `edtool train` draws its grids and the
pipeline measures), from DDIM with 200 steps, and from ancestral DDPM (250 steps, x0 clipped to [-1, 1]: how a
DDPM's quality is usually judged).

    python experiments/training/recognizable.py train              # digit_classifier.safetensors (+ .json)
    python experiments/training/recognizable.py measure --net unet # recognizable.json, one row per kept snapshot
    python experiments/training/recognizable.py table              # it as a markdown table
    python experiments/training/recognizable.py grid WEIGHTS OUT.png  # a 64-sample DDIM-20 grid, unrecognized ones dimmed
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from agreement import HELD_OUT, snapshots  # noqa: E402  (the same data root and kept snapshots)

CLASSIFIER = HERE / "digit_classifier.safetensors"
RECORD = HERE / "recognizable.json"
THRESHOLD = 0.9
NO_DIGIT = 10  # the classifier's eleventh class, after the digits 0-9
SAMPLERS = {"ddim20": 20, "ddim200": 200, "ddpm250": 250}


def classifier() -> torch.nn.Sequential:
    """Three 3x3 conv blocks and a linear read-out to 10 digits + "no digit": about 99 % on t10k, small to commit."""
    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), torch.nn.Flatten(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(128 * 4 * 4, NO_DIGIT + 1))


def shifted(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by up to max_shift pixels each way (background fill): samples are not centred like MNIST."""
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, x.shape[0]), generator=g)
    return torch.stack([p[:, i:i + x.shape[2], j:j + x.shape[3]] for p, i, j in zip(pad, dy.tolist(), dx.tolist())])


def patch_shuffled(x: torch.Tensor, g: torch.Generator, patch: int = 8) -> torch.Tensor:
    """Each image cut into patch x patch tiles, the tiles put back in a random order: a "no digit" example."""
    n, c, h, w = x.shape
    tiles = x.unfold(2, patch, patch).unfold(3, patch, patch).reshape(n, c, -1, patch, patch)
    order = torch.argsort(torch.rand(n, tiles.shape[2], generator=g), dim=1)
    tiles = tiles[torch.arange(n)[:, None], :, order].transpose(1, 2)  # (n, c, tiles, patch, patch)
    k = h // patch
    return tiles.reshape(n, c, k, k, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def collage(x: torch.Tensor, g: torch.Generator, pieces: int = 3, size: int = 12) -> torch.Tensor:
    """Each image replaced by `pieces` random size x size crops of the batch's digits, laid over one another at
    random places (brighter pixel wins): stroke fragments without tile edges, a second kind of "no digit"."""
    n, c, h, w = x.shape
    out = torch.full_like(x, -1.0)
    for _ in range(pieces):
        src = torch.randint(0, n, (n,), generator=g)
        (sy, sx), (dy, dx) = torch.randint(0, h - size + 1, (2, 2, n), generator=g)
        for i in range(n):
            crop = x[src[i], :, sy[i]:sy[i] + size, sx[i]:sx[i] + size]
            region = out[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size]
            out[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] = torch.maximum(region, crop)
    return out


def train(epochs: int = 3, batch: int = 128, seed: int = 0) -> None:
    from edtool.data import load_dataset

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_dataset("mnist", root=HELD_OUT, split="train", download=False)
    xt, yt = load_dataset("mnist", root=HELD_OUT, split="test", download=False)
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            q = len(idx) // 8
            junk = torch.cat([patch_shuffled(x[idx[:q]], g), collage(x[idx[q:2 * q]], g)])
            images = torch.cat([shifted(x[idx], g), junk])
            labels = torch.cat([y[idx], torch.full((len(junk),), NO_DIGIT)])
            loss = F.cross_entropy(net(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(net, xt, yt)
        print(f"epoch {epoch + 1}: t10k accuracy {acc:.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(CLASSIFIER))
    CLASSIFIER.with_suffix(".json").write_text(json.dumps({
        "what": "digit classifier for recognizable.py (not a score network)", "t10k_accuracy": acc,
        "epochs": epochs, "batch": batch, "seed": seed,
        "command": "python experiments/training/recognizable.py train"}, indent=2) + "\n")


@torch.no_grad()
def accuracy(net, x, y) -> float:
    net.eval()
    return float(torch.cat([net(b)[:, :NO_DIGIT].argmax(1) for b in x.split(1000)]).eq(y).float().mean())


@functools.lru_cache(maxsize=1)
def committed_classifier() -> torch.nn.Sequential:
    """The committed classifier, read once per process (measure judges every snapshot with it)."""
    net = classifier()
    net.load_state_dict(load_file(str(CLASSIFIER)))
    return net.eval()


@torch.no_grad()
def judge(images: torch.Tensor) -> torch.Tensor:
    """(N,) the classifier's top digit probability for each image in [-1, 1] (clipped into that range first)."""
    net = committed_classifier()
    return torch.cat([F.softmax(net(b.clamp(-1, 1)), 1)[:, :NO_DIGIT].max(1).values for b in images.split(500)])


def recognizable(images: torch.Tensor) -> float:
    return float((judge(images) >= THRESHOLD).float().mean())


def draw(weights: Path, sampler: str, n: int, seed: int) -> torch.Tensor:
    """n samples of a network from fixed noise (seed), with one of SAMPLERS."""
    from edtool.diffusion import TimeGrid, ddim_sample, ddpm_sample, initial_noise
    from edtool.networks.checkpoints import load

    network = load(weights)
    network.net.eval()
    x = initial_noise(seed, (n, *network.manifest["image_shape"]))
    eps = lambda t, xx: network.eps(t, xx, None)  # noqa: E731
    if sampler.startswith("ddim"):
        return ddim_sample(eps, x, TimeGrid(SAMPLERS[sampler]))
    return ddpm_sample(eps, x, TimeGrid(SAMPLERS[sampler]), seed=seed, clip_x0=1.0)


def measure(net: str, n: int, seed: int) -> None:
    """One row per kept snapshot (and step 0) and per sampler, plus the reference rows; skips rows already there."""
    from edtool.data import load_dataset

    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"threshold": THRESHOLD, "n": n, "seed": seed}
    if (record["n"], record["seed"]) != (n, seed):
        sys.exit(f"{RECORD.name} holds n={record['n']} seed={record['seed']}; measure with those or move it away")
    refs = record.setdefault("reference", {})
    if "t10k" not in refs:
        refs["t10k"] = recognizable(load_dataset("mnist", root=HELD_OUT, split="test", download=False)[0][:n])
        refs["gaussian_noise"] = recognizable(torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)))
        refs["resnet_shipped_ddim20"] = recognizable(draw(REPO / "checkpoints/mnist5k_resnet.safetensors", "ddim20", n, seed))
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
        print("reference", refs, flush=True)
    rows = record.setdefault(net, {})
    for step, weights in snapshots(net):
        for sampler in SAMPLERS:
            key = f"{step}/{sampler}"
            if key in rows:
                continue
            rows[key] = recognizable(draw(weights, sampler, n, seed))
            RECORD.write_text(json.dumps(record, indent=2) + "\n")
            print(net, key, rows[key], flush=True)


def table(net: str = "unet") -> str:
    """recognizable.json as a markdown table: one row per snapshot, one column per sampler."""
    rows = json.loads(RECORD.read_text())[net]
    steps = sorted({int(k.split("/")[0]) for k in rows})
    names = {"ddim20": "DDIM, 20 steps (the grid's)", "ddim200": "DDIM, 200 steps", "ddpm250": "ancestral, 250 steps"}
    lines = ["| campaign step | " + " | ".join(names[s] for s in SAMPLERS) + " |", "|---" * (len(SAMPLERS) + 1) + "|"]
    for step in steps:
        cells = [f"{rows[f'{step}/{s}']:.0%}" if f"{step}/{s}" in rows else "" for s in SAMPLERS]
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(weights: Path, out: Path, sampler: str = "ddim20", seed: int = 1) -> None:
    """The 64-sample grid edtool train draws (same noise), with the samples judged unrecognizable dimmed."""
    from edtool.imageio import save_grid

    x = draw(weights, sampler, 64, seed)
    ok = judge(x) >= THRESHOLD
    print(f"{int(ok.sum())}/64 recognizable")
    save_grid(torch.where(ok.view(-1, 1, 1, 1), x, (x + 1) * 0.3 - 1), out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train").add_argument("--force", action="store_true", help="replace the committed classifier")
    m = sub.add_parser("measure")
    m.add_argument("--net", choices=["unet", "resnet"], required=True)
    m.add_argument("--n", type=int, default=256)
    m.add_argument("--seed", type=int, default=1)
    sub.add_parser("table")
    gr = sub.add_parser("grid")
    gr.add_argument("weights", type=Path)
    gr.add_argument("out", type=Path)
    gr.add_argument("--sampler", choices=list(SAMPLERS), default="ddim20")
    a = p.parse_args(argv)
    if a.cmd == "train":
        if CLASSIFIER.exists() and not a.force:  # every recognizable.json number was judged by it
            sys.exit(f"{CLASSIFIER.name} exists and judged recognizable.json; pass --force to replace it")
        train()
    elif a.cmd == "measure":
        measure(a.net, a.n, a.seed)
    elif a.cmd == "table":
        print(table())
    else:
        grid(a.weights, a.out, a.sampler)


if __name__ == "__main__":
    main()
