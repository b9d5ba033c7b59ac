"""The campaign's recognizability judge (experiments/training/recognizable.py) against what it must tell apart."""

import os
import sys
from pathlib import Path

import pytest
import torch

from edtool.paths import REPO_ROOT

REPO = REPO_ROOT
sys.path.insert(0, str(REPO / "experiments" / "training"))
import recognizable  # noqa: E402


def test_patch_shuffle_keeps_every_tile_and_moves_them():
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 1, 32, 32)
    y = recognizable.patch_shuffled(x, torch.Generator().manual_seed(0))
    tiles = lambda z: z.unfold(2, 8, 8).unfold(3, 8, 8).reshape(3, 16, 64)  # noqa: E731
    assert torch.equal(tiles(y).sort(1).values, tiles(x).sort(1).values)  # the same 16 tiles per image
    assert not torch.equal(y, x)


def test_collage_is_made_of_crops_of_the_batch():
    x = torch.full((4, 1, 32, 32), -1.0)
    x[:, :, 10:20, 10:20] = 1.0
    y = recognizable.collage(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and set(y.unique().tolist()) <= {-1.0, 1.0}


def test_the_judge_passes_real_digits_and_fails_noise_and_shuffled_digits():
    shared = Path(os.environ.get("EDTOOL_SHARED", REPO.parent / "shared"))
    if not (shared / "data" / "mnist" / "MNIST" / "raw").exists():
        pytest.skip(f"real MNIST not found in {shared}/data/mnist (set EDTOOL_SHARED to the shared folder)")
    from edtool.data import load_dataset

    x = load_dataset("mnist", root=shared / "data" / "mnist", split="test", download=False)[0][-500:]
    g = torch.Generator().manual_seed(1)
    assert recognizable.recognizable(x) > 0.95
    assert recognizable.recognizable(torch.randn(200, 1, 32, 32, generator=g)) < 0.05
    assert recognizable.recognizable(recognizable.patch_shuffled(x, g)) < 0.1
