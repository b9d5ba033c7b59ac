"""The demo's yardstick and its tour: the numbers it explains are the ones in the store it writes."""

import json

import numpy as np
import torch
from typer.testing import CliRunner

from edtool.cli import app
from edtool.data import load_dataset
from edtool.study.demo import ideal_score, yardstick_checks
from edtool.store.run import open_run


def test_ideal_score_is_the_gradient_of_the_mixture_log_density():
    """The demo's ideal score equals autograd's gradient of log sum_i N(x; a y_i, b^2 I)."""
    from edtool.diffusion import alpha_bar, beta

    y = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    t = 0.6
    a, b2 = alpha_bar(torch.tensor(t)).sqrt(), beta(torch.tensor(t))
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    logp = torch.logsumexp(-((x.flatten(1)[:, None] - a * y.flatten(1)[None]) ** 2).sum(-1) / (2 * b2), 1).sum()
    (grad,) = torch.autograd.grad(logp, x)
    torch.testing.assert_close(ideal_score(y, t)(x.detach()), grad)


def test_yardstick_gradient_zero_rotation_one():
    images, _ = load_dataset("mnist5k")
    checks = yardstick_checks(images)
    assert checks["ideal_score_asym"] < 1e-4
    assert abs(checks["rotation_asym"] - 1) < 1e-5
    # the yardstick is not trivially symmetric: the posterior covariance term of J is a real part of it
    from edtool.diffusion import add_noise, beta
    g = torch.Generator().manual_seed(0)
    x = add_noise(images[200:201], torch.tensor([0.5]), torch.randn(images[:1].shape, generator=g))
    jac = torch.func.jacrev(lambda v: ideal_score(images[:100], 0.5)(v.view(1, 1, 32, 32)).flatten())(x.flatten())
    covariance_part = jac + torch.eye(1024) / beta(torch.tensor(0.5))
    assert torch.linalg.norm(covariance_part) > 0.3 * torch.linalg.norm(jac)


def test_demo_tour_prints_the_stored_numbers(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--models", "resnet,is", "--nsteps", "3"])
    assert result.exit_code == 0, result.output
    run = open_run(out / "run")
    assert run.done_mask().all()
    asym = run.read("asym")
    for m, name in enumerate(run.models):
        for j in range(run.nsteps):
            assert f"asym = {asym[0, m, j]:.4f}" in result.output
    assert np.isfinite(asym).all()
    summary = json.loads((out / "run" / "summary_stats.json").read_text())
    assert summary["resnet"]["num_realizations"] == 1
    for name in ("ed_analysis_single.png", "asym_vs_time.png", "curl_maps.png"):
        assert (out / name).stat().st_size > 10_000
