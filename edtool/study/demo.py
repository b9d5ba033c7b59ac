"""`edtool demo`: a short guided tour on the bundled data and checkpoints that explains each number.

It checks the yardstick on two fields whose answer is known (a gradient field and a rotation),
then runs one small study through the ordinary pipeline (compute, aggregate, plot) and reads the
results back from the store, so everything it prints can be found again in the files it names.
"""

from pathlib import Path
from typing import Callable, List

import numpy as np
import torch

from edtool.errors import EdtoolError
from edtool.text import paragraph
from edtool.config import ComputeConfig
from edtool.study.compute import Reporter, compute

DEFAULT_OUT = Path("results/exterior_derivative_demo")
CHECK_TIMES = (0.9, 0.5, 0.1)

MEANINGS = {
    "ed_fro": "||J - J^T||_F, the size of the exterior derivative of the score (0 for a gradient field)",
    "asym": "||J - J^T||_F / (2 ||J||_F), scale-free: 0 = conservative (a gradient), 1 = pure rotation",
    "ed_stderr": "the standard error of ed_fro from the random probes (0 when computed exactly)",
}


def ideal_score(images: torch.Tensor, t: float):
    """The exact score of the noised empirical distribution of `images`, in plain torch: the gradient of
    log sum_i N(x; sqrt(alpha_bar) y_i, beta I), so its Jacobian is symmetric."""
    from edtool.diffusion import alpha_bar, beta

    a, b2 = alpha_bar(torch.tensor(t)).sqrt(), beta(torch.tensor(t))
    y = images.flatten(1)

    def score(x):
        d2 = ((x.flatten(1)[:, None, :] - a * y[None]) ** 2).sum(-1)
        w = torch.softmax(-d2 / (2 * b2), dim=1)
        return (-(x.flatten(1) - a * w @ y) / b2).view_as(x)

    return score


def yardstick_checks(images: torch.Tensor, seed: int = 0) -> dict:
    """asym, by the same Hutchinson probes the networks get, of two fields whose answer theory fixes:
    the ideal score of 100 digits (a gradient: 0) and a rotation x -> A x with A = -A^T (1)."""
    from edtool.diffusion import add_noise
    from edtool.jacobian.ed import exterior_derivative

    g = torch.Generator().manual_seed(seed)
    t = 0.5  # the posterior over the 100 digits is spread out here, so J is far from -I / beta
    x = add_noise(images[200:201], torch.tensor([t]), torch.randn(images[:1].shape, generator=g))
    gradient = exterior_derivative(ideal_score(images[:100], t), x, method="hutchinson", probes=32, seed=seed)
    n = x[0].numel()
    m = torch.randn(n, n, generator=g)
    rotation_matrix = m - m.T
    rotation = exterior_derivative(lambda y: (y.flatten(1) @ rotation_matrix.T).view_as(y), x,
                                   method="hutchinson", probes=32, seed=seed)
    return {"ideal_score_asym": float(gradient.asym[0]), "rotation_asym": float(rotation.asym[0])}


def _nearest_steps(times: np.ndarray, wanted=CHECK_TIMES) -> List[int]:
    return sorted({int(np.argmin(np.abs(times - t))) for t in wanted}, key=lambda j: -times[j])


def run_demo(out_dir=DEFAULT_OUT, models=("unet", "resnet", "els"), nsteps: int = 10, seed: int = 0,
             device: str = "auto", reporter: Reporter = None, say: Callable[[str], None] = print) -> dict:
    """Explain, measure, and write the store, summary and figures under out_dir; returns the summary."""
    from edtool.data import load_dataset
    from edtool.study.aggregate import aggregate_run
    from edtool.study.plots import plot_run

    out_dir = Path(out_dir)
    say("[bold]edtool demo[/bold]: how far are diffusion score fields from being conservative?")
    say(paragraph("A score field s(t, x) that is the gradient of a log-density has a symmetric Jacobian "
                  "J = ds/dx. Trained networks are not forced to be gradients; edtool measures the antisymmetric "
                  "part of J (the exterior derivative) along the reverse-diffusion path.") + "\n")

    images, _ = load_dataset("mnist5k")
    say("[bold]1. Data[/bold]")
    say(paragraph(f"mnist5k, {len(images)} real MNIST digits shipped with edtool, "
                  f"{'x'.join(map(str, images.shape[1:]))} (channels x height x width), values in [-1, 1]; "
                  f"n = {images[0].numel()} numbers per image, so J is n-by-n.", indent=3) + "\n")
    checks = _say_yardstick(images, say)
    summary = _measure_one_path(out_dir, models, nsteps, seed, device, reporter, say)
    stats = aggregate_run(summary["location"])
    figures = plot_run(summary["location"], out_dir=out_dir)
    _say_summary(summary["location"], stats, say)
    say(f"[bold]5. Files[/bold] in {out_dir}")
    say(paragraph("run/ed.zarr (every number above; `xarray.open_zarr` reads it), run/summary_stats.json, "
                  + ", ".join(p.name for p in figures), indent=3))
    return {"checks": checks, "summary": stats, "figures": [str(p) for p in figures],
            "location": summary["location"], "timings": summary["timings"]}


def _say_yardstick(images: torch.Tensor, say) -> dict:
    """Section 2: asym of the two fields whose answer is known."""
    say("[bold]2. The yardstick on fields whose answer is known[/bold]")
    checks = yardstick_checks(images)
    say(f"   exact score of 100 noised digits, t = 0.5:  asym = {checks['ideal_score_asym']:.1e}\n"
        "      a true gradient field: conservative up to float rounding")
    say(f"   a pure rotation x -> A x (A = -A^T):        asym = {checks['rotation_asym']:.3f}\n"
        "      as rotational as a field can be\n")
    return checks


def _measure_one_path(out_dir: Path, models, nsteps: int, seed: int, device: str, reporter, say) -> dict:
    """Section 3: one DDIM path per model into out_dir/run, then the numbers at three times read back."""
    from edtool.store.run import open_run

    say("[bold]3. One reverse-diffusion path per model[/bold]")
    say(paragraph(f"{nsteps} DDIM steps from seed {seed}; each model follows its own path from the same noise",
                  indent=3))
    run_dir = out_dir / "run"
    cfg = ComputeConfig(models=list(models), nsteps=nsteps, realizations=1, seed=seed, device=device,
                        run_dir=str(run_dir), maps=True)
    try:
        summary = compute(cfg, reporter)
    except EdtoolError as e:  # the store's advice names compute's --run and --overwrite, which demo has not
        if "you asked for" not in str(e):
            raise
        raise EdtoolError(f"{str(e).split(': use the same settings')[0]}: give the demo another --out, or delete "
                          f"{run_dir} to run it there again") from None
    for note in summary["notes"]:
        say(f"   note: {note}")

    run = open_run(summary["location"])
    times = run.read("time")
    say("\n   What the numbers mean:")
    for key, meaning in MEANINGS.items():
        say(paragraph(f"{key:<10} {meaning}", indent=5, hang=16))
    for j in _nearest_steps(times):
        say(f"\n   t = {times[j]:.2f} " + ("(mostly noise)" if times[j] > 0.7 else
                                          "(the image is forming)" if times[j] > 0.3 else "(fine details)"))
        for m, name in enumerate(run.models):
            ed, se, asym = (float(run.read(q, m)[0, j]) for q in ("ed_fro", "ed_stderr", "asym"))
            error = "exact" if se == 0 else f"+- {se:.2g}"
            say(f"     {name:<8} ed_fro = {ed:10.4g} ({error:>10})   asym = {asym:.4f}")
    return summary


def _say_summary(location: str, stats: dict, say) -> None:
    """Section 4: mean ED and asym per model over the path, and which is most conservative."""
    from edtool.study.aggregate import format_number
    from edtool.store.run import open_run

    names = open_run(location).models
    say("\n[bold]4. Summary[/bold]")
    say(paragraph("over the steps of this one path; the seed tool's 'mean ED' is of eps, ours of the score",
                  indent=3))
    for name in names:
        s = stats[name]
        say(f"   {name:<8} mean ED = {format_number(s['mean_ed_fro'])} +- {format_number(s['std_ed_fro'])}   "
            f"mean asym = {format_number(s['mean_asym'])}")
    measured = [name for name in names if stats[name]["mean_asym"] is not None]
    if measured:
        ranked = sorted(measured, key=lambda name: stats[name]["mean_asym"])
        say(paragraph(f"most conservative: {ranked[0]}; least: {ranked[-1]}. One noise realization only: "
                      "`edtool analyze --multiple 10` gives error bars.", indent=3) + "\n")
