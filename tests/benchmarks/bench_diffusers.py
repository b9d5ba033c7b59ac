"""A model at the scale researchers study (SPEC 14): a diffusers UNet2DModel with the configuration of the public
DDPM CIFAR-10 32x32 model (google/ddpm-cifar10-32: 35.7M parameters, attention at 16x16), random weights, next to
an ELS machine, through the `edtool compute` pipeline:

    compute --estimator auto --probes 16 --nsteps 20 --models ddpm=DIR,els --dataset cifar10

(`auto` is Hutchinson with 16 probes for the UNet and the closed form for ELS; `--estimator hutchinson` also
asks ELS for forward-mode products, which its kernels do not support.)

Reports seconds per step per model and peak memory (process peak RSS after each model's cell; the models run one
after the other, ddpm first, so the first figure is ddpm's peak and the second the run's). Without --data-root,
the CIFAR-10 batches are random images written here in torchvision's layout (the ELS cost depends on the number of
images and their shape, not their content); --max-samples limits the machine's images.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/benchmarks/bench_diffusers.py --nsteps 20 --max-samples 5000
"""

import argparse
import json
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DDPM_CIFAR10_CONFIG = dict(  # google/ddpm-cifar10-32 unet/config.json
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, norm_eps=1e-6,
    act_fn="silu", attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    time_embedding_type="positional", center_input_sample=False, mid_block_scale_factor=1)


def save_ddpm_pipeline(folder: Path) -> int:
    """The DDPM CIFAR-10 UNet with random weights and its linear-schedule DDPMScheduler; returns the parameter count."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_CONFIG)
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return sum(p.numel() for p in unet.parameters())


def synthetic_cifar(root: Path, per_batch: int = 10000) -> Path:
    """Random uint8 images in CIFAR-10's python-batch layout (5 train batches and a test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


class StepClock:
    """Reporter: wall time of every step per model, and the process peak RSS when each cell is done."""

    def __init__(self):
        self.last, self.steps, self.cpu, self.peak_gib = self._now(), {}, {}, {}

    @staticmethod
    def _now():  # wall and CPU seconds: on a shared machine the CPU time is the cost, the wall time the wait
        return time.perf_counter(), time.process_time()

    def start(self, *args, **kwargs):
        self.last = self._now()

    def step(self, r, model, j, nsteps, asym):
        now = self._now()
        self.steps.setdefault(model, []).append(now[0] - self.last[0])
        self.cpu.setdefault(model, []).append(now[1] - self.last[1])
        self.last = now

    def cell_done(self, r, model, asym_mean, failed):
        self.peak_gib[model] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.last = self._now()

    def note(self, message):
        print(f"note: {message}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsteps", type=int, default=20)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None, help="ELS training images (default: all)")
    parser.add_argument("--data-root", default=None, help="a real CIFAR-10 root (default: synthetic, written here)")
    parser.add_argument("--models", default="ddpm,els", help="ddpm, els or both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--estimator", default="auto", help="auto: Hutchinson for the UNet (n = 3072), the closed "
                        "form for ELS (which has no forward-mode rule: hutchinson fails on it)")
    args = parser.parse_args()

    from edtool.config import ComputeConfig
    from edtool.study.compute import compute

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = save_ddpm_pipeline(tmp / "ddpm")
        root = args.data_root or synthetic_cifar(tmp / "data")
        models = [f"ddpm={tmp / 'ddpm'}" if m == "ddpm" else m for m in args.models.split(",")]
        cfg = ComputeConfig(dataset="cifar10", data_root=str(root), models=models, estimator=args.estimator,
                            probes=args.probes, nsteps=args.nsteps, max_samples=args.max_samples, device=args.device,
                            run_dir=str(tmp / "run"))
        clock = StepClock()
        started = time.perf_counter()
        summary = compute(cfg, clock)
        total = time.perf_counter() - started
    print(f"UNet2DModel (DDPM CIFAR-10 config): {params / 1e6:.1f}M parameters; torch threads {torch.get_num_threads()}; "
          f"device {args.device}")
    print(f"compute --estimator {args.estimator} --probes {args.probes} --nsteps {args.nsteps} --models {args.models} "
          f"--dataset cifar10 --max-samples {args.max_samples}: {total:.0f} s in all "
          f"(timings {json.dumps({k: round(v, 1) for k, v in summary['timings'].items()})})")
    for model, seconds in clock.steps.items():
        s, cpu = np.array(seconds), np.array(clock.cpu[model])
        print(f"  {model:<6} {s.mean():7.2f} s/step wall, {cpu.mean():7.2f} s/step CPU (first step {s[0]:.2f} / "
              f"{cpu[0]:.2f}); process peak RSS after its cell {clock.peak_gib[model]:.2f} GiB")


if __name__ == "__main__":
    main()
