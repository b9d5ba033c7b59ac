"""How alike a machine's samples are to the network's (SPEC 5.4): r, the Pearson correlation of two
final images (what the paper calls "r^2"), r2 = r^2, their medians and IQRs over seeds, the seeds on
which a machine beats the ideal score machine `is`, and the lines `sample` prints."""

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

def pearson_r(a, b) -> float:
    """Pearson correlation r of two images (each flattened and mean-subtracted): the cosine of the
    two centred images, what the paper's evaluation script computes (SPEC 5.4). NaN with a warning
    when either is constant."""
    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64).ravel()
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson_r: images differ in size ({a.size} vs {b.size})")
    a, b = a - a.mean(), b - b.mean()
    den = float((a @ a) * (b @ b))
    if not den > 0:
        warnings.warn("the correlation with a constant image is undefined; NaN")
        return float("nan")
    return float(np.clip((a @ b) / math.sqrt(den), -1.0, 1.0))


def r2(a, b) -> float:
    """r^2, the squared Pearson correlation of two images (the coefficient of determination); NaN
    with a warning when either is constant."""
    return pearson_r(a, b) ** 2


AGREEMENT_DEFINITIONS = {
    "r": "Pearson correlation of the machine's and the network's final images, each flattened and mean-subtracted "
         "(the cosine of the centred images). The paper's evaluation script computes this number and its figures and "
         "abstract call it r^2: its median 0.94 for the best MNIST pairing is a value of r.",
    "r2": "r squared, the usual coefficient of determination (0.94 as r is 0.88 as r2)",
    "median_r, median_r2": "medians over the seeds with a finite value",
    "iqr_r, iqr_r2": "interquartile range over the same seeds: [25th, 75th percentile]",
    "beats_is": "seeds on which the machine's r is larger than the ideal score machine's (is) r for the same seed: "
                "wins, seeds compared, fraction = wins / seeds (by_r2: the same with r2, which differs only where r < 0)",
}


def agreement_stats(r_values: Sequence[float], baseline_r: Optional[Sequence[float]] = None) -> dict:
    """Median and interquartile range of per-seed r and r2 = r^2 (NaN seeds left out), and, given the
    baseline machine's r for the same seeds, on how many the machine beats it (SPEC 5.4)."""
    r = np.asarray(r_values, dtype=np.float64)
    out = {}
    for name, v in (("r", r), ("r2", r ** 2)):
        v = v[np.isfinite(v)]
        q25, q50, q75 = np.percentile(v, [25, 50, 75]) if v.size else (math.nan,) * 3
        out[f"median_{name}"], out[f"iqr_{name}"] = float(q50), [float(q25), float(q75)]
    out["n_seeds"] = int(np.isfinite(r).sum())
    if baseline_r is not None:
        b = np.asarray(baseline_r, dtype=np.float64)
        both = np.isfinite(r) & np.isfinite(b)
        n = int(both.sum())
        wins, wins2 = int((r[both] > b[both]).sum()), int((r[both] ** 2 > b[both] ** 2).sum())
        out["beats_is"] = {"wins": wins, "seeds": n, "fraction": wins / n if n else math.nan,
                           "by_r2": {"wins": wins2, "fraction": wins2 / n if n else math.nan}}
    return out


def agreement_report(summary: dict) -> str:
    """The lines `sample` prints: per machine the median r (the number the paper calls r^2) with its IQR,
    r2 = r^2, and the seeds on which it beats is."""
    lines = [f"agreement with {summary['network']} over {len(summary['seeds'])} seeds: r = Pearson correlation of the "
             "final images, the number the paper calls r^2 (its best MNIST pairing: median 0.94); r2 = r squared"]
    for kind, res in summary["machines"].items():
        lo, hi = res["iqr_r"]
        line = (f"  {kind:<13} median r {res['median_r']:.3f} (IQR {lo:.3f}-{hi:.3f})   "
                f"median r2 {res['median_r2']:.3f}")
        if "beats_is" in res:
            b = res["beats_is"]
            line += f"   beats is on {b['wins']}/{b['seeds']} seeds"
        if res.get("baseline"):
            line += "   (baseline)"
        lines.append(line)
    return "\n".join(lines)
