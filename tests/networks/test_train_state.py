"""`edtool train --state DIR` as a user meets it: the console entry point on real state folders edited,
damaged, shared with another process, filled up (a new process only where the test is about processes:
the holder of a lock, trainers killed and resumed). A state is only ever continued as it was written;
anything else is one line and exit 2, and the files in the folder that the state did not write stay
untouched."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edtool.errors import EdtoolError
from edtool.networks import train_state
from helpers import assert_one_line_error, console_script, edtool, edtool_in_process


# a ResNet of width 16 with one layer on mnist5k: a step takes milliseconds
TINY = ["train", "--arch", "resnet", "--batch", "2", "--width", "16", "--layers", "1", "--quiet"]
GAMMA = [*TINY, "--lr-gamma", "0.9"]


def _step(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


@pytest.fixture(scope="module")
def base_state(tmp_path_factory):
    """A state at step 2 of a --lr-gamma run, made once; tests copy it."""
    folder = tmp_path_factory.mktemp("base") / "st"
    proc = edtool_in_process(*GAMMA, "--steps", "2", "--state", folder, cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr
    return folder


def _copy(base_state, tmp_path) -> Path:
    folder = tmp_path / "st"
    shutil.copytree(base_state, folder)
    return folder


def test_continuing_removes_only_the_files_the_state_wrote(base_state, tmp_path):
    """A user's backup beside the state, even one named like a state file, survives; the state's own older
    tensors are removed."""
    st = _copy(base_state, tmp_path)
    (st / "state_step00000002 backup.safetensors").write_bytes((st / "state_step00000002.safetensors").read_bytes())
    (st / "state_step00000001.safetensors").write_bytes(b"a user's file named like a state")
    proc = edtool_in_process(*GAMMA, "--steps", "4", "--state", st, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in st.iterdir() if not p.name.startswith("."))
    assert names == ["state.json", "state_step00000001.safetensors", "state_step00000002 backup.safetensors",
                     "state_step00000004.safetensors"]
    assert (st / "state_step00000001.safetensors").read_bytes() == b"a user's file named like a state"
    assert _step(st) == 4


def test_a_second_trainer_on_one_state_is_refused_naming_the_first(tmp_path):
    """Two trainers on one --state: the second is one line naming the holder's pid; after the first is killed
    (-9) the next run goes on: the lock is the kernel's and dies with its holder."""
    st = tmp_path / "st"
    first = subprocess.Popen([*console_script(), *GAMMA, "--steps", "1000000", "--state", str(st)], cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = st / ".edtool-access.lock"
        deadline = time.time() + 120
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        second = edtool_in_process(*GAMMA, "--steps", "3", "--state", st, cwd=tmp_path)
        assert_one_line_error(second)
        assert f"pid {first.pid}" in second.stderr and "busy" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = edtool_in_process(*GAMMA, "--steps", "1000000", "--time-limit", "0", "--state", st, cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "stopped at the time limit" in third.stdout


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                                capture_output=True).returncode == 0


def test_a_full_disk_during_a_save_is_one_line_and_the_old_state_stays(base_state, tmp_path):
    """A real full file system (a small tmpfs, filled up): the save fails with the disk error line, rc 2, the
    state at step 2 stays readable, and with space again the same command continues it."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "400k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        st = disk / "st"
        shutil.copytree(base_state, st)
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - 8192))
        proc = edtool_in_process(*GAMMA, "--steps", "4", "--state", st, cwd=tmp_path)
        assert_one_line_error(proc, )
        assert "no space left" in proc.stderr and "state_step00000004" in proc.stderr
        assert train_state.read(st)["step"] == 2
        filler.unlink()
        proc = edtool_in_process(*GAMMA, "--steps", "4", "--state", st, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert _step(st) == 4
    finally:
        subprocess.run(["umount", str(disk)])


def test_the_continue_hint_is_true(base_state, tmp_path):
    """A --lr-gamma run's hint names the N it accepts, and that N works; a run whose learning rate decays over
    its --steps says it cannot be continued, and another --steps is refused naming --lr-gamma."""
    st = _copy(base_state, tmp_path)
    proc = edtool_in_process("train", "--state", st, "--steps", "3", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"--state {st} --steps N (any N above 3)" in proc.stdout
    proc = edtool_in_process("train", "--state", st, "--steps", "2", "--quiet", cwd=tmp_path)
    assert_one_line_error(proc)
    assert "step 3" in proc.stderr and "--steps 3 or more" in proc.stderr

    fixed = tmp_path / "fixed"
    proc = edtool_in_process(*TINY, "--steps", "2", "--state", fixed, cwd=tmp_path)
    assert proc.returncode == 0 and "cannot be continued" in proc.stdout and "--steps N" not in proc.stdout
    proc = edtool_in_process("train", "--state", fixed, "--steps", "5", "--quiet", cwd=tmp_path)
    assert_one_line_error(proc)
    assert "--lr-gamma" in proc.stderr and "--steps 2" in proc.stderr


def _edit(folder: Path, change):
    meta = json.loads((folder / "state.json").read_text())
    change(meta)
    (folder / "state.json").write_text(json.dumps(meta))


# hand edits of state.json: each is refused naming what is wrong, before any training
EDITS = {
    "negative step": lambda m: m.update(step=-5),
    "step as text": lambda m: m.update(step="four"),
    "step beyond the tensors": lambda m: m.update(step=3, tensors="state_step00000003.safetensors"),
    "no config": lambda m: m.pop("config"),
    "no param_groups": lambda m: m.pop("param_groups"),
    "no params": lambda m: m["param_groups"][0].pop("params"),
    "an extra config key": lambda m: m["config"].update(colour="red"),
    "fsizes as text": lambda m: m["config"].update(fsizes="abc"),
    "lr changed": lambda m: m["config"].update(lr=0.5),
    "tensors outside the folder": lambda m: m.update(tensors="../../etc/passwd"),
}


@pytest.mark.parametrize("name", ["negative step", "no config", "lr changed"])
def test_a_hand_edited_state_json_is_one_line(base_state, tmp_path, name):
    """The console script on an edited state.json: one line, rc 2, the state left as it was."""
    st = _copy(base_state, tmp_path)
    _edit(st, EDITS[name])
    before = (st / "state.json").read_bytes()
    proc = edtool_in_process("train", "--state", st, "--steps", "4", "--quiet", cwd=tmp_path)
    assert_one_line_error(proc)
    assert str(st / "state.json") in proc.stderr
    assert (st / "state.json").read_bytes() == before and (st / "state_step00000002.safetensors").exists()


@pytest.mark.parametrize("name", sorted(EDITS))
def test_every_edit_of_state_json_is_refused_when_read(base_state, tmp_path, name):
    st = _copy(base_state, tmp_path)
    _edit(st, EDITS[name])
    with pytest.raises(EdtoolError, match="state.json"):
        train_state.read(st)


def test_state_json_a_folder_or_the_state_a_file_is_one_line(base_state, tmp_path):
    st = _copy(base_state, tmp_path)
    (st / "state.json").unlink()
    (st / "state.json").mkdir()
    assert_one_line_error(edtool_in_process("train", "--state", st, "--steps", "4", "--quiet", cwd=tmp_path), )
    afile = tmp_path / "afile"
    afile.write_text("mine")
    proc = edtool_in_process(*GAMMA, "--steps", "2", "--state", afile, cwd=tmp_path)
    assert_one_line_error(proc)
    assert "is a file, not a folder" in proc.stderr and afile.read_text() == "mine"


class _Pickled:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_foreign_tensors_with_a_matching_sha256_are_one_line_and_never_unpickled(base_state, tmp_path):
    """The tensor file swapped for a pickle, or for another network's tensors, with state.json's sha256 forged
    to match: one line naming the file; the pickle is never run."""
    import hashlib

    for what in ("pickle", "other network"):
        st = _copy(base_state, tmp_path / what.replace(" ", "_"))
        tensors = st / "state_step00000002.safetensors"
        if what == "pickle":
            torch.save({"x": _Pickled()}, tensors)
        else:
            data = load_file(str(tensors))
            data["model.extra"] = torch.zeros(3)
            save_file(data, str(tensors))
        _edit(st, lambda m: m.update(tensors_sha256=hashlib.sha256(tensors.read_bytes()).hexdigest()))
        proc = edtool_in_process("train", "--state", st, "--steps", "4", "--quiet", cwd=st.parent)
        assert_one_line_error(proc)
        assert "state_step00000002.safetensors" in proc.stderr, proc.stderr
        assert not (st.parent / "pwned").exists()


def test_out_a_device_or_a_folder_is_refused_and_quiet_is_quiet(tmp_path):
    """--out /dev/null or an existing folder: one line, nothing written beside it; --quiet prints no steps."""
    before = set(os.listdir("/dev"))
    for out in ("/dev/null", tmp_path):
        proc = edtool_in_process(*TINY, "--steps", "2", "--out", out, cwd=tmp_path)
        assert_one_line_error(proc)
        assert "not a file" in proc.stderr
    assert set(os.listdir("/dev")) == before and not list(tmp_path.parent.glob(f"{tmp_path.name}.*"))
    proc = edtool_in_process(*TINY, "--steps", "3", "--out", tmp_path / "m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert proc.stdout.startswith("wrote ")


def _tiny_data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _tiny_cfg(**kw):
    from edtool.config import TrainConfig

    return TrainConfig(**{"arch": "unet", "dataset": "tiny", "steps": 2, "batch": 4, "fsizes": [8, 16],
                          "emb_dim": 16, "lr_gamma": 0.9, **kw})


def test_tensors_without_their_state_json_are_never_trained_over(tmp_path):
    """A state's tensors left without state.json (deleted by hand, or a first save killed) are refused, not
    silently replaced by a fresh run; half-written temporary files of a killed save are removed at the next."""
    from edtool.networks.train import train

    images, labels = _tiny_data()
    train(_tiny_cfg(), images, labels, None, tmp_path / "s", ckpt_every=1)
    (tmp_path / "s" / "state.json").unlink()
    with pytest.raises(EdtoolError, match="state_step00000002.safetensors, a training state's tensors, but no"):
        train(_tiny_cfg(), images, labels, None, tmp_path / "s")
    assert (tmp_path / "s" / "state_step00000002.safetensors").exists()

    train(_tiny_cfg(), images, labels, None, tmp_path / "t", ckpt_every=1)
    half = tmp_path / "t" / ".state_step00000003.4242.tmp.safetensors"
    half.write_bytes(b"half a save")
    mine = tmp_path / "t" / ".state_step00000003.mine"
    mine.write_bytes(b"a user's dot-file")
    train(_tiny_cfg(steps=3), images, labels, None, tmp_path / "t")
    assert not half.exists() and mine.exists() and _step(tmp_path / "t") == 3


def test_non_finite_tensors_and_a_dangling_link_are_refused(tmp_path):
    from edtool.networks.train import train

    images, labels = _tiny_data()
    train(_tiny_cfg(), images, labels, None, tmp_path / "s", ckpt_every=1)
    tensors = tmp_path / "s" / "state_step00000002.safetensors"
    data = load_file(str(tensors))
    next(v for k, v in data.items() if k.startswith("ema.") and v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(data, str(tensors), metadata={"format": "edtool-training-state", "step": "2",
                                            "config": json.dumps(_tiny_cfg().identity(), sort_keys=True)})
    import hashlib

    _edit(tmp_path / "s", lambda m: m.update(tensors_sha256=hashlib.sha256(tensors.read_bytes()).hexdigest()))
    with pytest.raises(EdtoolError, match="non-finite"):
        train(_tiny_cfg(steps=3), images, labels, None, tmp_path / "s")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(EdtoolError, match="link to nothing"):
        train(_tiny_cfg(), images, labels, None, tmp_path / "link")
    assert not (tmp_path / "nowhere").exists()


def test_an_overflowing_learning_rate_is_one_line(tmp_path):
    proc = edtool_in_process(*TINY, "--steps", "2", "--lr", "1e300", "--state", tmp_path / "st", cwd=tmp_path)
    assert_one_line_error(proc)
    assert "--lr" in proc.stderr and not (tmp_path / "st").exists()


@pytest.mark.slow
def test_trainers_killed_at_random_moments_resume_to_the_uninterrupted_state(tmp_path):
    """kill -9 at random moments (in steps and in saves, a save every step), then the same command: the state
    equals the uninterrupted run's, bit for bit, and no half-written file is left."""
    import random

    args = [*GAMMA, "--steps", "8", "--ckpt-every", "1"]
    assert edtool(*args, "--state", tmp_path / "straight", cwd=tmp_path).returncode == 0
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([*console_script(), *args, "--state", str(tmp_path / "k")], cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},  # as edtool() runs: the same sums
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = edtool(*args, "--state", tmp_path / "k", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a = load_file(str(tmp_path / "straight" / "state_step00000008.safetensors"))
    b = load_file(str(tmp_path / "k" / "state_step00000008.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        ".edtool-access.lock", ".edtool-written.json", "state.json", "state_step00000008.safetensors"]


def test_a_damaged_snapshot_record_is_refused_before_training(tmp_path):
    from edtool.networks.train import train

    images, labels = _tiny_data()
    held = _tiny_data(12)
    train(_tiny_cfg(), images, labels, None, tmp_path / "s", held_out=held, snapshot_every=2)
    for text in ["not json", "[1, 2]", '[{"step": "four"}]', '{"step": 1}']:
        (tmp_path / "s" / "snapshots.json").write_text(text)
        with pytest.raises(EdtoolError, match="snapshots.json"):
            train(_tiny_cfg(steps=4), images, labels, None, tmp_path / "s", held_out=held, snapshot_every=2,
                  log=lambda *a: pytest.fail("trained on a damaged snapshot record"))
        assert _step(tmp_path / "s") == 2
