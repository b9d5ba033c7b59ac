"""Shared test setup: every test gets its own cache and checkpoint folders, and runs on CPU.

On a machine with a GPU, `pytest` runs what it runs on one without: CUDA is hidden from every test (from
torch in this process, and from the commands the tests start) unless the test is marked `gpu`; those run
only with `pytest --gpu` (and are skipped without CUDA)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, save_tiny

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="also run the tests marked gpu (they need CUDA)")


def pytest_collection_modifyitems(config, items):
    reason = None if config.getoption("--gpu") else "needs --gpu"
    if reason is None and not torch.cuda.is_available():
        reason = "--gpu given, but torch sees no CUDA device"
    for item in items:
        if reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's cache/ (prepared data is shared across tests)."""
    shared = tmp_path_factory.getbasetemp() / "edtool-cache"
    monkeypatch.setenv("EDTOOL_CACHE", str(shared))
    yield


@pytest.fixture(autouse=True)
def _on_cpu(request, monkeypatch):
    """`--device auto` (the default of every config a test builds) means the CPU, here and in the commands a
    test starts, unless the test is marked gpu."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A folder with small random-weight `unet` and `resnet` checkpoints for mnist5k (helpers.TINY)."""
    folder = tmp_path_factory.mktemp("tiny-checkpoints")
    for i, arch in enumerate(TINY):
        save_tiny(folder / f"tiny_{arch}", arch, seed=i)
    return folder


@pytest.fixture
def tiny_networks(tiny_checkpoints, monkeypatch):
    """`unet` and `resnet` resolve to the tiny checkpoints (in this process and in subprocesses); a module
    asks for it with `pytestmark = pytest.mark.usefixtures("tiny_networks")`."""
    monkeypatch.setenv("EDTOOL_CHECKPOINTS", str(tiny_checkpoints))


# ------------------------------------------------------------------ computed runs shared by a session


@pytest.fixture(scope="session")
def computed_run(tiny_checkpoints, tmp_path_factory):
    """computed_run(**kw) -> the folder of a finished run of `helpers.config(folder, **kw)` on the tiny
    networks, computed once per session for each distinct kw. Read it only; a test that changes a run
    copies it first (computed_copy)."""
    from edtool.study.compute import compute
    from helpers import config

    made = {}

    def get(**kw):
        key = json.dumps(kw, sort_keys=True)
        if key not in made:
            folder = tmp_path_factory.mktemp("computed") / "run"
            with pytest.MonkeyPatch.context() as env:  # what tiny_networks, _isolated_cache and _on_cpu set
                env.setenv("EDTOOL_CHECKPOINTS", str(tiny_checkpoints))
                env.setenv("EDTOOL_CACHE", str(tmp_path_factory.getbasetemp() / "edtool-cache"))
                env.setenv("CUDA_VISIBLE_DEVICES", "")
                env.setattr(torch.cuda, "is_available", lambda: False)
                compute(config(folder, **kw))
            made[key] = folder
        return made[key]
    return get


@pytest.fixture
def computed_copy(computed_run):
    """computed_copy(dest, **kw) -> dest, a copy of computed_run(**kw) this test may change."""
    def copy(dest, **kw):
        shutil.copytree(computed_run(**kw), dest)
        return Path(dest)
    return copy
