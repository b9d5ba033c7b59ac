"""Jacobian bands of the local machines: the dense form, the transpose, and the exterior derivative
||J - J^T||_F, ||J||_F and the curl map computed exactly from a band (B, C, H, W, C, k, k)."""

from typing import Sequence

import torch
from torch import Tensor

from edtool.config import PADDINGS



def band_valid(H: int, W: int, k: int, device) -> Tensor:
    """valid[y, x, dy, dx]: window entry (dy, dx) of pixel (y, x) lies inside the image."""
    r = k // 2
    qy = torch.arange(H, device=device)[:, None] + torch.arange(k, device=device)[None] - r  # (H, k)
    qx = torch.arange(W, device=device)[:, None] + torch.arange(k, device=device)[None] - r  # (W, k)
    vy, vx = (qy >= 0) & (qy < H), (qx >= 0) & (qx < W)
    return vy[:, None, :, None] & vx[None, :, None, :]


def dense_jacobian(band: Tensor, padding: str) -> Tensor:
    """The (B, n, n) Jacobian of a band (B, C, H, W, C, k, k); circular wraps add up."""
    B, C, H, W, _, k, _ = band.shape
    r, n = k // 2, C * H * W
    dev = band.device
    i, y, x, j, dy, dx = torch.meshgrid(
        *(torch.arange(s, device=dev) for s in (C, H, W, C, k, k)), indexing="ij"
    )
    qy, qx = y + dy - r, x + dx - r
    if padding == "circular":
        valid = torch.ones_like(qy, dtype=torch.bool)
        qy, qx = qy % H, qx % W
    elif padding == "zeros":
        valid = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    else:
        raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}")
    flat = ((i * H + y) * W + x) * n + (j * H + qy) * W + qx
    dense = band.new_zeros(B, n * n)
    dense.index_add_(1, flat[valid], band.reshape(B, -1)[:, valid.reshape(-1)])
    return dense.view(B, n, n)


def dense_ed(jac: Tensor, shape: Sequence[int], curl_map: bool = False) -> dict:
    """ed_fro, jac_fro (B,) and optionally the curl map (B, H, W) of dense Jacobians (B, n, n)."""
    C, H, W = shape
    asym = jac - jac.transpose(1, 2)
    row = asym.square().sum(-1).sqrt().view(-1, C, H, W)
    return {
        "ed_fro": asym.square().sum((1, 2)).sqrt(),
        "jac_fro": jac.square().sum((1, 2)).sqrt(),
        "curl_map": row.sum(1) if curl_map else None,
    }


def dense_ed_per_sample(jac: Tensor, shape: Sequence[int], curl_map: bool = False) -> dict:
    """`dense_ed` one sample at a time, so that no sample's numbers depend on the batch it came in."""
    res = [dense_ed(jac[b:b + 1], shape, curl_map) for b in range(jac.shape[0])]
    return {key: None if res[0][key] is None else torch.cat([r[key] for r in res]) for key in res[0]}


def band_transpose(band: Tensor, circular: bool) -> Tensor:
    """The band of J^T: entry [b, i, p, j, d] = J[(j, p + d - r), (i, p)] (windows are symmetric)."""
    B, C, H, W, _, k, _ = band.shape
    r = k // 2
    mirrored = band.flip(-2, -1).transpose(1, 4)  # [b, i, q, j, d] = J[(j, q), (i, q + r - d)]
    shifted = torch.stack(
        [torch.roll(mirrored[..., dy, dx], shifts=(r - dy, r - dx), dims=(2, 3)) for dy in range(k) for dx in range(k)],
        dim=-1,
    ).view_as(band)
    if circular:
        return shifted
    return shifted * band_valid(H, W, k, band.device)[None, None, :, :, None]


def band_ed(band: Tensor, padding: str, curl_map: bool = False) -> dict:
    """ed_fro = ||J - J^T||_F, jac_fro = ||J||_F (B,) and optionally the curl map (B, H, W),
    r_p = sum over channels of ||(J - J^T)[(c, p), :]||_2, exactly from the band."""
    B, C, H, W, _, k, _ = band.shape
    circular = padding == "circular"
    if circular and (k > H or k > W):  # a window meets the same pixel twice: fold through dense J
        return dense_ed(dense_jacobian(band, padding), (C, H, W), curl_map)
    asym = band - band_transpose(band, circular)
    row = asym.square().sum((4, 5, 6))  # (B, C, H, W)
    return {
        "ed_fro": row.sum((1, 2, 3)).sqrt(),
        "jac_fro": band.square().sum((1, 2, 3, 4, 5, 6)).sqrt(),
        "curl_map": row.sqrt().sum(1) if curl_map else None,
    }
