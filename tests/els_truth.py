"""Independent truth for the ELS-family machines: a plain per-pixel brute force written from SPEC 5.1,
the exact score of the empirical distribution (autograd), a jacrev Jacobian, and the small data they run on."""

import math

import torch

from edtool.diffusion import alpha_bar, beta


def coefficients(t):
    t = torch.tensor(t, dtype=torch.float64)
    return alpha_bar(t).sqrt().item(), beta(t).item()


def data(n=12, shape=(1, 6, 6), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand((n,) + shape, generator=g) * 2 - 1).to(dtype)
    labels = torch.arange(n) % 3
    return images, labels


def noisy(images, t, b=2, seed=1, pure_noise=True):
    """Points on a diffusion trajectory: noised training images (the last one pure noise)."""
    g = torch.Generator().manual_seed(seed)
    a, b2 = coefficients(t)
    eps = torch.randn((b,) + images.shape[1:], generator=g, dtype=images.dtype)
    x = a * images[:b] + math.sqrt(b2) * eps
    if pure_noise:
        x[-1] = eps[-1]
    return x


def window(img, y, x, k, circular):
    """The k x k window (C, k, k) of img (C, H, W) centred at (y, x): zeros or wrap outside."""
    C, H, W = img.shape
    r = k // 2
    out = torch.zeros(C, k, k, dtype=img.dtype)
    for dy in range(k):
        for dx in range(k):
            yy, xx = y + dy - r, x + dx - r
            if circular:
                out[:, dy, dx] = img[:, yy % H, xx % W]
            elif 0 <= yy < H and 0 <= xx < W:
                out[:, dy, dx] = img[:, yy, xx]
    return out


def candidate_positions(rule, y, x, H, W, k, paper):
    """Where the candidate windows of pixel (y, x) sit in each training image, per SPEC 5.1."""
    r = k // 2
    inside = [(v, u) for v in range(r, H - r) for u in range(r, W - r)]
    if rule == "ls":
        return [(y, x)]
    if rule == "els-circular":
        return inside if paper else [(v, u) for v in range(H) for u in range(W)]
    near_top, near_bottom, near_left, near_right = y < r, y > H - 1 - r, x < r, x > W - 1 - r
    n_edges = near_top + near_bottom + near_left + near_right
    if n_edges == 0:
        return inside
    if n_edges >= 2:
        return [(y, x)]
    if near_top or near_bottom:  # same row (same depth from that edge), anywhere along it
        return [(y, u) for u in range(r, W - r)]
    return [(v, x) for v in range(r, H - r)]


def brute_force(rule, images, x, t, k, paper=False, nearest=False, gaps=None):
    """Score by enumerating every pixel's candidate windows and a softmax (or its t -> 0 limit).
    gaps, if a tensor like x[:, 0], receives each pixel's log-weight gap between best and runner-up."""
    a, b2 = coefficients(t)
    circular = rule == "els-circular"
    B, C, H, W = x.shape
    r = k // 2
    windows = {}
    s = torch.zeros_like(x)
    for bi in range(B):
        for y in range(H):
            for xx in range(W):
                xp = window(x[bi], y, xx, k, circular)
                cands = []
                for v, u in candidate_positions(rule, y, xx, H, W, k, paper):
                    for i in range(len(images)):
                        if (i, v, u) not in windows:
                            windows[(i, v, u)] = window(images[i], v, u, k, circular)
                        cands.append(windows[(i, v, u)])
                P = torch.stack(cands)
                logw = -((xp - a * P) ** 2).sum((1, 2, 3)) / (2 * b2)
                if gaps is not None:
                    top2 = logw.topk(2).values if len(logw) > 1 else torch.cat([logw, logw - math.inf])
                    gaps[bi, y, xx] = top2[0] - top2[1]
                if nearest:
                    w = torch.zeros_like(logw)
                    w[logw.argmax()] = 1
                else:
                    w = torch.softmax(logw, 0)
                s[bi, :, y, xx] = -(xp[:, r, r] - a * (w @ P[:, :, r, r])) / b2
    return s


def ideal_truth(images, x, t):
    """The exact score of the empirical distribution: grad log sum_i N(x; a y_i, b^2 I)."""
    a, b2 = coefficients(t)
    x = x.clone().requires_grad_(True)
    d2 = ((x[:, None] - a * images[None]) ** 2).flatten(2).sum(-1)
    torch.logsumexp(-d2 / (2 * b2), 1).sum().backward()
    return x.grad


def jacrev_dense(machine, t, x, label=None):
    """Autograd Jacobian (B, n, n) of the machine's own score, one sample at a time."""
    out = []
    for b in range(x.shape[0]):
        lab = None if label is None else label[b : b + 1]
        f = lambda v: machine.score(t, v.view(1, *x.shape[1:]), lab).flatten()
        out.append(torch.func.jacrev(f)(x[b].flatten()))
    return torch.stack(out)


def mnist_subset(n, seed=0):
    """n real MNIST digits (mnist5k, 32 x 32 in [-1, 1]) and their labels: mostly background, so
    many candidate windows are identical."""
    from edtool.data import load_dataset

    images, labels = load_dataset("mnist5k")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
