"""Write image tensors in [-1, 1] as PNG grids (sample sheets, side-by-side comparisons)."""

from pathlib import Path

import numpy as np
import torch

from edtool.fileio import atomic_path


def tile(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*H', cols*W', C) uint8 mosaic with white gutters."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i].transpose(1, 2, 0)
    return out


def save_grid(images: torch.Tensor, path, nrow: int = 8, scale: int = 3) -> Path:
    """Save a mosaic of images as PNG, each pixel enlarged `scale` times so digits are visible."""
    import matplotlib.image

    mosaic = tile(images, nrow).repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=255, format="png")
    return path
