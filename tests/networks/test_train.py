"""Training: the paper's recipe runs, writes our format, and resumes to the same weights."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edtool.networks import checkpoints
from edtool.networks import discovery
from edtool.cli import app, main
from edtool.config import TrainConfig, default
from edtool.errors import EdtoolError
from edtool.paths import REPO_ROOT
from edtool.networks.train import train, work_dir_name


def _tiny_data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


class Interrupted(Exception):
    pass


def interrupt_at(step):
    """A `log` that stops training (as Ctrl-C does) when step `step`'s loss is read: with a save every step,
    that is before step `step` is saved, so the state left is step - 1's."""
    def log(s, loss, lr):
        if s == step:
            raise Interrupted
    return log


def _cfg(**kw):
    return TrainConfig(**{"arch": "unet", "dataset": "tiny", "steps": 6, "batch": 4, "fsizes": [8, 16],
                          "emb_dim": 16, **kw})


def _interrupted(cfg, images, labels, out, work_dir, at: int, **kw):
    """Train with the state saved every step, interrupted as Ctrl-C does (a KeyboardInterrupt) when step
    `at` is logged: the run ends there, the state of step at - 1 on disk."""
    def log(step, loss, lr):
        if step == at:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(cfg, images, labels, out, work_dir, ckpt_every=1, log=log, **kw)
    assert json.loads((Path(work_dir) / "state.json").read_text())["step"] == at - 1


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    images, labels = _tiny_data()
    straight = train(_cfg(), images, labels, tmp_path / "a", tmp_path / "wa", ckpt_every=1)
    _interrupted(_cfg(), images, labels, tmp_path / "b", tmp_path / "wb", at=4)
    assert not (tmp_path / "b.safetensors").exists()
    resumed = train(_cfg(), images, labels, tmp_path / "b", tmp_path / "wb", ckpt_every=1)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_training_writes_manifest_loss_curve_and_samples(tmp_path):
    images, labels = _tiny_data()
    losses = []
    path = train(_cfg(conditional=True), images, labels, tmp_path / "m", tmp_path / "w", command="edtool train x",
                 log=lambda step, loss, lr: losses.append(loss))
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["arch"] == "unet" and manifest["conditional"] and manifest["num_classes"] == 3
    assert manifest["image_shape"] == [1, 8, 8] and manifest["training"]["command"] == "edtool train x"
    assert len(losses) == 6 and manifest["final_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for suffix in ("_loss.png", "_samples.png"):
        assert (tmp_path / f"m{suffix}").stat().st_size > 1000
    net = checkpoints.load(path, dataset="tiny", image_shape=[1, 8, 8])
    x = torch.randn(2, 1, 8, 8)
    assert net.eps(torch.tensor([0.5, 0.5]), x, torch.tensor([0, 2])).shape == x.shape


def _main(monkeypatch, capsys, *args):
    """`edtool ARGS` through the console entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edtool", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_command_writes_to_the_working_directory_and_never_replaces(tmp_path, monkeypatch, capsys):
    """No --out: ./checkpoints/ of the working directory, not the shipped folder; an existing
    checkpoint is replaced only with --force."""
    shipped = _digests(REPO_ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--arch", "resnet", "--steps", "2", "--batch", "2", "--width", "16", "--layers", "1", "--quiet"]
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 0, err
    path = tmp_path / "checkpoints" / "mnist5k_resnet.safetensors"
    assert discovery.discover("mnist5k", "resnet", tmp_path / "checkpoints") == path
    before = path.read_bytes()

    code, out, err = _main(monkeypatch, capsys, *args[:4], "3", *args[5:])  # other settings, same name
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err and "--force" in err
    assert path.read_bytes() == before
    code, out, err = _main(monkeypatch, capsys, *args[:4], "3", *args[5:], "--force")
    assert code == 0, err
    assert checkpoints.read_manifest(path)["training"]["steps"] == 3 and path.read_bytes() != before
    assert _digests(REPO_ROOT / "checkpoints") == shipped

    code, out, err = _main(monkeypatch, capsys, "train", "--arch", "resnet", "--width", "12")
    assert code == 2 and err.startswith("edtool: error: --width")


def test_a_work_dir_of_other_settings_is_refused_by_name(tmp_path):
    """train() refuses to resume a state written with other settings and names them; the CLI keys its
    work dir by the settings hash, so two settings never meet in one folder."""
    images, labels = _tiny_data()
    _interrupted(_cfg(), images, labels, tmp_path / "a", tmp_path / "w", at=3)
    with pytest.raises(EdtoolError, match="other settings \\(batch, steps\\)"):
        train(_cfg(steps=7, batch=2), images, labels, tmp_path / "a", tmp_path / "w")
    assert work_dir_name("x/a.safetensors", _cfg()) != work_dir_name("x/a.safetensors", _cfg(steps=7))
    assert work_dir_name("x/a.safetensors", _cfg()) == work_dir_name("y/a", _cfg())


@pytest.mark.parametrize("kw, words", [
    ({"arch": "vit"}, "--arch"), ({"padding": "reflect"}, "--padding"), ({"arch": "resnet", "width": 12}, "--width"),
    ({"steps": 0}, "--steps"), ({"batch": 0}, "--batch"), ({"lr": 0.0}, "--lr"), ({"lr_final_factor": 0.0}, "final"),
    ({"ema_decay": 1.0}, "--ema-decay"),
])
def test_train_refuses_bad_settings_before_writing_anything(tmp_path, kw, words):
    images, labels = _tiny_data()
    with pytest.raises(EdtoolError, match=words):
        train(_cfg(**kw), images, labels, tmp_path / "m", tmp_path / "w")
    assert not any(tmp_path.iterdir())


def test_the_command_and_the_library_share_their_defaults():
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p.default for p in command.params}
    for name in ("dataset", "steps", "batch", "lr", "lr_final_factor", "ema_decay", "seed", "emb_dim", "width", "layers"):
        assert options[name] == default(TrainConfig, name), name
    assert options["fsizes"] == ",".join(map(str, default(TrainConfig, "fsizes")))


def test_shipped_weights_are_the_moving_average(tmp_path):
    """One step: EMA = d * initial + (1 - d) * trained, with the warm-up decay d = min(decay, 2/11)."""
    from edtool.networks.models import build_network
    from edtool.networks.train import arch_kwargs, ema_decay

    images, labels = _tiny_data()
    cfg_raw, cfg_ema = _cfg(steps=1, ema_decay=0.0), _cfg(steps=1, ema_decay=0.999)
    raw = load_file(str(train(cfg_raw, images, labels, tmp_path / "raw", tmp_path / "wr")))
    ema = load_file(str(train(cfg_ema, images, labels, tmp_path / "ema", tmp_path / "we")))
    torch.manual_seed(0)
    init = build_network("unet", **arch_kwargs(cfg_raw, 1, None)).state_dict()
    d = ema_decay(0.999, 1)
    assert abs(d - 2 / 11) < 1e-12
    changed = 0
    for k in raw:
        assert torch.allclose(ema[k], d * init[k] + (1 - d) * raw[k], atol=1e-6), k
        changed += int(not torch.equal(raw[k], init[k]))
    assert changed > 0  # the step moved the weights, so the check above compares different tensors
    manifest = json.loads((tmp_path / "ema.json").read_text())
    assert manifest["weights"] == "ema" and set(manifest["eval_loss"]) == {"raw", "ema"}


def _state_tensors(folder: Path) -> dict:
    meta = json.loads((folder / "state.json").read_text())
    return load_file(str(folder / meta["tensors"]))


@pytest.mark.parametrize("gamma", [None, 0.9])
def test_a_saved_state_continues_bit_for_bit(tmp_path, gamma):
    """N+M steps in one go equal N steps, save, load, M steps: weights, moving average, AdamW moments,
    RNG state and losses, bit for bit. With --lr-gamma the same state is continued to more steps."""
    images, labels = _tiny_data()
    straight = train(_cfg(lr_gamma=gamma), images, labels, None, tmp_path / "a", ckpt_every=100)
    assert straight is None  # no --out: only the state advances
    if gamma is None:  # interrupted after 3 of 6 steps, then resumed by a second call
        _interrupted(_cfg(), images, labels, None, tmp_path / "b", at=4)
    else:  # a first stretch of 3 steps, then the same run continued to 6
        train(_cfg(lr_gamma=gamma, steps=3), images, labels, None, tmp_path / "b", ckpt_every=100)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    train(_cfg(lr_gamma=gamma), images, labels, None, tmp_path / "b", ckpt_every=100)
    a, b = _state_tensors(tmp_path / "a"), _state_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a) and "rng" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(a["losses"]) == 6 and [p.suffix for p in (tmp_path / "b").iterdir()] .count(".safetensors") == 1


def test_a_time_limited_run_saves_where_it_stopped_and_continues_bit_for_bit(tmp_path):
    """--time-limit 0 stops after one step (a job that hits its wall-clock limit), saving the state there even
    between checkpoints; rerunning it until done ends with the uninterrupted run's state, bit for bit."""
    images, labels = _tiny_data()
    cfg = _cfg(lr_gamma=0.99)
    train(cfg, images, labels, None, tmp_path / "a", ckpt_every=100)
    reached = []
    for _ in range(10):
        train(cfg, images, labels, None, tmp_path / "b", ckpt_every=100, time_limit_s=0)
        reached.append(json.loads((tmp_path / "b" / "state.json").read_text())["step"])
        if reached[-1] == cfg.steps:
            break
    assert reached == [1, 2, 3, 4, 5, 6]
    a, b = _state_tensors(tmp_path / "a"), _state_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_command_time_limit_and_device(tmp_path, monkeypatch, capsys):
    """`--time-limit 0` says where it stopped and how to go on; --device cpu is the CPU run; a device this
    machine lacks is one line and exit 2, before anything is written."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--arch", "resnet", "--batch", "2", "--width", "16", "--layers", "1", "--quiet",
            "--lr-gamma", "0.99", "--state", "st", "--steps", "3"]
    code, out, err = _main(monkeypatch, capsys, *base, "--time-limit", "0", "--device", "cpu")
    assert code == 0, err
    assert "stopped at the time limit at step 1 of 3" in out
    assert json.loads((tmp_path / "st" / "state.json").read_text())["step"] == 1
    code, out, err = _main(monkeypatch, capsys, *base)
    assert code == 0 and "training state at step 3" in out, err
    for device in (["cuda:7"] if torch.cuda.device_count() < 8 else []) + ["meta", "gpu"]:
        code, out, err = _main(monkeypatch, capsys, *base[:-4], "--state", "other", "--device", device)
        assert code == 2 and "--device" in err and len(err.strip().splitlines()) == 1, (device, err)
        assert not (tmp_path / "other").exists()
    code, out, err = _main(monkeypatch, capsys, *base, "--time-limit", "-1")
    assert code == 2 and "--time-limit" in err


def test_a_damaged_state_is_refused_not_trained_on(tmp_path):
    images, labels = _tiny_data()
    train(_cfg(steps=2), images, labels, None, tmp_path / "s", ckpt_every=1)
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    tensors = tmp_path / "s" / meta["tensors"]
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(EdtoolError, match="damaged"):
        train(_cfg(steps=4), images, labels, None, tmp_path / "s")


def test_snapshots_record_held_out_loss_grid_and_first_four_then_geometric_weights(tmp_path):
    from edtool.networks.train import eval_loss, read_snapshots

    images, labels = _tiny_data()
    held_images, held_labels = _tiny_data(12)
    cfg = _cfg(steps=8, lr_gamma=0.99)
    train(cfg, images, labels, None, tmp_path / "s", held_out=(held_images, held_labels), snapshot_every=1,
          command="edtool train --state s")
    records = read_snapshots(tmp_path / "s")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [("weights" in r) for r in records] == [True] * 4 + [False, False, False, True]  # 1..4, then 2**j
    for r in records:
        assert (tmp_path / "s" / r["samples"]).stat().st_size > 500
    last = checkpoints.load(tmp_path / "s" / records[-1]["weights"], dataset="tiny", image_shape=[1, 8, 8])
    ema = {k[4:]: v for k, v in _state_tensors(tmp_path / "s").items() if k.startswith("ema.")}
    assert all(torch.equal(last.net.state_dict()[k], v) for k, v in ema.items())  # the snapshot is the average
    assert records[-1]["held_out_loss"] == pytest.approx(eval_loss(last.net, held_images, held_labels, cfg))
    assert checkpoints.read_manifest(tmp_path / "s" / records[-1]["weights"])["training"]["command"] == "edtool train --state s"


def test_checkpoint_written_from_a_state_is_its_last_snapshot_with_held_out_loss(tmp_path):
    """Shipping a campaign network (`edtool train --state S --steps N --out X` at step N) writes the snapshot's
    weights byte for byte, and the manifest keeps the held-out loss the snapshot recorded."""
    from edtool.networks.train import read_snapshots

    images, labels = _tiny_data()
    held = _tiny_data(12)
    cfg = _cfg(steps=4, lr_gamma=0.99)
    train(cfg, images, labels, None, tmp_path / "s", held_out=held, snapshot_every=2)
    path = train(cfg, images, labels, tmp_path / "out" / "m", tmp_path / "s", held_out=held, snapshot_every=2)
    last = read_snapshots(tmp_path / "s")[-1]
    assert last["step"] == 4
    assert checkpoints.file_hash(path) == checkpoints.file_hash(tmp_path / "s" / last["weights"])
    assert checkpoints.read_manifest(path)["held_out_loss"] == pytest.approx(last["held_out_loss"], rel=1e-6)


def test_init_from_starts_at_the_given_weights(tmp_path):
    images, labels = _tiny_data()
    first = train(_cfg(steps=2), images, labels, tmp_path / "a", tmp_path / "wa")
    start = load_file(str(first))
    cfg = _cfg(steps=1, lr=1e-12, ema_decay=0.0, init_from=checkpoints.file_hash(first))
    cont = load_file(str(train(cfg, images, labels, tmp_path / "b", tmp_path / "wb", init_weights=start)))
    fresh = load_file(str(train(_cfg(steps=1, lr=1e-12, ema_decay=0.0), images, labels, tmp_path / "c", tmp_path / "wc")))
    assert all(torch.allclose(cont[k], start[k], atol=1e-9) for k in start)
    assert not all(torch.allclose(fresh[k], start[k], atol=1e-3) for k in start if start[k].is_floating_point())


def test_train_command_continues_a_state_folder_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """`edtool train --state DIR --steps N` continues the run in DIR; a setting given that differs is refused
    by name; --lr inf is a usage error, not a NaN network."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--arch", "resnet", "--batch", "2", "--width", "16", "--layers", "1", "--quiet",
            "--lr-gamma", "0.99", "--state", "st"]
    code, out, err = _main(monkeypatch, capsys, *base, "--steps", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "st" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "checkpoints").exists()  # --state without --out writes no checkpoint
    code, out, err = _main(monkeypatch, capsys, "train", "--state", "st", "--steps", "3", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "st" / "state.json").read_text())["step"] == 3
    code, out, err = _main(monkeypatch, capsys, "train", "--state", "st", "--steps", "4", "--batch", "3", "--quiet")
    assert code == 2 and "other settings (batch)" in err and len(err.strip().splitlines()) == 1
    code, out, err = _main(monkeypatch, capsys, *base[:-2], "--steps", "2", "--lr", "inf")
    assert code == 2 and "--lr" in err and not (tmp_path / "checkpoints").exists()


def test_outputs_are_checked_before_any_training(tmp_path, monkeypatch, capsys):
    """--force never replaces a shipped file; an output under a file, or a folder as --out, is one line and
    exit 2 before the data is loaded; the training figures of another tool are not replaced."""
    shipped = _digests(REPO_ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("edtool.data.load_dataset", lambda *a, **k: pytest.fail("loaded data before checking"))
    args = ["train", "--arch", "resnet", "--steps", "1", "--quiet", "--out"]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "m_loss.png").write_text("a user's figure")
    for out, words in [(REPO_ROOT / "checkpoints" / "mnist5k_resnet", "edtool ships"),
                       (tmp_path / "afile" / "m", "is a file, not a folder"), (tmp_path / "y" / "m", "m_loss.png")]:
        code, _, err = _main(monkeypatch, capsys, *args, out, "--force" if "ships" in words else "--quiet")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "y" / "m_loss.png").read_text() == "a user's figure"
    assert _digests(REPO_ROOT / "checkpoints") == shipped


def test_ema_update_is_the_per_tensor_average_bit_for_bit():
    from edtool.networks.models import build_network
    from edtool.networks.train import update_ema

    torch.manual_seed(3)
    net = build_network("unet", fsizes=[8, 16], emb_dim=16)
    ema = {k: (v + torch.randn_like(v)) if v.dtype.is_floating_point else v.clone() for k, v in net.state_dict().items()}
    want = {k: v.clone() for k, v in ema.items()}
    for k, v in net.state_dict().items():  # the update as it was written tensor by tensor
        if v.dtype.is_floating_point:
            want[k].mul_(0.93).add_(v, alpha=1 - 0.93)
    update_ema(ema, net, 0.93)
    assert all(torch.equal(ema[k], want[k]) for k in want)


def test_losses_read_from_the_device_in_batches_log_every_step_and_train_the_same(tmp_path, monkeypatch):
    """Losses are read (a host sync) about once a second, not every step: every step is still logged, in order,
    with the same loss, and the weights do not depend on how often they are read."""
    from edtool.networks import train as training

    images, labels = _tiny_data()
    runs = {}
    for every in (0.0, 1e9):
        monkeypatch.setattr(training, "READ_LOSSES_EVERY_S", every)
        logged = []
        path = train(_cfg(), images, labels, tmp_path / f"out{every}", tmp_path / f"w{every}", ckpt_every=4,
                     log=lambda s, loss, lr: logged.append((s, loss, lr)))
        runs[every] = logged, load_file(str(path))
    (each, a), (batched, b) = runs[0.0], runs[1e9]
    assert [s for s, _, _ in each] == list(range(1, 7)) and each == batched
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_training_before_anything_is_written(tmp_path):
    images, labels = _tiny_data()
    images[:] = float("nan")
    with pytest.raises(EdtoolError, match=r"training diverged at step 1 \(loss nan\)"):
        train(_cfg(), images, labels, tmp_path / "out", tmp_path / "work", ckpt_every=2)
    assert not (tmp_path / "out.safetensors").exists() and not list((tmp_path / "work").glob("*.safetensors"))
