"""The seed tool's numeric files: `analyze` writes ed_analysis_single.pt and ed_analysis_aggregated.pt
beside its figures, exported from the run store, with the seed's quantities under the seed's keys (the
ED of a network's eps, of a machine's score; timesteps the integers N..1). Checked by loading them as a
seed user would (torch.load, weights_only=True) against the store read independently with zarr and
xarray, against a plain autograd Jacobian of a network's eps at the stored point, and against closed
forms on a hand-written store; foreign files and folders of those names are refused."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from edtool.errors import EdtoolError
from edtool.networks import checkpoints
from edtool.config import ComputeConfig
from edtool.study.compute import compute
from edtool.fileio import LEDGER
from edtool.study.seed_files import AGGREGATED, SINGLE, export_seed_files, seed_results
from edtool.store.run import create_run
from helpers import assert_one_line_error, assert_refused, cli, edtool_in_process

pytestmark = pytest.mark.usefixtures("tiny_networks")

ANALYZE = ["analyze", "--models", "resnet,is", "--nsteps", "3", "--probes", "2", "--device", "cpu", "--quiet"]
ABOUT = {"field", "definition", "t", "factor"}
FIELD = {"resnet": "eps", "unet": "eps", "is": "score", "els": "score"}  # what the seed measured of each


def factor_by_hand(time, name) -> np.ndarray:
    """The seed's ED over edtool's ed_fro: 1 for a machine (its score), sqrt(beta(t)) for a network (its eps
    = -sqrt(beta) s), beta(t) = 1 - cos((t / 1.008) pi / 2)^2 (SPEC 2)."""
    time = np.asarray(time, dtype=np.float64)
    return np.ones(len(time)) if FIELD[name] == "score" else np.sqrt(1 - np.cos(time / 1.008 * np.pi / 2) ** 2)


def stored(folder: Path) -> dict:
    """The run's models, times, done flags and ED read straight from the zarr store (not through edtool)."""
    group = zarr.open_group(str(folder / "ed.zarr"), mode="r")
    return {"models": list(group.attrs["models"]), "time": np.asarray(group["time"][:]),
            "done": np.asarray(group["done"][:]).astype(bool), "ed": np.asarray(group["ed_fro"][:], np.float64)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_analyze_multiple_writes_both_files_equal_to_the_store(tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    code, _, err = cli(capsys, monkeypatch, *ANALYZE, "--output_dir", out, "--multiple", "2")
    assert code == 0, err
    folder = out / "mnist5k" / "multiple_realizations"
    truth = stored(folder)
    assert truth["done"].all() and truth["models"] == ["resnet", "is"]
    np.testing.assert_allclose(truth["time"], [1, 2 / 3, 1 / 3])  # the seed's timesteps: 1 down towards 0

    single = torch.load(folder / SINGLE, weights_only=True)
    aggregated = torch.load(folder / AGGREGATED, weights_only=True)
    assert set(single) == set(aggregated) == {"resnet", "is"}
    import xarray as xr

    agg = xr.open_zarr(folder / "ed.zarr", group="aggregate", consolidated=False)
    summary = json.loads((folder / "summary_stats.json").read_text())
    for m, name in enumerate(truth["models"]):
        factor = factor_by_hand(truth["time"], name)
        one = single[name]
        assert {"timesteps", "ed_magnitudes", "ed_fro"} | ABOUT <= set(one) and one["field"] == FIELD[name]
        assert one["timesteps"] == [3, 2, 1]  # the seed's: step integers i, at t = i/N
        assert torch.equal(one["t"], torch.from_numpy(truth["time"]))
        assert isinstance(one["ed_magnitudes"], list)
        np.testing.assert_allclose(one["ed_magnitudes"], truth["ed"][0, m] * factor, rtol=1e-14)  # realization 0
        assert torch.equal(one["ed_fro"], torch.from_numpy(truth["ed"][0, m]))  # the score's, bit for bit
        assert str(FIELD[name]) in one["definition"] and ("sqrt(beta(t))" in one["definition"]) == (name == "resnet")

        many = aggregated[name]
        assert {"timesteps", "ed_magnitudes_mean", "ed_magnitudes_std", "ed_magnitudes_all",
                "num_realizations", "ed_fro_all"} | ABOUT <= set(many) and many["field"] == FIELD[name]
        assert many["num_realizations"] == 2 and isinstance(many["num_realizations"], int)
        assert many["timesteps"] == [3, 2, 1]
        values = truth["ed"][:, m] * factor  # (realizations, steps) of the seed's field
        np.testing.assert_allclose(many["ed_magnitudes_all"].numpy(), values, rtol=1e-14)
        assert torch.equal(many["ed_fro_all"], torch.from_numpy(truth["ed"][:, m]))
        np.testing.assert_allclose(many["ed_magnitudes_mean"].numpy(), values.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(many["ed_magnitudes_std"].numpy(), values.std(axis=0, ddof=0), rtol=1e-12)
        assert many["ed_magnitudes_n"].tolist() == [2, 2, 2]
        # the store's own aggregate of ed_fro (float32, ddof 1), times the factor, says the same
        np.testing.assert_allclose(many["ed_magnitudes_mean"].numpy(),
                                   agg["ed_fro_mean"].sel(model=name).values * factor, rtol=1e-6)
        np.testing.assert_allclose(many["ed_magnitudes_std"].numpy() * np.sqrt(2),
                                   agg["ed_fro_std"].sel(model=name).values * factor, rtol=1e-5)
        # summary_stats.json beside it: the seed's formulas on the same numbers
        s = summary[name]
        np.testing.assert_allclose([s["mean_ed_magnitude"], s["std_ed_magnitude"], s["max_ed_magnitude"]],
                                   [many["ed_magnitudes_mean"].mean(), many["ed_magnitudes_std"].mean(),
                                    many["ed_magnitudes_mean"].max()], rtol=1e-12)

    ledger = json.loads((folder / LEDGER).read_text())  # recorded like the figures
    assert ledger[SINGLE] == sha256(folder / SINGLE) and ledger[AGGREGATED] == sha256(folder / AGGREGATED)
    assert "ed_analysis_aggregated.png" in ledger


def test_analyze_single_from_the_console_script(tmp_path):
    """As a seed user runs it: `edtool analyze --single` through the console entry point (in this process:
    a new one shows nothing more here; tests/test_version.py starts `python -m edtool` itself); one
    realization: no aggregated file."""
    proc = edtool_in_process(*ANALYZE, "--output_dir", tmp_path / "r", "--single", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "r" / "mnist5k" / "single_realization"
    assert not (folder / AGGREGATED).exists()
    truth = stored(folder)
    single = torch.load(folder / SINGLE, weights_only=True)
    for m, name in enumerate(truth["models"]):
        np.testing.assert_allclose(single[name]["ed_magnitudes"], truth["ed"][0, m] * factor_by_hand(truth["time"], name),
                                   rtol=1e-14)
        assert torch.equal(single[name]["ed_fro"], torch.from_numpy(truth["ed"][0, m]))
        assert np.isfinite(single[name]["ed_magnitudes"]).all()
    assert min(single["resnet"]["ed_magnitudes"]) > 0 and set(single["is"]["ed_magnitudes"]) == {0.0}  # is: a gradient


def test_the_seed_tools_own_files_are_never_replaced_silently(tmp_path, capsys, monkeypatch):
    """A .pt of those names that edtool did not write is refused before anything is computed; edtool's
    own are replaced on a rerun; --overwrite replaces the foreign one."""
    folder = tmp_path / "out" / "mnist5k" / "single_realization"
    folder.mkdir(parents=True)
    theirs = folder / SINGLE
    torch.save({"unet": {"timesteps": [1.0], "ed_magnitudes": [2.0]}}, theirs)
    before = theirs.read_bytes()
    args = ["analyze", "--models", "is", "--nsteps", "2", "--device", "cpu", "--quiet", "--output_dir", tmp_path / "out"]
    assert_refused(cli(capsys, monkeypatch, *args), f"{theirs} exists and edtool did not write it", "--overwrite")
    assert theirs.read_bytes() == before and not (folder / "ed.zarr").exists()

    code, _, err = cli(capsys, monkeypatch, *args, "--overwrite")
    assert code == 0, err
    assert set(torch.load(theirs, weights_only=True)) == {"is"}
    code, _, err = cli(capsys, monkeypatch, *args)  # its own file: replaced without a word
    assert code == 0, err
    theirs.write_bytes(b"edited by hand")
    assert_refused(cli(capsys, monkeypatch, *args), str(theirs))
    assert theirs.read_bytes() == b"edited by hand"


@pytest.fixture
def one_thread():
    """One torch thread: batched autograd on two threads of a busy machine runs 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_networks_ed_magnitudes_are_the_jacobian_of_its_eps_at_the_stored_point(tmp_path, tiny_checkpoints,
                                                                                   one_thread):
    """The seed measured torch.norm(J - J^T) of the network's eps output: recomputed here with a plain
    torch.autograd.functional.jacobian of the network module (float64) at each stored point, for the
    entries the seed's keys hold; ed_fro (edtool's, of the score) is the same norm divided by sqrt(beta(t))."""
    compute(ComputeConfig(models=["unet"], nsteps=2, realizations=1, device="cpu", estimator="exact",
                          run_dir=str(tmp_path / "run"), save_points=True))
    export_seed_files(tmp_path / "run")
    single = torch.load(tmp_path / "run" / SINGLE, weights_only=True)["unet"]
    assert single["field"] == "eps" and single["timesteps"] == [2, 1]
    net = checkpoints.load(tiny_checkpoints / "tiny_unet").net.double().eval()
    points = zarr.open_group(str(tmp_path / "run" / "ed.zarr"), mode="r")["point"][0, 0]  # (step, C, H, W)
    for j, i in enumerate(single["timesteps"]):
        t = torch.tensor([i / 2], dtype=torch.float64)
        x = torch.from_numpy(np.asarray(points[j], dtype=np.float64))

        def eps(flat):
            return net(flat.reshape(1, *x.shape), t).flatten()

        J = torch.autograd.functional.jacobian(eps, x.flatten(), vectorize=True)
        seed_ed = float(torch.norm(J - J.T))
        assert single["ed_magnitudes"][j] == pytest.approx(seed_ed, rel=1e-4)
        sqrt_beta = np.sqrt(1 - np.cos(i / 2 / 1.008 * np.pi / 2) ** 2)
        assert float(single["ed_fro"][j]) == pytest.approx(seed_ed / sqrt_beta, rel=1e-4)
    assert single["ed_magnitudes"][1] < 0.75 * float(single["ed_fro"][1])  # at t = 1/2 the factor is 0.70


def test_failed_steps_and_unfinished_cells_on_a_hand_written_store(tmp_path):
    """Closed forms: NaN steps stay NaN in the realization's row and are left out of mean, std (ddof 0)
    and counted in n; a model without a finished cell in a realization is left out of that file."""
    run = create_run(tmp_path / "r", {"estimator": "exact"}, ["unet", "els"], [7, 8, 9], [-1] * 3, 3, (1, 2, 2),
                     maps=False)
    rows = {(0, 0): [1.0, 2.0, np.nan], (1, 0): [3.0, 4.0, 5.0], (1, 1): [6.0, 6.0, 6.0]}
    for (r, m), ed in rows.items():
        ed = np.array(ed)
        run.write_cell(r, m, ed, 2 * ed, np.full(3, 0.25), np.zeros(3), np.zeros((1, 2, 2)))
    files = seed_results(run)
    single, aggregated = files[SINGLE], files[AGGREGATED]
    f = factor_by_hand([1, 2 / 3, 1 / 3], "unet")  # the unet's numbers are of eps; the els machine's of the score
    # realization 1 is the first with every model done: the one the single figure shows
    assert set(single) == {"unet", "els"} and single["unet"]["realization"] == 1 and single["unet"]["seed"] == 8
    np.testing.assert_allclose(single["unet"]["ed_magnitudes"], [3.0 * f[0], 4.0 * f[1], 5.0 * f[2]], rtol=1e-14)
    assert single["unet"]["ed_fro"].tolist() == [3.0, 4.0, 5.0] and single["els"]["ed_magnitudes"] == [6.0] * 3
    unet = aggregated["unet"]
    assert unet["num_realizations"] == 2 and unet["ed_magnitudes_n"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(unet["ed_magnitudes_mean"], [2.0 * f[0], 3.0 * f[1], 5.0 * f[2]], rtol=1e-14)
    np.testing.assert_allclose(unet["ed_magnitudes_std"], [1.0 * f[0], 1.0 * f[1], 0.0], rtol=1e-14)
    assert torch.isnan(unet["ed_magnitudes_all"][0, 2]) and unet["ed_magnitudes_all"].shape == (2, 3)
    assert aggregated["els"]["num_realizations"] == 1 and aggregated["els"]["ed_magnitudes_std"].tolist() == [0.0] * 3
    assert aggregated["els"]["ed_magnitudes_mean"].tolist() == [6.0] * 3 and aggregated["els"]["field"] == "score"

    paths = export_seed_files(tmp_path / "r")  # into the run's folder
    assert [p.name for p in paths] == [SINGLE, AGGREGATED]
    again = torch.load(paths[1], weights_only=True)
    assert torch.allclose(again["unet"]["ed_magnitudes_all"], unet["ed_magnitudes_all"], rtol=0, atol=0, equal_nan=True)


def test_a_run_with_nothing_done_has_nothing_to_export(tmp_path):
    create_run(tmp_path / "r", {"estimator": "exact"}, ["unet"], [0], [-1], 2, (1, 2, 2), maps=False)
    with pytest.raises(EdtoolError, match="no finished cells yet"):
        seed_results(tmp_path / "r")


def test_analyze_overwrite_with_fewer_realizations_leaves_no_stale_aggregated_file(tmp_path):
    """`analyze --multiple 2` then `--multiple 1 --overwrite` into the same --output_dir: the aggregated
    .pt of the first run (2 realizations) must not stay beside the new 1-realization store."""
    args = ["analyze", "--models", "is", "--nsteps", "2", "--device", "cpu", "--quiet", "--output_dir", "out"]
    folder = tmp_path / "out" / "mnist5k" / "multiple_realizations"
    first = edtool_in_process(*args, "--multiple", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert torch.load(folder / AGGREGATED, weights_only=True)["is"]["num_realizations"] == 2
    again = edtool_in_process(*args, "--multiple", "1", "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (folder / AGGREGATED).exists() and not (folder / "ed_analysis_aggregated.png").exists()
    assert stored(folder)["done"].shape == (1, 1)
    assert json.loads((folder / "summary_stats.json").read_text())["is"]["num_realizations"] == 1
    assert torch.load(folder / SINGLE, weights_only=True)["is"]["timesteps"] == [2, 1]


def test_a_foreign_aggregated_file_is_kept_when_a_rerun_makes_none(tmp_path):
    """Only what edtool wrote is removed: a file of that name it did not write stays, byte for byte."""
    run = create_run(tmp_path / "r", {"estimator": "exact"}, ["unet"], [7], [-1], 2, (1, 2, 2), maps=False)
    run.write_cell(0, 0, np.array([1.0, 2.0]), np.array([2.0, 4.0]), np.full(2, 0.25), np.zeros(2), np.zeros((1, 2, 2)))
    theirs = tmp_path / "r" / AGGREGATED
    theirs.write_bytes(b"the seed tool's file")
    assert [p.name for p in export_seed_files(tmp_path / "r", overwrite=True)] == [SINGLE]
    assert theirs.read_bytes() == b"the seed tool's file"


@pytest.mark.parametrize("name,layout", [(SINGLE, "single_realization"), (AGGREGATED, "multiple_realizations"),
                                         ("asym_vs_time.png", "single_realization")])
def test_a_folder_of_an_output_name_is_one_line_and_kept(tmp_path, name, layout):
    """A folder where analyze writes a file: refused before computing, --overwrite or not, naming the
    folder and analyze's own option (--output_dir); the folder and what is in it stay."""
    folder = tmp_path / "out" / "mnist5k" / layout / name
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    realizations = ["--multiple", "2"] if layout.startswith("multiple") else []
    proc = edtool_in_process("analyze", "--models", "is", "--nsteps", "2", "--device", "cpu", "--output_dir", "out",
                             *realizations, "--overwrite", cwd=tmp_path)
    assert_one_line_error(proc, f"{folder.relative_to(tmp_path)} is a folder", "--output_dir another folder")
    assert (folder / "keep.txt").read_text() == "mine" and not (folder.parent / "ed.zarr").exists()


def test_analyze_errors_name_its_own_option(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    proc = edtool_in_process("analyze", "--models", "is", "--nsteps", "2", "--device", "cpu", "--output_dir", "afile",
                             cwd=tmp_path)
    assert_one_line_error(proc, "afile is a file, not a folder", "pass --output_dir to write elsewhere")
    assert "--out " not in proc.stderr
