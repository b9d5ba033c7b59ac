"""DDIM and the schedule against independent truth (SPEC 2); the time grid and the seeds of a realization."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from edtool.diffusion import (TimeGrid, add_noise, alpha_bar, as_grid, beta, ddim_sample, ddpm_sample, drawn_labels,
                              eps_to_score, initial_noise, initial_noises, realization_seeds, score_to_eps,
                              seed_labels, timesteps)
from edtool.els import calibrate as calib
from edtool.els import schedule
from edtool.els.factory import make_machine
from edtool.els.sampling import sample
from edtool.networks import checkpoints
from edtool.store.run import create_run, open_run
from edtool.study.aggregate import aggregate_run
from helpers import config, MachineNetwork, make_legacy, REPO, toy_images

pytestmark = pytest.mark.usefixtures("tiny_networks")


def test_schedule_matches_the_paper_formula():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = 1 - torch.cos(t / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(beta(t), expected)
    assert torch.allclose(alpha_bar(t) + beta(t), torch.ones_like(t))
    assert beta(torch.tensor(0.0)) == 0 and 0.999 < beta(torch.tensor(1.0)) < 1


def test_timesteps_run_from_one_down_to_zero():
    assert timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and timesteps(4).dtype == torch.float64


def test_score_noise_round_trip():
    t = torch.tensor([0.3, 0.9])
    eps = torch.randn(2, 1, 4, 4)
    assert torch.allclose(score_to_eps(eps_to_score(eps, t), t), eps, atol=1e-6)
    assert torch.allclose(eps_to_score(eps, t)[1], -eps[1] / beta(t[1]).sqrt())


def test_one_image_training_set_lands_on_that_image():
    """The exact denoiser of a delta distribution makes DDIM land on the image."""
    y = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1

    def ideal_eps(t, x):  # eps such that sqrt(ab) y + sqrt(b) eps = x
        ab, b = alpha_bar(t).view(-1, 1, 1, 1), beta(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * y) / b.sqrt()

    x = initial_noise(3, (4, 1, 8, 8), dtype=torch.float64)
    out = ddim_sample(ideal_eps, x, timesteps(7))
    assert torch.allclose(out, y.expand_as(out), atol=1e-10)


def test_gaussian_data_statistics_are_reproduced():
    """For N(mu, s^2 I) data the score is known in closed form; DDIM's output has mean mu, std s."""
    mu, s = 0.4, 0.3

    def gaussian_eps(t, x):
        ab, b = alpha_bar(t).view(-1, 1, 1, 1), beta(t).view(-1, 1, 1, 1)
        score = -(x - ab.sqrt() * mu) / (ab * s**2 + b)
        return score_to_eps(score, t)

    g = torch.Generator().manual_seed(0)
    t1 = torch.tensor(1.0, dtype=torch.float64)
    std1 = (alpha_bar(t1) * s**2 + beta(t1)).sqrt()
    x = alpha_bar(t1).sqrt() * mu + std1 * torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = ddim_sample(gaussian_eps, x, timesteps(100))
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.03)
    # ancestral sampling reaches the same law by another road (fresh noise each step), from pure noise
    noise = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = ddpm_sample(gaussian_eps, noise, 200, seed=1)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.03)
    assert torch.equal(ddpm_sample(gaussian_eps, noise, 200, seed=1), out)  # the seed fixes the draw


def test_ancestral_sampling_lands_on_a_single_training_image_and_clips():
    """With the exact denoiser of a delta distribution every ancestral step's x0_hat is the image itself."""
    y = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1

    def ideal_eps(t, x):
        ab, b = alpha_bar(t).view(-1, 1, 1, 1), beta(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * y) / b.sqrt()

    x = initial_noise(3, (4, 1, 8, 8), dtype=torch.float64)
    assert torch.allclose(ddpm_sample(ideal_eps, x, 7, seed=5), y.expand(4, -1, -1, -1), atol=1e-10)
    # a denoiser that overshoots the data range is clipped back into [-clip, clip]
    far = ddpm_sample(lambda t, x: -3 * x, x, 5, clip_x0=1.0)
    assert far.abs().max().item() <= 1.0 + 1e-12


def test_on_step_sees_every_point_before_its_update():
    seen = []
    ddim_sample(lambda t, x: torch.zeros_like(x), torch.ones(1, 1, 2, 2), 5, on_step=lambda j, t, x: seen.append((j, t)))
    assert seen == [(j, (5 - j) / 5) for j in range(5)]


def test_the_model_sees_the_grid_times_exactly_and_x_keeps_its_dtype():
    """eps_fn gets t_j of the grid as float64, bit for bit (what a machine's schedule lookup needs),
    and a float64 eps does not turn a float32 x into float64; an int is short for timesteps(N)."""
    seen = []

    def eps_fn(t, x):
        seen.append(t)
        return torch.zeros_like(x, dtype=torch.float64) + t[:, None, None, None]

    x = torch.ones(2, 1, 2, 2)
    out = ddim_sample(eps_fn, x, timesteps(20))
    assert out.dtype == torch.float32 and len(seen) == 20
    assert all(t.dtype == torch.float64 and t.tolist() == [(20 - j) / 20] * 2 for j, t in enumerate(seen))
    assert torch.equal(ddim_sample(eps_fn, x, 20), out)
    halfway = ddim_sample(eps_fn, x, torch.tensor([1.0, 0.5]))  # a custom grid: two points, one step
    assert torch.equal(halfway, ddim_sample(eps_fn, x, timesteps(2)[:2]))
    with pytest.raises(ValueError, match="decreasing"):
        ddim_sample(eps_fn, x, [0.0, 1.0])


def test_forward_process_and_initial_noise_are_reproducible():
    assert torch.equal(initial_noise(7, (2, 1, 4, 4)), initial_noise(7, (2, 1, 4, 4)))
    x0, eps, t = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([0.5])
    assert torch.allclose(add_noise(x0, t, eps), alpha_bar(t).sqrt() * x0)
    with pytest.raises(ValueError):
        ddim_sample(lambda t, x: x, torch.ones(1, 1, 2, 2), 0)


# ------------------------------------------------------------------ the time grid and the seeds
# One time grid and one home for what a realization's seed fixes.
#
# The DDIM grid is a value (diffusion.TimeGrid) built once per run: the store records the times the
# run used (and does not import the sampler), a calibration's "t" and a schedule's entry times are
# the grid's ascending entry times, and a store written before still opens, resumes and aggregates.
# Every stage starts realization s from the same x_T and, for a conditional network, the same label.


# ------------------------------------------------------------------ the grid itself


def test_the_grid_in_its_two_orders():
    g = TimeGrid(4)
    assert g.times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and g.times.dtype == torch.float64
    assert g.step_times.tolist() == [1.0, 0.75, 0.5, 0.25]  # step j at (N - j) / N
    assert g.entry_times == (0.25, 0.5, 0.75, 1.0)  # entry i at (i + 1) / N
    rows = torch.arange(8).view(4, 2)  # rows in step order
    assert g.as_entries(rows).tolist() == [[6, 7], [4, 5], [2, 3], [0, 1]]  # entry i is step N - 1 - i
    with pytest.raises(ValueError, match="3 rows for a grid of 4 steps"):
        g.as_entries(torch.zeros(3))
    assert as_grid(4) == g and as_grid(g) is g and torch.equal(timesteps(4), g.times)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            TimeGrid(bad)
    g.times[0] = 7  # a caller's tensor is its own: the grid cannot be changed through it
    assert g.times[0] == 1.0


@pytest.mark.parametrize("n", [1, 3, 7, 10, 20, 49, 1000, 99_999])
def test_entry_times_are_the_step_times_bit_for_bit_and_the_schedule_uses_them(n):
    """Entry i is for t = (i + 1) / N exactly (as Python divides), the same float64 values as the step
    times, so a machine running the grid finds its own entry at every step (schedule.scale_index)."""
    g = TimeGrid(n)
    assert list(g.entry_times) == [(i + 1) / n for i in range(n)]
    assert sorted(g.step_times.tolist()) == list(g.entry_times)
    assert schedule._schedule_times(n) == g.entry_times
    if n <= 1000:
        assert [schedule.scale_index(t, n) for t in g.step_times.tolist()] == list(range(n - 1, -1, -1))


def test_the_store_records_the_times_it_is_given_and_does_not_import_the_sampler(tmp_path):
    times = [0.9, 0.5, 0.125]  # not the uniform grid: recorded as given, never re-derived
    run = create_run(tmp_path / "r", {}, ["unet"], [0], [-1], 3, (1, 2, 2), maps=False, times=times)
    assert open_run(tmp_path / "r").time.tolist() == times and run.time.dtype == np.float64
    with pytest.raises(ValueError, match="times must be 3 finite numbers"):
        create_run(tmp_path / "s", {}, ["unet"], [0], [-1], 3, (1, 2, 2), maps=False, times=[1.0, 0.5])
    # reopening with other times is refused, naming them
    with pytest.raises(ValueError, match=r"made with time=\[0.9, 0.5, 0.125\]"):
        create_run(tmp_path / "r", {}, ["unet"], [0], [-1], 3, (1, 2, 2), maps=False)
    # without times the store records the uniform grid: the same float64 values as TimeGrid
    for n in (1, 3, 20, 1000):
        plain = create_run(tmp_path / f"u{n}", {}, ["unet"], [0], [-1], n, (1, 2, 2), maps=False)
        assert np.array_equal(plain.time, TimeGrid(n).step_times.numpy())
    code = "import sys, edtool.store.run, edtool.store.status; print('edtool.diffusion' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ one grid through the stages


def test_a_compute_run_records_the_grid_it_ran_and_every_stage_starts_from_the_same_noise(tmp_path, monkeypatch,
                                                                                          tiny_checkpoints):
    """compute records the grid's step times; its x_T of realization s is initial_noise(s), the x_T that
    `sample` saves and `calibrate` starts from for seed s; each steps along the same grid times."""
    from edtool.study import compute as pipeline

    seen = {}  # stage -> (x_T by seed, the times its model was evaluated at)
    measure = pipeline.measure

    def spy(job, name, batch, points=None):
        seen.setdefault("compute", {}).update({job.prepared.seeds[r]: batch.x_T[i] for i, r in enumerate(batch.rows)})
        return measure(job, name, batch, points)

    monkeypatch.setattr(pipeline, "measure", spy)
    pipeline.compute(config(tmp_path / "run", models=["resnet"], nsteps=3, realizations=2, seed=5, batch=1))
    run = open_run(tmp_path / "run")
    assert run.seeds.tolist() == realization_seeds(5, 2) == [5, 6]
    assert np.array_equal(run.time, TimeGrid(3).step_times.numpy())

    net = checkpoints.load(tiny_checkpoints / "tiny_resnet.safetensors")
    images, labels = toy_images(n=12, size=32)
    trajectory = calib.network_trajectory

    def traj(network, x, grid, label=None, batch=None):
        seen.setdefault("calibrate", {s: x[i] for i, s in enumerate([5, 6])})
        return trajectory(network, x, grid, label, batch)

    monkeypatch.setattr(calib, "network_trajectory", traj)
    res = calib.calibrate(net, images, labels, machine="els-borders", sizes=(3,), seeds=[5, 6], nsteps=3)
    assert res["t"] == list(TimeGrid(3).entry_times) == [1 / 3, 2 / 3, 1.0]
    sample(["is"], net, images, labels, seeds=[5, 6], nsteps=3, out_dir=tmp_path / "s", batch=1)
    for s in (5, 6):
        independent = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(s))[0]
        assert torch.equal(seen["compute"][s], independent)
        assert torch.equal(seen["calibrate"][s], independent)
        assert np.array_equal(np.load(tmp_path / "s" / "seeds" / f"seed_{s}.npy"), independent.numpy())
        assert torch.equal(initial_noises([s], (1, 32, 32))[0], independent)
    # the network's final images: one grid, one noise -> the same sample in compute and in sample, bit for bit
    for r, s in enumerate((5, 6)):
        np.testing.assert_array_equal(run.read("final", "resnet")[r],
                                      np.load(tmp_path / "s" / "network_outputs" / f"seed_{s}.npy"))


def test_calibrate_records_the_grids_entry_times_and_labels_drawn_from_the_seeds():
    images, labels = toy_images()
    nsteps, truth = 5, [1, 3, 3, 5, 7]
    net = MachineNetwork(make_machine("els-borders", images, labels, scales=truth), nsteps, conditional=True)
    res = calib.calibrate(net, images, labels, sizes=(1, 3, 5, 7), seeds=[3, 4, 9], nsteps=nsteps)
    assert res["t"] == list(TimeGrid(nsteps).entry_times) and res["scales"] == truth
    independent = [int(torch.randint(0, 3, (1,), generator=torch.Generator().manual_seed(s))) for s in (3, 4, 9)]
    assert res["labels"] == drawn_labels([3, 4, 9], 3).tolist() == independent


# ------------------------------------------------------------------ stores written before


def test_a_store_written_before_opens_resumes_and_aggregates_with_its_recorded_times(tmp_path):
    """A store whose `time` array was written the old way (diffusion.timesteps, by the store itself) is
    continued by a run passing its grid's times; the times a reader gets are the recorded ones."""

    def cell(r, m):
        rng = np.random.default_rng(10 * r + m)
        return [rng.random(3) + 0.1, rng.random(3) + 1, rng.random(3) / 2, rng.random(3) / 10,
                rng.uniform(-1, 1, (1, 4, 4))]

    old = create_run(tmp_path / "r", {"estimator": "exact"}, ["unet", "els"], [0, 1], [-1, -1], 3, (1, 4, 4),
                     maps=False)
    old.array("time")[:] = timesteps(3)[:-1].numpy()  # what the store wrote before the grid was a value
    for m in range(2):
        old.write_cell(0, m, *cell(0, m))
    make_legacy(tmp_path / "r")  # and made before digests, too
    again = create_run(tmp_path / "r", {"estimator": "exact"}, ["unet", "els"], [0, 1], [-1, -1], 3, (1, 4, 4),
                       maps=False, times=TimeGrid(3).step_times.tolist())
    assert again.integrity is None and again.pending() == [(1, 0), (1, 1)]
    for m in range(2):
        again.write_cell(1, m, *cell(1, m))
    summary = aggregate_run(tmp_path / "r")
    assert summary["unet"]["per_step"]["time"] == [1.0, 2 / 3, 1 / 3]

    # a reader takes the recorded times, whatever grid made them (a legacy store has no digest to rewrite)
    legacy = open_run(tmp_path / "r", mode="r+")
    legacy.array("time")[:] = [0.9, 0.5, 0.25]
    assert open_run(tmp_path / "r").time.tolist() == [0.9, 0.5, 0.25]
    assert aggregate_run(tmp_path / "r")["unet"]["per_step"]["time"] == [0.9, 0.5, 0.25]


# ------------------------------------------------------------------ seeds, noises, labels


def test_seeds_noises_and_labels_have_one_home_and_their_old_numbers():
    assert realization_seeds(7, 3) == [7, 8, 9] and realization_seeds(0, 0) == []
    x = initial_noises([3, 8], (1, 4, 4))
    for i, s in enumerate((3, 8)):  # each seed's x_T alone, whatever it is stacked with
        assert torch.equal(x[i], torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(s))[0])
        assert torch.equal(x[i], initial_noise(s, (1, 1, 4, 4))[0])
    assert torch.equal(seed_labels([0, 1, 2], None, None, True, n_classes=10), drawn_labels([0, 1, 2], 10))
    assert seed_labels([0, 1], None, 4, True, n_classes=10).tolist() == [4, 4]  # a given label wins
    # the training figure's grid: one draw of n noises from seed + 1, as before
    assert torch.equal(initial_noise(1, (4, 1, 2, 2)),
                       torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(1)))
    assert ddim_sample(lambda t, z: torch.zeros_like(z), x, TimeGrid(2)).shape == x.shape
