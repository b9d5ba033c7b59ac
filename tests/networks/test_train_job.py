"""`edtool train` as a function (edtool.networks.train_job): settings from a state folder unless given again,
--init-from's weights and architecture, and every refusal before any training or any folder is made."""

import pytest
import torch

from edtool.config import TrainConfig
from edtool.errors import EdtoolError
from edtool.networks import checkpoints
from edtool.networks.train_job import training_job

TINY = {"arch": "resnet", "batch": 2, "width": 16, "layers": 1}


def test_a_state_folder_gives_the_settings_not_given_again(tmp_path):
    with training_job({**TINY, "steps": 2, "lr_gamma": 0.99}, state=tmp_path / "st") as job:
        assert job.out is None and job.work_dir == tmp_path / "st"
        job.run(device="cpu")
        assert job.reached() == 2
    with training_job({"steps": 3}, state=tmp_path / "st") as job:
        assert job.cfg == TrainConfig(**{**TINY, "steps": 3, "lr_gamma": 0.99})
        job.run(device="cpu")
        assert job.reached() == 3
    with training_job({}, state=tmp_path / "st") as job:  # no --steps: the state's own count
        assert job.cfg.steps == 3


def test_init_from_gives_the_checkpoints_weights_and_refuses_another_architecture(tmp_path):
    with training_job({**TINY, "steps": 1}, out=tmp_path / "first") as job:
        first = job.run(device="cpu")
    with training_job({**TINY, "steps": 1}, init_from=first, out=tmp_path / "second") as job:
        assert job.cfg.init_from == checkpoints.file_hash(first)
        weights = checkpoints.load(first).net.state_dict()
        assert job.init_weights.keys() == weights.keys()
        assert all(torch.equal(job.init_weights[k], weights[k]) for k in weights)
    with pytest.raises(EdtoolError, match="is not a unet; give a checkpoint of the same architecture"):
        with training_job({"arch": "unet", "steps": 1}, init_from=first, out=tmp_path / "third"):
            pass
    assert not (tmp_path / "third.safetensors").exists()


@pytest.mark.parametrize("given, kw, words", [
    ({"steps": 1}, {}, "--arch is required"),
    ({**TINY, "width": 12}, {}, "--width must be a multiple of 8"),
    ({"arch": "unet", "fsizes": [8] * 7}, {}, "images do not divide by 64"),
    ({**TINY}, {"snapshot_every": 1}, "--snapshot-every needs --state DIR")])
def test_bad_settings_are_refused_before_any_folder_is_made(tmp_path, monkeypatch, given, kw, words):
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdtoolError, match=words):
        with training_job(given, out=tmp_path / "out" / "m", **kw):
            pytest.fail("a job was made")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "train").exists()
