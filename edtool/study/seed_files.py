"""The seed tool's numeric files, exported from a run store (which stays the source of truth), so
scripts written for the seed tool's output keep working:

- `ed_analysis_single.pt`: {model: {timesteps, ed_magnitudes}}, the realization the single figure shows
- `ed_analysis_aggregated.pt`: {model: {timesteps, ed_magnitudes_mean, ed_magnitudes_std (ddof 0),
  ed_magnitudes_all (realizations x steps), num_realizations}}, when two or more realizations are done

Under the seed's keys, the seed's quantities: `timesteps` the integers i = N, ..., 1 of the steps (at
t = i/N), and the ED of the field the seed measured (aggregate.seed_factor): the network's eps,
sqrt(beta(t)) x ed_fro, or the ELS-type machine's score, ed_fro itself. Under keys of edtool's own:
`t` (the times), `ed_fro` / `ed_fro_all` (the score's ED), `factor` (ed_magnitudes / ed_fro), `field`
("eps" or "score") and `definition`. The single file's `timesteps` and `ed_magnitudes` are Python lists,
as the seed's; everything else is a float64 tensor, an int or a string, so `torch.load(path,
weights_only=True)` reads them. Failed steps stay NaN; the mean and std leave them out, and
`ed_magnitudes_n` counts the values each step's statistics use.
"""

from pathlib import Path

import numpy as np
import torch

from edtool.errors import EdtoolError
from edtool.fileio import atomic_path, record_written, refuse_folders, refuse_foreign, written_by_edtool
from edtool.study.aggregate import seed_factor, seed_field, seed_step_stats
from edtool.study.plots import first_realization
from edtool.store.location import local_dir
from edtool.store.locks import access_lock
from edtool.store.run import open_finished, open_run

SINGLE, AGGREGATED = "ed_analysis_single.pt", "ed_analysis_aggregated.pt"
TIMESTEPS = "timesteps i = N, ..., 1 number the steps, measured at t = i/N (t holds the times); "
DEFINITIONS = {
    "eps": TIMESTEPS + "ed_magnitudes = ||J - J^T||_F (Frobenius, not normalised) with J the Jacobian of the "
                       "network's noise prediction eps_hat, as the seed tool measured it: sqrt(beta(t)) times ed_fro, "
                       "the same norm for the score s = -eps_hat / sqrt(beta(t)) (factor = sqrt(beta(t)))",
    "score": TIMESTEPS + "ed_magnitudes = ||J - J^T||_F (Frobenius, not normalised) with J the Jacobian of the "
                         "machine's score s, as the seed tool measured it: equal to ed_fro (factor = 1)",
}


def check_seed_files_folder(out_dir, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse (EdtoolError) when `out_dir` holds a folder of a seed-file name (never removed, --overwrite or
    not), or a file of such a name that edtool did not write there (the seed tool's own output) unless
    `overwrite`. `flag` is the option that names the folder, for the message."""
    paths = [Path(out_dir) / name for name in (SINGLE, AGGREGATED)]
    refuse_folders(paths, flag)
    if not overwrite:
        refuse_foreign(paths, "pass --overwrite to replace it, or write the results to another folder")


def seed_results(run) -> dict:
    """{file name: dict to save} for a run (a location or an open RunStore); nothing is written."""
    run = open_finished(run, "export")
    done = run.done_mask()
    n = run.nsteps
    r = first_realization(done)
    ed_fro = run.read("ed_fro", realizations=[r])[0].astype(np.float64)  # (model, step)
    files = {SINGLE: {name: {"timesteps": list(range(n, 0, -1)),
                             "ed_magnitudes": (ed_fro[m] * seed_factor(run, name)).tolist(),
                             **_own(run, name), "ed_fro": torch.from_numpy(ed_fro[m].copy()),
                             "realization": r, "seed": int(run.seeds[r])}
                      for m, name in enumerate(run.models) if done[r, m]}}
    if done.sum(axis=0).max() >= 2:
        files[AGGREGATED] = {name: _aggregated(run, m, done) for m, name in enumerate(run.models) if done[:, m].any()}
    return files


def _own(run, name: str) -> dict:
    """edtool's own keys of a model's entry: the times, the factor from ed_fro to the seed's ED, the field."""
    field = seed_field(name)
    return {"t": torch.from_numpy(run.time.astype(np.float64)), "factor": torch.from_numpy(seed_factor(run, name)),
            "field": field, "definition": DEFINITIONS[field]}


def _aggregated(run, m: int, done: np.ndarray) -> dict:
    """The seed tool's statistics over realizations (rows) of model m's ED; NaN steps left out."""
    name = run.models[m]
    ed_fro = run.read("ed_fro", model=m)[done[:, m]].astype(np.float64)
    values = ed_fro * seed_factor(run, name)
    mean, std = seed_step_stats(values)
    return {"timesteps": list(range(run.nsteps, 0, -1)), "ed_magnitudes_mean": torch.from_numpy(mean),
            "ed_magnitudes_std": torch.from_numpy(std), "ed_magnitudes_all": torch.from_numpy(values),
            "num_realizations": len(values), "ed_magnitudes_n": torch.from_numpy(np.isfinite(values).sum(axis=0)),
            **_own(run, name), "ed_fro_all": torch.from_numpy(ed_fro)}


def export_seed_files(location, out_dir=None, overwrite: bool = False, flag: str = "--out") -> list:
    """Write the seed tool's .pt files for the run at `location` (into its folder unless `out_dir`)
    and return their paths. Each is written whole (temp + rename) and recorded in the folder's
    ledger; a file of those names that edtool did not write is refused unless `overwrite`. A seed
    file edtool wrote there before that this run does not make (the aggregated one of a run redone
    with one realization) is removed, after the new ones are in place; one it did not write is kept."""
    with access_lock(location):  # shared: no aggregate rewrites, no --overwrite deletes the run meanwhile
        run = open_run(location)
        if out_dir is None:
            out_dir = local_dir(run.location)
            if out_dir is None:
                raise EdtoolError(f"run {run.location} is not on a local disk: give an output directory")
        out_dir = Path(out_dir)
        check_seed_files_folder(out_dir, overwrite, flag)
        files = seed_results(run)
        stale = [out_dir / name for name in (SINGLE, AGGREGATED) if name not in files]
        stale = [path for path in stale if written_by_edtool(path)]
        paths = []
        for name, content in files.items():
            path = out_dir / name
            with atomic_path(path) as tmp:
                torch.save(content, tmp)
            record_written([path])
            paths.append(path)
        for path in stale:
            path.unlink(missing_ok=True)
    return paths
