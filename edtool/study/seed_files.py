"""The seed tool's numeric files, exported from a run store (which stays the source of truth), so
scripts written for the seed tool's output keep working:

- `ed_analysis_single.pt`: {model: {timesteps, ed_magnitudes}}, the realization the single figure shows
- `ed_analysis_aggregated.pt`: {model: {timesteps, ed_magnitudes_mean, ed_magnitudes_std (ddof 0),
  ed_magnitudes_all (realizations x steps), num_realizations}}, when two or more realizations are done

Values are plain tensors (float64), ints and strings: `torch.load(path, weights_only=True)` reads them.
Each model's entry also names its field: edtool's ED is of the score, the seed tool's of the network's
eps output (`field`, `definition`). Failed steps stay NaN; the mean and std leave them out, and
`ed_magnitudes_n` counts the values each step's statistics use.
"""

import warnings
from pathlib import Path

import numpy as np
import torch

from edtool.errors import EdtoolError
from edtool.fileio import atomic_path, record_written, refuse_foreign
from edtool.study.plots import first_realization
from edtool.store.location import local_dir
from edtool.store.locks import access_lock
from edtool.store.run import open_finished, open_run

SINGLE, AGGREGATED = "ed_analysis_single.pt", "ed_analysis_aggregated.pt"
FIELD = "score"
DEFINITION = ("ed_magnitudes = ||J - J^T||_F with J the Jacobian of the score s = -eps / sqrt(beta(t)) at each "
              "step; the seed tool's is of the network's eps output, sqrt(beta(t)) times this")


def check_seed_files_folder(out_dir, overwrite: bool = False) -> None:
    """Refuse (EdtoolError) when `out_dir` holds a seed-file name edtool did not write there
    (the seed tool's own output), unless `overwrite`."""
    if not overwrite:
        refuse_foreign([Path(out_dir) / name for name in (SINGLE, AGGREGATED)],
                       "pass --overwrite to replace it, or write the results to another folder")


def seed_results(run) -> dict:
    """{file name: dict to save} for a run (a location or an open RunStore); nothing is written."""
    run = open_finished(run, "export")
    done = run.done_mask()
    timesteps = torch.from_numpy(run.time.astype(np.float64))
    about = {"field": FIELD, "definition": DEFINITION}
    r = first_realization(done)
    ed = run.read("ed_fro", realizations=[r])[0].astype(np.float64)  # (model, step)
    files = {SINGLE: {name: {"timesteps": timesteps.clone(), "ed_magnitudes": torch.from_numpy(ed[m].copy()),
                             "realization": r, "seed": int(run.seeds[r]), **about}
                      for m, name in enumerate(run.models) if done[r, m]}}
    if done.sum(axis=0).max() >= 2:
        files[AGGREGATED] = {name: _aggregated(run.read("ed_fro", model=m)[done[:, m]], timesteps, about)
                             for m, name in enumerate(run.models) if done[:, m].any()}
    return files


def _aggregated(values: np.ndarray, timesteps: torch.Tensor, about: dict) -> dict:
    """The seed tool's statistics over realizations (rows) of one model's ED; NaN steps left out."""
    values = values.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step that failed in every realization: NaN
        mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0, ddof=0)
    return {"timesteps": timesteps.clone(), "ed_magnitudes_mean": torch.from_numpy(mean),
            "ed_magnitudes_std": torch.from_numpy(std), "ed_magnitudes_all": torch.from_numpy(values),
            "ed_magnitudes_n": torch.from_numpy(np.isfinite(values).sum(axis=0)),
            "num_realizations": len(values), **about}


def export_seed_files(location, out_dir=None, overwrite: bool = False) -> list:
    """Write the seed tool's .pt files for the run at `location` (into its folder unless `out_dir`)
    and return their paths. Each is written whole (temp + rename) and recorded in the folder's
    ledger; a file of those names that edtool did not write is refused unless `overwrite`."""
    with access_lock(location):  # shared: no aggregate rewrites, no --overwrite deletes the run meanwhile
        run = open_run(location)
        if out_dir is None:
            out_dir = local_dir(run.location)
            if out_dir is None:
                raise EdtoolError(f"run {run.location} is not on a local disk: give an output directory")
        out_dir = Path(out_dir)
        check_seed_files_folder(out_dir, overwrite)
        paths = []
        for name, content in seed_results(run).items():
            path = out_dir / name
            with atomic_path(path) as tmp:
                torch.save(content, tmp)
            record_written([path])
            paths.append(path)
    return paths
