"""edtool.els.schedule: the one place that checks, finds and applies ELS scale schedules.
(Reading and writing the files is covered next to the paper import, tests/networks/test_paper_import.py.)"""

import pytest
import torch

from edtool.errors import EdtoolError
from edtool.networks.checkpoints import file_hash
from edtool.config import check_patch_size
from edtool.els.factory import build_machine
from edtool.els.schedule import check_schedule, write_scales_json
from edtool.networks.discovery import find_scales, local_scales_path, scales_path


@pytest.mark.parametrize("k", [4, 0, -3, True, 3.0, "3", None])
def test_bad_patch_sizes_are_refused_as_edtool_and_value_errors(k):
    with pytest.raises(EdtoolError, match="--patch-size is .*odd"):
        check_patch_size(k, "--patch-size")
    with pytest.raises(ValueError):  # what library callers of make_machine catch
        check_patch_size(k)


def test_check_schedule_accepts_lists_and_int_tensors():
    assert check_schedule([1, 3, 5]) == [1, 3, 5]
    assert check_schedule(torch.tensor([3, 5])) == [3, 5]
    with pytest.raises(EdtoolError, match="entry 1 is 4"):
        check_schedule([3, 4])


def test_find_scales_prefers_the_explicit_file_then_the_first_checkpoint_with_a_calibration(tmp_path):
    resnet, unet = tmp_path / "r.safetensors", tmp_path / "u.safetensors"
    assert find_scales("els-borders", None, [resnet, unet]) == (None, None)
    write_scales_json(scales_path(unet, "els-borders"), [3, 5])
    assert find_scales("els-borders", None, [None, resnet, unet]) == ([3, 5], str(tmp_path / "u_scales_els-borders.json"))
    write_scales_json(scales_path(resnet, "els-borders"), [7, 9])
    assert find_scales("els-borders", None, [resnet, unet])[0] == [7, 9]
    assert find_scales("els-circular", None, [resnet, unet]) == (None, None)  # per machine
    explicit = write_scales_json(tmp_path / "mine.json", [1, 1])
    assert find_scales("els-borders", explicit, [resnet, unet]) == ([1, 1], str(explicit))
    with pytest.raises(EdtoolError, match="does not exist"):
        find_scales("els-borders", tmp_path / "missing.json", [resnet])


def test_a_calibration_in_the_working_directory_comes_before_the_one_beside_the_checkpoint(tmp_path, monkeypatch):
    """`calibrate` writes to ./checkpoints; compute/sample find it there first, but only when it records
    this checkpoint's sha256 (a file of the same name for other weights is not used)."""
    shipped = tmp_path / "shipped" / "net.safetensors"
    shipped.parent.mkdir()
    shipped.write_bytes(b"weights")
    beside = write_scales_json(scales_path(shipped, "els-borders"), [7, 9])
    monkeypatch.chdir(tmp_path)
    assert local_scales_path(shipped, "els-borders") == tmp_path / "checkpoints" / "net_scales_els-borders.json"
    assert find_scales("els-borders", None, [shipped]) == ([7, 9], str(beside))
    local = write_scales_json(local_scales_path(shipped, "els-borders"), [3, 5])  # no checkpoint recorded
    assert find_scales("els-borders", None, [shipped])[0] == [7, 9]
    write_scales_json(local, [3, 5], checkpoint_sha256=file_hash(shipped))
    assert find_scales("els-borders", None, [shipped]) == ([3, 5], str(local))
    write_scales_json(local, [3, 5], checkpoint_sha256="0" * 64)  # calibrated against other weights
    assert find_scales("els-borders", None, [shipped]) == ([7, 9], str(beside))
    write_scales_json(beside, [7, 9], checkpoint_sha256="0" * 64)
    assert find_scales("els-borders", None, [shipped]) == (None, None)


def test_build_machine_uses_the_schedule_else_the_fixed_size():
    images = torch.rand(4, 1, 6, 6) * 2 - 1
    m, info = build_machine("ls", images, scales=[3, 5], source="s.json")
    assert m.patch_sizes == [3, 5] and info == {"scales": [3, 5], "scales_file": "s.json"}
    m, info = build_machine("ls", images, patch_size=7)
    assert m.patch_sizes == [7] and info == {"patch_size": 7}
    m, info = build_machine("is", images, scales=[3], patch_size=7)  # the ideal machine has no patch size
    assert m.patch_sizes is None and info == {}
    with pytest.raises(EdtoolError, match="odd"):
        build_machine("ls", images, scales=[3, 6])
