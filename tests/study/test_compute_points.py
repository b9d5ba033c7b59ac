"""`compute --points noised-data` (SPEC 13, QCSBM's protocol): the measured points are the forward-noised
held-out images of the closed form for each realization's seed, the stored numbers are the score
Jacobian there, the point source is recorded in the config (another one is refused on resume), an
interrupted run resumes bit for bit, and aggregate reports NAsym both ways.

The held-out set is a small MNIST-format test split written here; the networks are the tiny
random-weight checkpoints of tests/conftest.py."""

import math

import numpy as np
import pytest
import torch

from edtool.networks import checkpoints
from edtool.study.aggregate import aggregate_run
from edtool.diffusion import initial_noise
from edtool.errors import EdtoolError
from edtool.study.compute import compute
from edtool.study.points import held_out_indices
from edtool.store.run import open_run
from edtool.store.runstore import RunStore
from helpers import assert_same_arrays, bilinear_numpy, cli, config, small_mnist, snapshot, write_idx_root

pytestmark = pytest.mark.usefixtures("tiny_networks")


def _beta(t: float) -> float:
    return 1 - math.cos(t / 1.008 * math.pi / 2) ** 2


@pytest.fixture
def held_out_root(tmp_path):
    """A data root whose MNIST test split holds 12 random digits (and no training split)."""
    images, labels = small_mnist(12, seed=3)
    write_idx_root(tmp_path / "data", images, labels, split="test")
    return tmp_path / "data", images, labels


def noised(run_dir, root, **kw):
    return config(run_dir, points="noised-data", held_out="mnist", data_root=str(root), **kw)


def test_points_are_the_closed_form_and_the_numbers_the_jacobian_there(tmp_path, held_out_root, tiny_checkpoints,
                                                                       monkeypatch):
    import edtool.jacobian.ed
    from edtool.study import compute as pipeline

    root, digits, _ = held_out_root
    nsteps, seed = 2, 7
    seen, times, real_ed = [], [], edtool.jacobian.ed.exterior_derivative

    def spy_ed(field, x, **kw):  # the time (of the model's field) and the point each Jacobian is taken at
        times.append(float(field.t[0]))
        seen.append(x.detach().double().clone())
        return real_ed(field, x, **kw)

    monkeypatch.setattr(edtool.jacobian.ed, "exterior_derivative", spy_ed)
    summary = compute(noised(tmp_path / "run", root, models=["resnet", "is"], nsteps=nsteps, seed=seed, probes=4))
    store = open_run(summary["location"])
    points = store.config["points"]
    indices = held_out_indices(12, seed, 2)
    assert points["source"] == "noised-data" and points["indices"] == indices
    assert points["held_out"] == {"dataset": "mnist", "split": "test", "size": 12}
    assert store.labels.tolist() == [-1, -1]  # unconditional networks
    expected = {}
    for r in range(2):
        x0 = bilinear_numpy(digits[indices[r]].astype(np.float64) / 255.0, 32) * 2 - 1  # independent of edtool.data
        np.testing.assert_allclose(store.read("final", "resnet")[r, 0], x0, atol=1e-5)  # final holds x_0
        eps = initial_noise(seed + r, (1, 1, 32, 32)).double()[0, 0].numpy()
        for j in range(nsteps):
            t = (nsteps - j) / nsteps
            expected[r, j] = math.sqrt(1 - _beta(t)) * x0 + math.sqrt(_beta(t)) * eps
    # realization by realization, model by model, step by step: every model at the same closed-form points
    order = [(r, j) for r in range(2) for _model in range(2) for j in range(nsteps)]
    assert len(seen) == len(order) and times == [(nsteps - j) / nsteps for _r, j in order]
    for (r, j), x in zip(order, seen):
        np.testing.assert_allclose(x[0, 0].numpy(), expected[r, j], atol=1e-5)

    # the stored numbers are the estimator's at such a point (realization 1, t = 1/2), probes seeded as always
    net = checkpoints.load(tiny_checkpoints / "tiny_resnet.safetensors")
    tt = torch.full((1,), 0.5)
    x = torch.from_numpy(expected[1, 1]).float().reshape(1, 1, 32, 32)
    res = real_ed(lambda v: net.score(tt, v), x, method="hutchinson", probes=4,
                  seed=[pipeline.probe_seed(seed, 1, "resnet", 1)])
    assert store.read("ed_fro", "resnet")[1, 1] == pytest.approx(float(res.ed_fro[0]), rel=1e-4)
    assert store.read("jac_fro", "resnet")[1, 1] == pytest.approx(float(res.jac_fro[0]), rel=1e-4)
    assert np.all(store.read("asym", "is") < 1e-5)  # the ideal score is a gradient at every point too

    agg = aggregate_run(summary["location"])
    asym2 = store.read("asym", "resnet").astype(np.float64) ** 2
    ed, jac = store.read("ed_fro", "resnet").astype(np.float64), store.read("jac_fro", "resnet").astype(np.float64)
    assert agg["resnet"]["nasym_mean_of_ratios"] == pytest.approx(asym2.mean(), rel=1e-6)  # NAsym = asym^2
    assert agg["resnet"]["nasym_ratio_of_means"] == pytest.approx((ed ** 2).sum() / (4 * (jac ** 2).sum()), rel=1e-9)
    assert agg["points"]["source"] == "noised-data"


def test_interrupted_noised_run_resumes_bit_for_bit_and_other_points_are_refused(tmp_path, held_out_root,
                                                                                  monkeypatch, capsys):
    root = held_out_root[0]
    kw = dict(models=["resnet", "is"], nsteps=2, realizations=3, seed=1)
    real_write = RunStore.write_cell
    calls = []

    def dying_write(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "write_cell", dying_write)
    with pytest.raises(KeyboardInterrupt):
        compute(noised(tmp_path / "cut", root, **kw))
    monkeypatch.setattr(RunStore, "write_cell", real_write)
    assert open_run(tmp_path / "cut").done_mask().sum() == 3
    compute(noised(tmp_path / "cut", root, **kw))
    compute(noised(tmp_path / "straight", root, **kw))
    assert_same_arrays(tmp_path / "cut", tmp_path / "straight")

    before = snapshot(tmp_path / "cut")
    with pytest.raises(EdtoolError, match="points"):  # the trajectory study is another run, not a resume
        compute(config(tmp_path / "cut", **kw))
    with pytest.raises(EdtoolError, match="indices"):  # another draw of held-out images likewise
        compute(noised(tmp_path / "cut", root, **{**kw, "realizations": 3, "seed": 2}))
    assert snapshot(tmp_path / "cut") == before


@pytest.mark.parametrize("args,words", [
    (["--points", "nope"], "--points must be one of"),
    (["--points", "noised-data", "--trajectory", "shared"], "drop --trajectory shared"),
    (["--held-out", "mnist"], "add --points noised-data"),
    (["--points", "noised-data", "--held-out", "svhn"], "unknown --held-out"),
    (["--points", "noised-data", "--held-out", "mnist", "--realizations", "13"], "more held-out images than the 12"),
])
def test_bad_point_settings_are_one_line_exit_2(tmp_path, held_out_root, capsys, monkeypatch, args, words):
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", "resnet", "--nsteps", "1", "--device", "cpu",
                       "--quiet", "--data-root", held_out_root[0], "--run-dir", tmp_path / "r", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "r").exists()


def test_aggregate_command_names_both_nasym_averages(tmp_path, held_out_root, capsys, monkeypatch):
    compute(noised(tmp_path / "run", held_out_root[0], models=["resnet"], nsteps=2, realizations=2))
    code, out, err = cli(capsys, monkeypatch, "aggregate", tmp_path / "run")
    assert code == 0, err
    assert "NAsym" in out and "mean of ratios" in out and "ratio of means" in out and "noised-data" in out
    code, out, err = cli(capsys, monkeypatch, "plot", tmp_path / "run")  # figures say what the points are
    assert code == 0 and "ed_analysis" in out, err


def test_analyze_with_noised_points_keeps_its_own_folder(tmp_path, held_out_root, capsys, monkeypatch):
    common = ["analyze", "--output_dir", tmp_path / "res", "--models", "resnet", "--nsteps", "1", "--probes", "2",
              "--device", "cpu", "--quiet", "--data-root", held_out_root[0]]
    code, _, err = cli(capsys, monkeypatch, *common, "--points", "noised-data")
    assert code == 0, err
    run = open_run(tmp_path / "res" / "mnist5k" / "single_realization_noised_data")
    assert run.config["points"]["held_out"]["dataset"] == "mnist"  # mnist5k's held-out set: MNIST's test split
    assert not (tmp_path / "res" / "mnist5k" / "single_realization").exists()
