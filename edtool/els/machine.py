"""The ELS family of analytic score machines (SPEC 5): `is`, `ls`, `els-circular`, `els-borders`.

Every machine scores a noisy image x at time t pixel by pixel. The k x k window x_p around
pixel p (zero or circular padding) is compared with a set of candidate training windows P,
weighted by w(P) ∝ exp(-||x_p - a P||^2 / (2 b^2)) with a = sqrt(alpha_bar(t)), b^2 = beta(t),
and the score is s_p = -(x_p[center] - a E_w[P[center]]) / b^2, per channel.

The machines differ only in which training windows are candidates for which pixel. That rule
lives in `candidate_cells`: it splits the pixels into cells whose pixels share one candidate
set ("the windows centred at these positions, in every training image"). One streaming engine,
`posterior_moments`, does the rest for every rule: for all pixels of a cell at once it scores
a chunk of candidates with one matrix product, keeps a running log-sum-exp, and accumulates
the weighted sums (sum w, sum w c and, for the Jacobian, sum w P and sum w c P^T) in float64.

On the CPU in float32 the score's and the Jacobian's loops run fused in a compiled kernel
(`edtool.els.kernel`); `posterior_moments` (edtool.els.engine) is the fallback and the GPU path.

Many candidate windows are identical (on mnist5k only 38 % of the k = 3 windows are distinct:
the all-background window dominates). Each cell's distinct windows are kept once, with log of
their count added to their logit (`merge_plan`, `merged_keys`): the same weights, sums and
Jacobian, on fewer columns.

The Jacobian has a closed form (SPEC 5.3): d s_p / d x_q = (a^2/b^4) Cov_w(c, P[q - p]) -
delta_pq / b^2 for q in p's window, so it is a band of C*k*k numbers per output number, and
`band_ed` turns the band into ||J - J^T||_F, ||J||_F and the curl map exactly.

This module holds the machines' shared frame (`Machine`), the local machines (`LocalMachine`) and
their score field (`MachineField`); the ideal score `is` is `edtool.els.ideal`, and `make_machine`
(`edtool.els.factory`) checks the settings and builds either. The parts they share each have their
module: windows and cells (`els.windows`), the streaming engine (`els.engine`), merged keys
(`els.merging`), the band's ED (`els.band`), the compiled kernels (`els.kernel`), schedules
(`els.schedule`).

    m = make_machine("els-borders", images, labels, patch_size=5)  # edtool.els.factory
    with torch.no_grad():
        s = m.score(0.5, x)                     # (B, C, H, W)
    res = m.analytic_ed(0.5, x, curl_map=True)   # exact, from the closed form
    closed = m.field(0.5).closed_form(x)         # edtool.model.ClosedForm: the band and the score
"""

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from edtool.diffusion import alpha_bar, beta, score_to_eps
from edtool.els import kernel as els_kernels
from edtool.els.band import band_ed, band_valid
from edtool.els.engine import candidates_per_step, clamp_floor, gathered_keys, sliced_keys, streamed_moments
from edtool.els.merging import MERGE_MAX_ENTRIES, KeyCache, every_window_keys, merge_plan, merged_keys
from edtool.els.schedule import scale_index
from edtool.els.windows import candidate_cells, cell_rectangles, pad_images, stack_cells
from edtool.model import ClosedForm, ScoreField, ScoreModel


# From this patch size on, the CPU score of els-borders and els-circular takes its patch inner products from
# box sums (els.kernel.box_score: one exp and a few adds per candidate at any k) instead of the merged
# keys (2 k^2 flops per distinct candidate); measured by tests/benchmarks/bench_machines.py --per-k.
BOX_FROM_K = 9


class Machine(ScoreModel):
    """What every analytic score machine shares: settings, input checks, the split of a batch
    into runs of one patch size and one label, the padded training images; the ScoreModel
    interface (`.score`, `.eps`, `.field`, `.to`) and the closed form (`.jacobian`, `.closed_form`).
    Subclasses say how a run is scored (`_score_run`, `_jacobian_run`)."""

    padding = "zeros"

    def __init__(self, name, images, labels, patch_sizes, chunk_size, cache_bytes):
        self.name = name
        self.patch_sizes = patch_sizes  # None for `is`, else one size per scale entry
        self.chunk_size = chunk_size
        self.images = images
        self.labels = labels
        self._cache = {}  # padded training images and window indices
        self._keys = KeyCache(cache_bytes)

    @property
    def conditional(self) -> bool:
        """Made with labels: a label (B,) scores each sample against its class's images only."""
        return self.labels is not None

    @property
    def manifest(self) -> dict:
        return {"arch": self.name, "image_shape": list(self.images.shape[1:]), "padding": self.padding,
                "num_classes": None if self.labels is None else int(self.labels.max()) + 1}

    def to(self, device=None, dtype=None) -> "Machine":
        """The training images (and labels) on `device` in `dtype`; what was cached for the old ones is dropped."""
        self.images = self.images.to(device=device, dtype=dtype)
        self.labels = None if self.labels is None else self.labels.to(device=device)
        self._cache = {}
        self._keys = KeyCache(self._keys.budget)
        return self

    # -- settings ---------------------------------------------------------------------------

    def patch_size_at(self, t: float) -> Optional[int]:
        """The patch size used at time t (None for `is`, which uses the whole image)."""
        return self.patch_sizes[scale_index(t, len(self.patch_sizes))]

    def _coefficients(self, t: Tensor, x: Tensor):
        """a = sqrt(alpha_bar(t)) and b^2 = beta(t), shape (B,), in x's dtype and device."""
        t64 = t.to(torch.float64)
        return alpha_bar(t64).sqrt().to(x.dtype), beta(t64).to(x.dtype)

    def _times(self, t, x: Tensor) -> Tensor:
        """t as a (B,) float64 tensor on x's device; every value must lie in (0, 1]."""
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).detach().to(x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a float or a tensor of shape ({B},), got shape {tuple(t.shape)}")
        if not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError("t must lie in (0, 1]: at t = 0 the machines' score is undefined")
        return t

    def _labels(self, label, B: int, device) -> Optional[Tensor]:
        """label as (B,) int64 (an int is broadcast), or None for the unconditional machine."""
        if label is None:
            return None
        if self.labels is None:
            raise ValueError("a label was given but the machine was made without labels; pass labels to make_machine")
        label = torch.as_tensor(label, dtype=torch.int64).detach().to(device)
        if label.dim() == 0:
            label = label.expand(B)
        if label.shape != (B,):
            raise ValueError(f"label must be an int or a tensor of shape ({B},), got shape {tuple(label.shape)}")
        return label

    def _check_x(self, x: Tensor):
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.images.shape[1:]):
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.images.shape[1:]))}) like the training images, "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype}")

    def _runs(self, t, x: Tensor, label):
        """Checked (t, label) and the batch split into runs sharing one patch size and one label:
        [(index, k, label)]."""
        self._check_x(x)
        t = self._times(t, x)
        label = self._labels(label, x.shape[0], x.device)
        ks = [self.patch_size_at(v) for v in t.tolist()]
        labs = [None] * len(ks) if label is None else label.tolist()
        runs = {}
        for b, key in enumerate(zip(ks, labs)):
            runs.setdefault(key, []).append(b)
        return t, label, [(torch.tensor(idx, device=t.device), k, lab) for (k, lab), idx in runs.items()]

    # -- cached training data ---------------------------------------------------------------

    def _train(self, label, r: int, x: Tensor) -> Tensor:
        """The training images with this label, padded by r and flattened: (N, F)."""
        key = ("train", label, r, x.dtype, x.device)
        if key not in self._cache:
            images = self.images
            if label is not None:
                images = images[self.labels == label]
                if len(images) == 0:
                    raise ValueError(f"no training images have label {label}")
            images = images.to(device=x.device, dtype=x.dtype)
            self._cache[key] = pad_images(images, r, self.padding == "circular").flatten(1).contiguous()
        return self._cache[key]

    # -- public -----------------------------------------------------------------------------

    def score(self, t, x: Tensor, label=None) -> Tensor:
        """The machine's score s(t, x) (B, C, H, W); t a float or (B,), label None or (B,)."""
        t, label, runs = self._runs(t, x, label)
        if len(runs) == 1:
            _, k, lab = runs[0]
            return self._score_run(x, t, k, lab)
        idx = torch.cat([i for i, _, _ in runs])
        parts = [self._score_run(x[i], t[i], k, lab) for i, k, lab in runs]
        return torch.cat(parts)[torch.argsort(idx)]

    def eps(self, t, x: Tensor, label=None) -> Tensor:
        """The noise prediction eps_hat = -sqrt(beta) s that drives DDIM."""
        return score_to_eps(self.score(t, x, label), self._times(t, x).to(x.dtype))

    def closed_form(self, t, x: Tensor, label=None) -> ClosedForm:
        """The closed-form score Jacobian at x (see the subclass's `jacobian` for its shape), with the score
        where the same sums give it."""
        t, label, runs = self._runs(t, x, label)
        if len({k for _, k, _ in runs}) > 1:
            raise ValueError("jacobian: all samples of a batch must use the same patch size; split the batch by t")
        idx = torch.cat([i for i, _, _ in runs])
        parts = [self._jacobian_run(x[i], t[i], k, lab) for i, k, lab in runs]

        def in_order(pieces):
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)[torch.argsort(idx)]

        scores = [score for _, score in parts]
        return ClosedForm(in_order([jac for jac, _ in parts]), self.padding,
                          None if scores[0] is None else in_order(scores))

    def jacobian(self, t, x: Tensor, label=None) -> Tensor:
        """The closed-form score Jacobian (see the subclass for its shape)."""
        return self.closed_form(t, x, label).jacobian

    def field(self, t, label=None) -> "MachineField":
        """The score field x -> s(t, x) at one time, with its closed form."""
        return MachineField(self, t, label)

    def __repr__(self):
        sizes = "whole image" if self.patch_sizes is None else self.patch_sizes
        return f"{type(self).__name__}({self.name!r}, {len(self.images)} images, patch sizes {sizes})"



class LocalMachine(Machine):
    """The local machines `ls`, `els-circular`, `els-borders`: k x k windows, candidates per
    `candidate_cells`; identical candidate windows (of <= MERGE_MAX_ENTRIES entries) are merged with
    their count; the Jacobian is a band of C*k*k numbers per output number."""

    def __init__(self, name, images, labels, patch_sizes, chunk_size, cache_bytes, paper_circular=False):
        super().__init__(name, images, labels, patch_sizes, chunk_size, cache_bytes)
        self.padding = "circular" if name == "els-circular" else "zeros"
        self.paper_circular = paper_circular

    def _groups(self, k: int, x: Tensor) -> list:
        """The stacked candidate cells of this machine for patch size k, on x's device."""
        key = ("groups", k, x.device)
        if key not in self._cache:
            C, H, W = x.shape[1:]
            cells = candidate_cells(self.name, H, W, k, self.paper_circular)
            self._cache[key] = stack_cells(cells, C, H, W, k, x.device)
        return self._cache[key]

    def _sources(self, label, k, x: Tensor) -> list:
        """Per group, a function step -> chunks (G, D+3, <= step) of its candidate keys
        [1; P; |P|^2; log count]: the cached distinct windows with their counts when they fit
        the cache's budget, else every window gathered afresh from the padded images."""
        train = self._train(label, k // 2, x)
        groups = self._groups(k, x)
        gathered = [functools.partial(gathered_keys, train, idx) for _, _, idx in groups]
        every = sum(idx.shape[0] * (idx.shape[2] + 3) * idx.shape[1] for _, _, idx in groups) * len(train) * train.element_size()

        def plan():
            if every > 4 * self._keys.budget:  # merging would not bring it within the budget
                return math.inf, None
            if groups[0][2].shape[2] > MERGE_MAX_ENTRIES:  # large windows rarely repeat: kept unmerged (k = 11: 1.2-1.3x)
                return every, lambda: [every_window_keys(train, idx) for _, _, idx in groups]
            plans, need = [], 0
            for _, _, idx in groups:  # stop as soon as the distinct windows counted so far overflow the budget
                column = idx.shape[0] * (idx.shape[2] + 3) * train.element_size()  # bytes per merged column
                limit = (self._keys.budget - need) // column
                cells = []
                for cell in idx:  # the first cell over the limit ends the plan: the rest are not hashed
                    cells.append(merge_plan(train, cell, limit) if limit > 0 else None)
                    if cells[-1] is None:
                        return math.inf, None
                plans.append(cells)
                need += column * max(len(first) for first, _ in cells)

            def make():  # the old sets are evicted by now; each group's plan is freed once its keys are built
                keys = []
                for g, (_, _, idx) in enumerate(groups):
                    keys.append(merged_keys(train, idx, plans[g]))
                    plans[g] = None
                return keys

            return need, make

        cached = self._keys.get((label, k, x.dtype, x.device), plan)
        if cached is None:
            return gathered
        return [functools.partial(sliced_keys, keys) for keys in cached]

    def _moments(self, x, a, b2, k, label, jacobian: bool) -> Tensor:
        """Posterior moments per pixel (B, H*W, V): V = [1, c] (score) or [1, c] x [1, P]
        flattened (jacobian), in float64."""
        B, C, H, W = x.shape
        D = C * k * k
        center = torch.arange(C, device=x.device) * k * k + (k // 2) * k + k // 2
        value_rows = torch.cat([center.new_zeros(1), 1 + center])  # rows [1; c] of the keys
        xflat = pad_images(x, k // 2, self.padding == "circular").flatten(1)
        scale = (a / b2).view(B, 1, 1, 1)
        bias = (-a * a / (2 * b2)).view(B, 1, 1, 1)

        def values_of(keys):  # keys (G, D+3, M) -> values (G, V, M)
            vc = keys[:, value_rows]
            if not jacobian:
                return vc
            return (vc[:, :, None] * keys[:, None, : D + 1]).flatten(1, 2)

        width = (1 + C) * (1 + D) if jacobian else D + 3
        pixels, pieces = [], []
        for (pix, query_index, _), source in zip(self._groups(k, x), self._sources(label, k, x)):
            G, R, _ = query_index.shape
            q = xflat.index_select(1, query_index.reshape(-1)).view(B, G, R, D)
            q = torch.cat([torch.zeros_like(q[..., :1]), q * scale, bias.expand(B, G, R, 1), torch.ones_like(q[..., :1])], -1)
            q = q.transpose(0, 1).reshape(G, B * R, D + 3)  # rows [0, a x_p / b^2, -a^2 / (2 b^2), 1]
            fused = len(value_rows) <= 4 and els_kernels.usable(q)
            lib = els_kernels.kernels() if fused else None
            if lib is not None:  # the fused kernels keep no logits: chunks bounded by their keys alone
                chunks = source(source.args[0].shape[-1] if source.func is sliced_keys
                                else candidates_per_step(G, 0, D + 3, self.chunk_size))
                if jacobian:
                    m = els_kernels.jacobian_moments(lib, q, chunks, value_rows, D + 1, clamp_floor(q.dtype))
                else:
                    m = els_kernels.score_moments(lib, q, chunks, value_rows, clamp_floor(q.dtype))
            else:  # the torch path holds a block of logits too: rows x candidates count
                m = streamed_moments(q, source, candidates_per_step(G, B * R, width, self.chunk_size), values_of)
            pieces.append(m.view(G, B, R, -1).transpose(0, 1).reshape(B, G * R, -1))
            pixels.append(pix.reshape(-1))
        order = torch.argsort(torch.cat(pixels))
        return torch.cat(pieces, 1)[:, order]

    def _boxed(self, k: int, x: Tensor) -> bool:
        """Whether this score runs on box sums (els.kernel.box_score): the els machines from BOX_FROM_K on,
        in float32 on the CPU outside autograd (ls has one candidate position per pixel: nothing to share)."""
        return (self.name != "ls" and k >= BOX_FROM_K and x.shape[1] <= 3
                and els_kernels.usable(x.flatten(1)[None, :, :1]))

    def _box_moments(self, lib, x, a, b2, k, label) -> Tensor:
        """_moments of the score (B, H*W, 1 + C) from box sums. The kernel's vectors run along rows of
        candidates, so cells taller than wide (the left and right borders) are scored on the transposed
        images. Kept per (label, k): the padded training images, every candidate window's |P|^2, the
        cells' rectangles, each also transposed."""
        B, C, H, W = x.shape
        key = ("box", label, k)
        if key not in self._cache:
            images = self._train(label, k // 2, x).view(-1, C, H + k - 1, W + k - 1)
            norms = torch.nn.functional.avg_pool2d(images.double().square().sum(1, keepdim=True), k, stride=1,
                                                   divisor_override=1)[:, 0]
            cells = cell_rectangles(self.name, H, W, k, self.paper_circular)
            # candidates in columns (left and right bands), or in more rows than columns: transposed
            tall = (cells[:, 8] == 2) | ((cells[:, 8] == 0) & ((cells[:, 5] - cells[:, 4]) > (cells[:, 7] - cells[:, 6])))
            flipped = cells[tall][:, [2, 3, 0, 1, 6, 7, 4, 5, 8]]
            flipped[:, 8] = flipped[:, 8].clamp(max=1)  # same column -> same row
            self._cache[key] = [
                (els_kernels.with_tail(images), els_kernels.with_tail(norms), cells[~tall]),
                (els_kernels.with_tail(images.transpose(-1, -2)), els_kernels.with_tail(norms.transpose(-1, -2)), flipped),
            ]
        xpad = pad_images(x, k // 2, self.padding == "circular")
        out = torch.zeros(B, H * W, 1 + C, dtype=torch.float64)
        for transposed, (images, norms, cells) in enumerate(self._cache[key]):
            if len(cells):
                part = els_kernels.box_score(lib, els_kernels.with_tail(xpad.transpose(-1, -2) if transposed else xpad),
                                             images, norms, cells, k, a / b2, -a * a / (2 * b2), clamp_floor(x.dtype))
                out += part.view(B, W, H, -1).transpose(1, 2).reshape(out.shape) if transposed else part
        return out

    def _score_run(self, x, t, k, label) -> Tensor:
        """The score for samples that share patch size k and label."""
        a, b2 = self._coefficients(t, x)
        B, C, H, W = x.shape
        lib = els_kernels.kernels() if self._boxed(k, x) else None
        if lib is not None:
            m = self._box_moments(lib, x, a, b2, k, label)
        else:
            m = self._moments(x, a, b2, k, label, jacobian=False)  # (B, HW, 1 + C)
        mean = m[..., 1:].transpose(1, 2).reshape(B, C, H, W)
        return -(x - a.view(B, 1, 1, 1) * mean.to(x.dtype)) / b2.view(B, 1, 1, 1)

    def _jacobian_run(self, x, t, k, label) -> tuple:
        """The closed-form band for samples sharing k and label (SPEC 5.3), and the score from the same sums."""
        a, b2 = self._coefficients(t, x)
        B, C, H, W = x.shape
        D = C * k * k
        m = self._moments(x, a, b2, k, label, jacobian=True).view(B, H * W, 1 + C, 1 + D)
        cov = m[..., 1:, 1:] - m[..., 1:, :1] * m[..., :1, 1:]  # Cov_w(c_i, P_j): (B, HW, C, D)
        center = torch.arange(C, device=x.device) * k * k + (k // 2) * k + k // 2
        delta = torch.zeros(C, D, dtype=torch.float64, device=x.device)
        delta[torch.arange(C), center] = 1
        a64, b64 = a.double().view(B, 1, 1, 1), b2.double().view(B, 1, 1, 1)
        band = (a64**2 / b64**2) * cov - delta / b64
        band = band.view(B, H, W, C, C, k, k).permute(0, 3, 1, 2, 4, 5, 6).to(x.dtype)
        if self.padding == "zeros":
            band = band * band_valid(H, W, k, x.device)[None, None, :, :, None]
        mean = m[..., 1:, 0].transpose(1, 2).reshape(B, C, H, W)  # E_w[c], the score's posterior mean
        score = -(x - a.view(B, 1, 1, 1) * mean.to(x.dtype)) / b2.view(B, 1, 1, 1)
        return band, score

    def jacobian(self, t, x: Tensor, label=None) -> Tensor:
        """The closed-form band (B, C, H, W, C, k, k), entry [b, c, y, x, c', dy, dx]
        = d s_{c,y,x} / d x_{c', y+dy-k//2, x+dx-k//2} (0 at zero padding; circular positions wrap)."""
        return super().jacobian(t, x, label)

    def analytic_ed(self, t, x: Tensor, label=None, curl_map: bool = False) -> dict:
        """Exact ed_fro, jac_fro (B,) and the curl map (B, H, W) or None, from the band."""
        return band_ed(self.jacobian(t, x, label), self.padding, curl_map)


class MachineField(ScoreField):
    """A machine's score field at a fixed time (and label), with its closed form: the estimators of
    edtool.jacobian take the exact Jacobian from `closed_form(x)`, and the sampler the score that came with it."""

    def __init__(self, machine: Machine, t, label=None):
        self.machine, self.t, self.label = machine, t, label

    def __call__(self, x: Tensor) -> Tensor:
        return self.machine.score(self.t, x, self.label)

    def closed_form(self, x: Tensor) -> ClosedForm:
        with torch.no_grad():
            return self.machine.closed_form(self.t, x, self.label)

