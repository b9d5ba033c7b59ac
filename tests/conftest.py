"""Shared test setup: every test gets its own cache and checkpoint folders."""

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's cache/ (prepared data is shared across tests)."""
    shared = tmp_path_factory.getbasetemp() / "edtool-cache"
    monkeypatch.setenv("EDTOOL_CACHE", str(shared))
    yield
