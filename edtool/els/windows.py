"""Candidate rules (SPEC 5.1) and window geometry of the local ELS machines: which training windows
are candidates for which pixel (`candidate_cells`), padding, and the flat offsets of k x k windows."""

import torch
import torch.nn.functional as F
from torch import Tensor



def candidate_cells(rule: str, H: int, W: int, k: int, paper_circular: bool = False):
    """Split the H*W pixels into cells [(pixels, centers)] (flat indices y*W + x).

    Every pixel of a cell has the same candidates: the windows centred at `centers` in every
    training image. This function is the whole difference between the local machines.
    """
    r = k // 2
    every = list(range(H * W))
    inside = [y * W + x for y in range(r, H - r) for x in range(r, W - r)]
    if rule == "ls":
        return [([p], [p]) for p in every]
    if rule == "els-circular":
        if not paper_circular:
            return [(every, every)]
        if not inside:
            raise ValueError(f"the paper's circular machine needs patch size <= image size, got k={k} for {H}x{W}")
        return [(every, inside)]
    if rule == "els-borders":
        cells = {}
        for y in range(H):
            for x in range(W):
                near = {"top": y, "bottom": H - 1 - y, "left": x, "right": W - 1 - x}
                near = {edge: depth for edge, depth in near.items() if depth < r}
                if not near:
                    key = ("interior",)  # every fully-inside window
                elif len(near) == 1:
                    key = next(iter(near.items()))  # same depth from that edge, anywhere along it
                else:
                    key = ("corner", y, x)  # exactly the same position
                cells.setdefault(key, []).append(y * W + x)
        return [(pix, pix) for pix in cells.values()]
    raise ValueError(f"no candidate rule for machine {rule!r}")


def cell_rectangles(rule: str, H: int, W: int, k: int, paper_circular: bool = False) -> Tensor:
    """candidate_cells as rectangles of window centres, one row [py0, py1, px0, px1, qy0, qy1, qx0, qx1, same]
    per cell: pixels [py0, py1) x [px0, px1), candidates likewise (every rule's cells are rectangles).
    same = 0: every pixel of the cell takes every candidate; 1 (2): only those in its own row (column).
    The border cells of els-borders, one per depth, are joined into one band per border with same = 1
    (top, bottom) or 2 (left, right): one cell, so box sums can slide across the depths."""
    def box(flat):
        ys, xs = [f // W for f in flat], [f % W for f in flat]
        y0, y1, x0, x1 = min(ys), max(ys) + 1, min(xs), max(xs) + 1
        assert (y1 - y0) * (x1 - x0) == len(set(flat)) == len(flat), "a cell that is not a rectangle"
        return [y0, y1, x0, x1]

    rows, bands = [], {}
    for pix, cen in candidate_cells(rule, H, W, k, paper_circular):
        rect = box(pix) + box(cen) + [0]
        y0, y1, x0, x1 = rect[:4]
        line = 1 if y1 - y0 == 1 < x1 - x0 else 2 if x1 - x0 == 1 < y1 - y0 else 0
        if rule == "els-borders" and line and rect[:4] == rect[4:8]:
            end, span = (y0, (x0, x1)) if line == 1 else (x0, (y0, y1))
            band = bands.pop((line, span, end), None)  # the band this row (column) continues
            if band is not None:
                band[1 if line == 1 else 3] = band[5 if line == 1 else 7] = end + 1
                bands[line, span, end + 1] = band
                continue
            rect[8] = line
            bands[line, span, end + 1] = rect
        rows.append(rect)
    return torch.tensor(rows, dtype=torch.int32)


def pad_images(x: Tensor, r: int, circular: bool) -> Tensor:
    """Pad (N, C, H, W) by r on every side: zeros, or a circular wrap (any r, even r > H)."""
    if r == 0:
        return x
    if not circular:
        return F.pad(x, (r, r, r, r))
    H, W = x.shape[-2:]
    iy = torch.arange(-r, H + r, device=x.device) % H
    ix = torch.arange(-r, W + r, device=x.device) % W
    return x[:, :, iy][:, :, :, ix]


def window_index(centers: Tensor, C: int, H: int, W: int, k: int) -> Tensor:
    """Offsets (..., C*k*k) into a flattened padded image (C, H+2r, W+2r) of the k x k windows
    centred at `centers` (flat y*W + x); entries ordered (channel, dy, dx) like F.unfold."""
    Hp, Wp = H + k - 1, W + k - 1
    y, x = centers // W, centers % W
    c, dy, dx = torch.meshgrid(torch.arange(C), torch.arange(k), torch.arange(k), indexing="ij")
    offsets = (c * Hp * Wp + dy * Wp + dx).reshape(-1).to(centers.device)
    return (y * Wp + x)[..., None] + offsets


def stack_cells(cells, C: int, H: int, W: int, k: int, device) -> list:
    """Cells of equal shape stacked into groups for batched matrix products:
    [(pixels (G, R), query windows (G, R, D), candidate windows (G, L, D))]."""
    buckets = {}
    for pixels, centers in cells:
        buckets.setdefault((len(pixels), len(centers)), []).append((pixels, centers))
    groups = []
    for same in buckets.values():
        pixels = torch.tensor([p for p, _ in same], device=device)
        centers = torch.tensor([c for _, c in same], device=device)
        groups.append((pixels, window_index(pixels, C, H, W, k), window_index(centers, C, H, W, k)))
    return groups
