"""Models from elsewhere (SPEC 14): `--models LABEL=SOURCE` with diffusers folders, `py:` entry points and
checkpoints. The diffusers models are tiny random-weight UNet2DModels saved here with save_pretrained (the hub
is unreachable); the truth they are checked against is a direct torch.autograd Jacobian of the diffusers
forward at the timestep numpy's interpolation gives, and the conversions SPEC 14 predicts."""

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from edtool.diffusion import alpha_bar, beta, timesteps
from edtool.errors import EdtoolError
from edtool.config import ComputeConfig
from edtool.study.compute import compute
from edtool.study.prepare import prepare
from edtool.networks.diffusers_source import clamped_steps, edtool_log_sigma, fractional_timestep, vp_log_sigmas
from edtool.store.run import open_run
from helpers import assert_one_line_error, cli, edtool, edtool_in_process, small_mnist, write_idx_root


def _log_sigmas_np(alphas_cumprod) -> np.ndarray:
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * np.log((1 - ac) / ac)


def _mapped_timestep(t: float, alphas_cumprod) -> float:
    """SPEC 14's i*, computed independently: numpy's piecewise-linear interpolation in log sigma (it clamps)."""
    log_sigma = 0.5 * math.log(_beta(t) / (1 - _beta(t)))
    ls = _log_sigmas_np(alphas_cumprod)
    return float(np.interp(log_sigma, ls, np.arange(len(ls))))


def _beta(t: float) -> float:
    return 1 - math.cos(t / 1.008 * math.pi / 2) ** 2


# ------------------------------------------------------------------ the time mapping (no diffusers needed)


def test_fractional_timestep_is_linear_in_log_sigma_and_clamped():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's linear schedule
    ac = torch.cumprod(1 - betas, 0)
    log_sigmas = vp_log_sigmas(ac)
    t = torch.tensor([1.0, 0.5, 0.05, 0.001, 1e-5], dtype=torch.float64)
    got = fractional_timestep(edtool_log_sigma(t), log_sigmas)
    want = [_mapped_timestep(float(v), ac) for v in t]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
    assert got[-1] == 0 and 0 < got[0] < 999  # t = 1 lies inside DDPM's range; tiny t is clamped to 0
    # a level exactly on the grid maps to its integer step
    on_grid = fractional_timestep(log_sigmas[[0, 417, 999]], log_sigmas)
    assert torch.allclose(on_grid, torch.tensor([0.0, 417.0, 999.0], dtype=torch.float64), atol=1e-9)
    # steps of edtool's grid below sigma_0 = 0.01: with N = 200, t = 1/200 has sigma 0.0078
    assert clamped_steps(log_sigmas, 200) == [199] and clamped_steps(log_sigmas, 20) == []


# ------------------------------------------------------------------ tiny diffusers models built here


def _save_pipeline(folder, prediction="epsilon", num_classes=None, seed=0, beta_start=1e-4, size=8):
    """A pipeline folder: model_index.json, unet/ (random UNet2DModel with attention), scheduler/ (DDPM)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8, num_class_embeds=num_classes)
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=beta_start,
                            prediction_type=prediction).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The same weights under epsilon and v_prediction, a class-conditional one, one with other weights."""
    root = tmp_path_factory.mktemp("pipes")
    return {"eps": _save_pipeline(root / "eps"), "v": _save_pipeline(root / "v", "v_prediction"),
            "cond": _save_pipeline(root / "cond", num_classes=3), "other": _save_pipeline(root / "other", seed=1)}


def _direct_score_jacobian(folder, x, t, label=None):
    """d score / d x of the diffusers forward at the mapped timestep, by torch.autograd (default attention),
    for an epsilon model: score = -unet(x, i*).sample / sqrt(beta(t))."""
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    ac = diffusers.DDPMScheduler.from_pretrained(str(folder / "scheduler")).alphas_cumprod
    ts = torch.tensor([_mapped_timestep(t, ac)], dtype=torch.float32)
    lab = None if label is None else torch.tensor([label])

    def score(flat):
        return (-unet(flat.reshape(1, *x.shape), ts, class_labels=lab).sample / math.sqrt(_beta(t))).flatten()

    return torch.autograd.functional.jacobian(score, x.flatten().float())


def _asym(J):
    return float(torch.linalg.matrix_norm(J - J.T) / (2 * torch.linalg.matrix_norm(J)))


def run_config(tmp_path, models, **kw):
    base = dict(models=models, nsteps=3, realizations=1, device="cpu", estimator="exact",
                run_dir=str(tmp_path / "run"), save_points=True)
    return ComputeConfig(**{**base, **kw})


def test_exact_numbers_at_stored_points_equal_a_direct_jacobian(tmp_path, pipes):
    summary = compute(run_config(tmp_path, [f"ddpm={pipes['eps']}"]))
    run = open_run(summary["location"])
    assert run.models == ["ddpm"] and run.done_mask().all()
    entry = run.config["models"]["ddpm"]
    assert entry["source"] == str(pipes["eps"]) and len(entry["sha256"]) == 64
    assert entry["scheduler"]["prediction_type"] == "epsilon" and "clamped_steps" not in entry
    points = run.read("point", "ddpm")[0]  # (step, C, H, W)
    assert points.shape == (3, 1, 8, 8) and np.isfinite(points).all()
    for j, t in enumerate(run.time):
        J = _direct_score_jacobian(pipes["eps"], torch.from_numpy(points[j]), float(t))
        assert run.read("jac_fro", "ddpm")[0, j] == pytest.approx(float(torch.linalg.matrix_norm(J)), rel=1e-4)
        assert run.read("asym", "ddpm")[0, j] == pytest.approx(_asym(J), rel=1e-4)
    # the path really is the model's DDIM path: x_T is the realization's noise, later points differ
    assert np.array_equal(points[0], torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))[0].numpy())


def test_v_prediction_conversion_on_a_shared_path(tmp_path, pipes):
    """Same weights: eps_v = a o + b x, so the score Jacobians differ by a/b J_o + I and
    ed_fro(v) = sqrt(alpha_bar(t)) ed_fro(eps) at every shared point; jac_fro(v) = ||a J_o + b I|| / b."""
    compute(run_config(tmp_path, [f"eps={pipes['eps']}", f"v={pipes['v']}"], trajectory="shared"))
    run = open_run(tmp_path / "run")
    a = alpha_bar(torch.from_numpy(run.time)).sqrt().numpy()
    ed_eps, ed_v = run.read("ed_fro", "eps")[0], run.read("ed_fro", "v")[0]
    assert np.allclose(ed_v, a * ed_eps, rtol=1e-4)
    assert np.array_equal(run.read("point", "eps"), run.read("point", "v"))
    j, t = 1, float(run.time[1])
    J_score = _direct_score_jacobian(pipes["eps"], torch.from_numpy(run.read("point", "v")[0, j]), t)
    J_o = -J_score * math.sqrt(_beta(t))  # Jacobian of the raw output o
    b = math.sqrt(_beta(t))
    J_v = -(a[j] * J_o + b * torch.eye(len(J_o))) / b
    assert run.read("jac_fro", "v")[0, j] == pytest.approx(float(torch.linalg.matrix_norm(J_v)), rel=1e-4)


def test_sample_prediction_conversion(pipes, tmp_path):
    """`sample` (x_0) outputs: eps_hat = (x - a o) / b, checked on the raw UNet output."""
    import shutil

    from edtool.networks.sources import load_source

    folder = tmp_path / "x0"
    shutil.copytree(pipes["eps"], folder)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    raw, _ = load_source(str(pipes["eps"]))
    x0_model, entry = load_source(str(folder))
    assert entry["scheduler"]["prediction_type"] == "sample"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 0.3], dtype=torch.float64)
    a, b = alpha_bar(t).sqrt().float().view(2, 1, 1, 1), beta(t).sqrt().float().view(2, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(x0_model.eps(t, x), (x - a * raw.eps(t, x)) / b, rtol=1e-5, atol=1e-5)


def test_class_conditional_unet_gets_the_labels(tmp_path, pipes):
    compute(run_config(tmp_path, [f"cond={pipes['cond']}"], realizations=2, nsteps=2))
    run = open_run(tmp_path / "run")
    labels = run.labels.tolist()
    assert all(0 <= y < 3 for y in labels)
    r, j = 1, 1
    x = torch.from_numpy(run.read("point", "cond")[r, j])
    J = _direct_score_jacobian(pipes["cond"], x, float(run.time[j]), label=labels[r])
    assert run.read("jac_fro", "cond")[r, j] == pytest.approx(float(torch.linalg.matrix_norm(J)), rel=1e-4)
    J_other = _direct_score_jacobian(pipes["cond"], x, float(run.time[j]), label=(labels[r] + 1) % 3)
    assert not torch.allclose(J, J_other)  # the label is really used


def test_resume_with_other_weights_is_refused(tmp_path, pipes):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(pipes["eps"], folder)
    cfg = run_config(tmp_path, [f"ddpm={folder}"], nsteps=1, save_points=False)
    compute(cfg)
    assert "point" not in open_run(tmp_path / "run").cell_arrays  # --save-points is off by default
    shutil.copy(pipes["other"] / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet")
    with pytest.raises(EdtoolError, match=r"models\.ddpm\.sha256"):
        compute(cfg)


def test_clamped_levels_are_noted_and_recorded(tmp_path):
    """A schedule whose smallest level (beta_start 0.01: sigma_0 = 0.1) is above sigma(1/20) = 0.078."""
    folder = _save_pipeline(tmp_path / "coarse", beta_start=0.01)
    study = prepare(run_config(tmp_path, [f"m={folder}"], nsteps=20))
    assert study.config["models"]["m"]["clamped_steps"] == [19]
    assert any("step(s) 19" in n and "clamped" in n for n in study.notes)
    assert float(study.models["m"].timestep(timesteps(20)[19:20])) == 0.0


def test_image_shape_must_match_the_data_when_machines_are_asked_for(tmp_path, pipes):
    with pytest.raises(EdtoolError, match=r"expect images of shape \[1, 8, 8\], mnist5k has \[1, 32, 32\]"):
        prepare(run_config(tmp_path, [f"ddpm={pipes['eps']}", "els"], max_samples=10))


# ------------------------------------------------------------------ py: entry points (no diffusers needed)


LINEAR_MODULE = """
import torch

M = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))


class Linear:
    '''s(x) = M x on 1x4x4 images: J = M at every point and time.'''
    image_shape = (1, 4, 4)

    def score(self, t, x, label=None):
        return (x.flatten(1) @ M.T.to(x.dtype)).reshape(x.shape)
"""


@pytest.fixture
def linear_module(tmp_path, monkeypatch):
    (tmp_path / "linmod.py").write_text(textwrap.dedent(LINEAR_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("linmod", None)
    return tmp_path


def test_py_entry_point_through_the_command_line(linear_module, tmp_path):
    import importlib

    M = importlib.import_module("linmod").M.double()
    proc = edtool_in_process("compute", "--models", "lin=py:linmod:Linear", "--nsteps", "2", "--estimator", "exact",
                             "--run-dir", tmp_path / "run", "--device", "cpu", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = open_run(tmp_path / "run")
    assert run.models == ["lin"] and run.config["models"]["lin"]["source"] == "py:linmod:Linear"
    assert run.read("ed_fro", "lin")[0] == pytest.approx([float(torch.linalg.matrix_norm(M - M.T))] * 2, rel=1e-5)
    assert run.read("jac_fro", "lin")[0] == pytest.approx([float(torch.linalg.matrix_norm(M))] * 2, rel=1e-5)


def test_saved_points_are_checksummed_like_every_cell_array(linear_module, tmp_path):
    cfg = ComputeConfig(models=["lin=py:linmod:Linear"], nsteps=2, realizations=2, device="cpu",
                        run_dir=str(tmp_path / "run"), save_points=True, points="trajectory")
    compute(cfg)
    run = open_run(tmp_path / "run", mode="r+")
    assert "point" in run.cell_arrays and run.damaged() == {}
    chunk = tmp_path / "run" / "ed.zarr" / run._chunk_key("point", 1)
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    assert set(run.damaged()) == {(1, 0)} and "point chunk" in run.damaged()[(1, 0)]
    before = run.read("point", realizations=[0])
    compute(cfg)  # resumes: recomputes the damaged cell only, to the same numbers
    run = open_run(tmp_path / "run")
    assert run.damaged() == {} and np.array_equal(run.read("point", realizations=[0]), before)
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(run.read("point", "lin")[1, 0], x_T[0].numpy())


# ------------------------------------------------------------------ one-line refusals


def test_latent_pipeline_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "ldm"
    (folder / "vqvae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                         "vqvae": ["diffusers", "VQModel"]}))
    proc = edtool_in_process("compute", "--models", f"ldm={folder}", "--run-dir", tmp_path / "run")
    assert_one_line_error(proc, "latent pipeline", "latent space")


def test_missing_diffusers_extra_is_one_line(tmp_path, monkeypatch):
    """diffusers made unimportable: the one line names the extra."""
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    proc = edtool_in_process("compute", "--models", f"m={folder}", "--run-dir", tmp_path / "run")
    assert_one_line_error(proc, 'pip install "edtool[diffusers]"')


def test_unknown_hub_id_offline_is_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    proc = edtool("compute", "--models", "x=hf:no-such-org/no-such-model", "--run-dir", tmp_path / "run",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "hf:no-such-org/no-such-model", "local cache")


@pytest.mark.parametrize("entry, expected", [
    ("unet=py:a:b", "built-in model name"),
    ("=somewhere", "LABEL=SOURCE"),
    ("m=/no/such/folder", "no file or folder"),
    ("m=py:nosuchmodule_xyz:thing", "cannot import nosuchmodule_xyz"),
    ("m=hf:onlyname", "hf:ORG/NAME"),
])
def test_bad_sources_are_one_line(tmp_path, capsys, monkeypatch, entry, expected):
    code, _, err = cli(capsys, monkeypatch, "compute", "--models", entry, "--run-dir", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


CONV_MODULE = """
import torch

K = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(2))


def make():
    '''A factory: s(x) = -x + conv(x, K) on 1x32x32 images (the shape of the held-out MNIST points).'''
    class Conv:
        image_shape = (1, 32, 32)

        def score(self, t, x, label=None):
            return -x + torch.nn.functional.conv2d(x, K.to(x.dtype), padding=1)
    return Conv()
"""


def test_py_source_on_noised_data_next_to_a_machine_then_aggregate_and_plot(tmp_path, monkeypatch):
    """The QCSBM protocol on a py: model beside the `is` machine: both measured at the stored closed-form points;
    aggregate and plot carry the label."""
    from edtool.study.aggregate import aggregate_run
    from edtool.diffusion import add_noise, initial_noise
    from edtool.study.plots import plot_run

    (tmp_path / "convmod.py").write_text(textwrap.dedent(CONV_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    images, labels = small_mnist(6, seed=3)
    write_idx_root(tmp_path / "data", images, labels, split="test")
    cfg = ComputeConfig(models=["conv=py:convmod:make", "is"], nsteps=2, realizations=2, device="cpu", probes=4,
                        points="noised-data", held_out="mnist", data_root=str(tmp_path / "data"), max_samples=20,
                        run_dir=str(tmp_path / "run"), save_points=True)
    compute(cfg)
    run = open_run(tmp_path / "run")
    assert run.done_mask().all() and run.models == ["conv", "is"]
    assert np.array_equal(run.read("point", "conv"), run.read("point", "is"))
    x0 = torch.from_numpy(run.read("final", "conv")[1]).float()[None]  # noised-data: final holds x_0
    t = torch.full((1,), float(run.time[1]), dtype=torch.float64)
    want = add_noise(x0, t, initial_noise(int(run.seeds[1]), (1, 1, 32, 32)))
    assert np.allclose(run.read("point", "conv")[1, 1], want[0].numpy(), atol=1e-6)
    summary = aggregate_run(str(tmp_path / "run"))
    assert summary["models"] == ["conv", "is"] and np.isfinite(summary["conv"]["mean_asym"])
    assert plot_run(str(tmp_path / "run"))


def test_two_labels_of_one_source_align_perfectly_and_have_locality_profiles(linear_module, tmp_path):
    """--align and --locality on py: models: the same field under two labels has Jacobian cosine 1, and the
    cumulative locality share reaches 1 at the largest radius."""
    cfg = ComputeConfig(models=["a=py:linmod:Linear", "b=py:linmod:Linear"], nsteps=2, device="cpu",
                        run_dir=str(tmp_path / "run"), align="a", trajectory="shared", locality=True,
                        locality_radius=6, estimator="exact")
    compute(cfg)
    run = open_run(tmp_path / "run")
    assert run.read("align_jac", "b")[0] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert run.read("loc_jac", "b")[0, :, -1] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert np.array_equal(run.read("ed_fro", "a"), run.read("ed_fro", "b"))


def test_text_and_cross_attention_models_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    text = tmp_path / "sd"
    (text / "unet").mkdir(parents=True)
    (text / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    cross = tmp_path / "cross"
    cross.mkdir()
    (cross / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}))
    for source, expected in ((text, "needs text conditioning (text_encoder)"),
                             (cross, "UNet2DConditionModel needs cross-attention conditioning")):
        code, _, err = cli(capsys, monkeypatch, "compute", "--models", f"m={source}", "--scheduler", tmp_path,
                           "--run-dir", tmp_path / "run")
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_py_source_in_shards_equals_one_process(linear_module, tmp_path):
    """Job-array shards (--shard i/K) with a py: source fill one run that equals a one-process run and
    aggregates; each shard command loads the source itself, as each torchrun rank does."""
    common = ["compute", "--models", "lin=py:linmod:Linear", "--nsteps", "2", "--realizations", "4",
              "--estimator", "hutchinson", "--probes", "4", "--device", "cpu", "--quiet"]
    for i in (0, 1):
        proc = edtool_in_process(*common, "--run-dir", tmp_path / "sharded", "--shard", f"{i}/2")
        assert proc.returncode == 0, proc.stderr
    proc = edtool_in_process(*common, "--run-dir", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    sharded, one = open_run(tmp_path / "sharded"), open_run(tmp_path / "one")
    for name in ("ed_fro", "jac_fro", "asym", "final"):
        np.testing.assert_array_equal(sharded.read(name), one.read(name), err_msg=name)
    assert edtool_in_process("aggregate", tmp_path / "sharded").returncode == 0
