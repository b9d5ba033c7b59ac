"""`edtool compute`: trajectories for realizations x models, measured at every step, streamed
into the run store (SPEC 7, 8). Resumable: only cells whose `done` flag is unset are computed.

    cfg = ComputeConfig(models=["unet", "els"], realizations=4, nsteps=20)
    summary = compute(cfg)          # -> dict with the run location, timings, failures

Measuring a cell and the run loop live here; the settings (ComputeConfig) in edtool.config, loading in
edtool.study.prepare, the process group of torchrun in edtool.study.distributed.
"""

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from edtool.config import MACHINE_NAMES, ComputeConfig
from edtool.device import cuda_numerics, platform_note, resolve_device
from edtool.diffusion import TimeGrid, ddim_sample, initial_noises, score_to_eps
from edtool.errors import EdtoolError
from edtool.memory import MEMORY_ENV, is_out_of_memory, memory_budget
from edtool.store.layout import ALIGN_ARRAYS, LOCALITY_ARRAYS, STEP_ARRAYS
from edtool.store.location import run_location
from edtool.study.distributed import barrier, distributed_shard, leave
from edtool.study.prepare import PreparedRun, default_run_name, extra_array_dims, prepare

RTOL_MAX_PROBES = 1024  # --rtol adds probes up to this many per point


class Reporter:
    """Progress callbacks; the CLI supplies a rich or plain-text one. The default is silent."""

    def start(self, total_cells: int, done_cells: int, models: List[str], steps: Optional[dict] = None): ...
    def step(self, r: int, model: str, j: int, nsteps: int, asym: float): ...
    def cell_done(self, r: int, model: str, asym_mean: float, failed: bool): ...
    def note(self, message: str): ...


def probe_seed(run_seed: int, realization: int, model: str, step: int) -> int:
    """Seed of the Hutchinson probes for one (realization, model, step): stable across reruns and ranks."""
    digest = hashlib.sha256(f"{run_seed}/{realization}/{model}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------ measuring


def _eps_fn(model, label):
    return lambda t, x: model.eps(t, x, label)


class _Timer:
    """Accumulates wall time per phase (sampling, jacobian, store)."""

    def __init__(self):
        self.seconds = {"sampling": 0.0, "jacobian": 0.0, "store": 0.0}

    def add(self, phase, since):
        self.seconds[phase] += time.perf_counter() - since


@dataclass
class Measurements:
    """One model's measurements for a batch of B realizations along nsteps steps, as the store takes them."""

    ed_fro: np.ndarray  # (B, nsteps) ||J - J^T||_F
    jac_fro: np.ndarray  # (B, nsteps) ||J||_F
    asym: np.ndarray  # (B, nsteps) ed_fro / (2 jac_fro)
    ed_stderr: np.ndarray  # (B, nsteps) standard error of ed_fro (0 when exact)
    final: Optional[np.ndarray]  # (B, C, H, W) the path's end at t = 0 (None on a shared path until set)
    curl_map: Optional[np.ndarray] = None  # (B, nsteps, H, W) with --maps
    points: list = field(default_factory=list)  # x at every step: what a shared trajectory reuses
    extra: dict = field(default_factory=dict)  # the run's extra arrays (extra_array_dims) by store name: (B, ...)
    notes: set = field(default_factory=set)  # one-line notes for the reporter, once per cell

    @classmethod
    def nan(cls, B: int, prepared: "PreparedRun") -> "Measurements":
        """Every number NaN: a step that is never measured stays NaN (and a failed path has no points)."""
        n, (c, h, w) = prepared.cfg.nsteps, prepared.image_shape
        radii = (prepared.config.get("locality") or {}).get("radius", -1) + 1
        sizes = {"step": n, "radius": radii, "channel": c, "y": h, "x": w}
        extra = {name: np.full((B, *(sizes[d] for d in dims)), np.nan)
                 for name, dims in extra_array_dims(prepared.config).items()}
        return cls(*(np.full((B, n), np.nan) for _ in range(4)), final=np.full((B, c, h, w), np.nan),
                   curl_map=np.full((B, n, h, w), np.nan) if prepared.cfg.maps else None, extra=extra)


@dataclass
class RealizationBatch:
    """Realizations computed together: their row numbers, initial noises (B, C, H, W) and labels."""

    rows: List[int]
    x_T: torch.Tensor
    label: Optional[torch.Tensor]


@dataclass
class _ComputeJob:
    """One compute() call, what all its batches share: the prepared run, the open store, progress, timings,
    failures."""

    prepared: PreparedRun
    run: object  # edtool.store.run.RunStore
    reporter: Reporter
    timer: _Timer = field(default_factory=_Timer)
    failures: list = field(default_factory=list)
    reference_ops: dict = field(default_factory=dict)  # --align: the reference's Jacobian per step of this batch


def measure(job: _ComputeJob, name: str, batch: RealizationBatch,
            points: Optional[List[torch.Tensor]] = None) -> Measurements:
    """Run one model's DDIM path from batch.x_T (or visit the given shared points), measuring every step.

    At each step the Jacobian comes first: a model with a closed form (the ELS machines) gives it with the
    score from the same sums, and the DDIM step takes that score (on_step returns it) instead of a second
    evaluation. The estimator and --locality/--align share the one Jacobian operator."""
    cfg, nsteps, model = job.prepared.cfg, job.prepared.cfg.nsteps, job.prepared.models[name]
    times = job.prepared.grid.times.tolist()
    B, label, rows = batch.x_T.shape[0], batch.label, batch.rows
    out = Measurements.nan(B, job.prepared)
    method = job.prepared.config["models"][name]["estimator"]  # `auto` resolved once, as the config records it

    def on_step(j, t, x):
        out.points.append(x.detach())
        if "point" in out.extra:  # --save-points: where step j was measured
            out.extra["point"][:, j] = x.detach().double().cpu().numpy()
        t0 = time.perf_counter()
        tb = torch.full((B,), t, dtype=torch.float64, device=x.device)  # the grid's t: networks cast it
        f = model.field(tb, label)
        # the operator is built when something takes it: the closed form for the ED, or --locality/--align
        op = _jacobian_op(job, name, f, x, j) if cfg.locality or cfg.align or method == "analytic" else None
        seeds = [probe_seed(cfg.seed, r, name, j) for r in rows]
        res = _exterior_derivative(job, name, f, x, method, seeds, op, out)
        for k in STEP_ARRAYS:
            getattr(out, k)[:, j] = getattr(res, k).detach().double().cpu().numpy()
        if res.rtol_met is not None:  # the probe cap came before the --rtol target: say so at the end
            job.prepared.rtol_missed += [(r, name, j, float(out.ed_stderr[i, j] / out.ed_fro[i, j]))
                                          for i, r in enumerate(rows) if not bool(res.rtol_met[i])]
        if cfg.maps:
            out.curl_map[:, j] = res.curl_map.detach().double().cpu().numpy()
        if op is not None:
            _measure_locality_alignment(job, name, op, tb, batch, x, j, out)
        job.timer.add("jacobian", t0)
        for i, r in enumerate(rows):
            job.reporter.step(r, name, j, nsteps, float(out.asym[i, j]))
        if op is not None and op.score is not None:  # the DDIM step's eps from the closed form's score
            return score_to_eps(op.score, tb.to(x.dtype))
        return None

    if points is None:
        eps = _eps_fn(model, label)

        def timed_eps(t, x):
            t0 = time.perf_counter()
            e = eps(t, x)
            job.timer.add("sampling", t0)
            return e

        final = ddim_sample(timed_eps, batch.x_T, times, on_step=on_step)
        out.final = final.detach().double().cpu().numpy()
    else:
        for j, x in enumerate(points):
            on_step(j, times[j], x)
        out.final = None
    for note in sorted(out.notes):
        job.reporter.note(note)
    return out


def _exterior_derivative(job: _ComputeJob, name: str, f, x: torch.Tensor, method: str, seeds: List[int], op,
                         out: Measurements):
    """ED at x by the run's estimator (the closed form from `op` where the settings allow it). When not even
    one row of the exact Jacobian fits in memory at batch 1, Hutchinson measures the step, and the run says so."""
    from edtool.jacobian.ed import ExactMemoryError, exterior_derivative

    cfg = job.prepared.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-finite scores become NaN; reported once per cell by measure
        try:
            return exterior_derivative(f, x, method=method, probes=cfg.probes, seed=seeds, rtol=cfg.rtol,
                                       max_probes=RTOL_MAX_PROBES, curl_map=cfg.maps,
                                       operator=op if cfg.estimator in ("auto", "analytic") else None)
        except ExactMemoryError:
            if x.shape[0] > 1:
                raise  # the per-cell guard lowers the batch
            res = exterior_derivative(f, x, method="hutchinson", probes=cfg.probes, seed=seeds, rtol=cfg.rtol,
                                      max_probes=RTOL_MAX_PROBES, curl_map=cfg.maps)
            _note_in_store(job, out, f"{name}: not even one row of the exact Jacobian fits in memory "
                           f"({MEMORY_ENV} raises the budget), so Hutchinson with {res.probes} probes measured "
                           "the steps where it did not (their ed_stderr is not 0)")
            return res


def _circular(model) -> bool:
    """Whether distances wrap around: the model's padding (its manifest) is circular."""
    return model.manifest["padding"] == "circular"


def _jacobian_op(job: _ComputeJob, name: str, f, x: torch.Tensor, j: int):
    """The Jacobian operator of model `name` at step j's point x. The --align reference's is kept for the
    batch: every model visits the same points, so it is built once per step, not once per model."""
    from edtool.jacobian.operators import jacobian_operator

    if name == job.prepared.cfg.align and j in job.reference_ops:
        return job.reference_ops[j]
    op = jacobian_operator(f, x, circular=_circular(job.prepared.models[name]))
    if name == job.prepared.cfg.align:
        job.reference_ops[j] = op
    return op


def _measure_locality_alignment(job: _ComputeJob, name: str, op, tb: torch.Tensor, batch: RealizationBatch,
                                x: torch.Tensor, j: int, out: Measurements):
    """SPEC 12 at one step: the locality profile of this model's Jacobian `op` and its alignment with the
    reference's (the dense J of a network is built once for both)."""
    from edtool.jacobian.locality import alignment, locality
    from edtool.jacobian.operators import FieldJacobian

    prepared = job.prepared
    cfg, settings, rows = prepared.cfg, prepared.config, batch.rows
    if cfg.locality:
        loc = settings["locality"]
        res = locality(op, loc["radius"], loc["method"], loc["pixels"],
                       seed=[probe_seed(cfg.seed, r, f"{name}/locality", j) for r in rows])
        for k in LOCALITY_ARRAYS:
            out.extra[k][:, j] = getattr(res, k).detach().double().cpu().numpy()
    if cfg.align:
        ref = cfg.align
        op_ref = _jacobian_op(job, ref, prepared.models[ref].field(tb, batch.label), x, j)
        # exact when both dense Jacobians are at hand: machines, and networks whose J --locality builds
        # exactly (decided by the settings alone, so a resumed run chooses as a fresh one does)
        exact_nets = cfg.locality and settings["locality"]["method"] != "probe"
        at_hand = all(not isinstance(o, FieldJacobian) or (exact_nets and o.dense() is not None)
                      for o in (op, op_ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reason comes back in the result
            al = alignment(op, op_ref, "exact" if at_hand else "hutchinson", cfg.probes,
                           seed=[probe_seed(cfg.seed, r, f"{name}/align", j) for r in rows])
        for k in ALIGN_ARRAYS:
            out.extra[k][:, j] = getattr(al, k).detach().double().cpu().numpy()
        if al.reason is not None:
            out.notes.add(f"{name} vs {cfg.align}: align_ed is NaN where a Jacobian is symmetric (a gradient "
                          "field, like the `is` machine's, has no rotation to align)")


def _note_in_store(job: _ComputeJob, out: Measurements, note: str):
    """A note on how a cell was measured: said once per cell, and kept with the run (`notes` attribute)."""
    if note not in out.notes:
        out.notes.add(note)
        job.run.add_note(note)


class _OutOfMemory(Exception):
    """A batch of several realizations did not fit: compute() retries with a smaller batch."""


def _out_of_memory_error(what: str, err: BaseException) -> EdtoolError:
    """Out of memory with nothing left to halve, as one line for the user."""
    return EdtoolError(f"out of memory while {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                       "lower --batch, measure fewer models at once, or use a device with more memory")


def _measure_safely(job: _ComputeJob, name: str, batch: RealizationBatch, points=None):
    """measure(), but a numeric failure inside one model (RuntimeError, FloatingPointError: out of memory, a
    failed linear solve) becomes NaN for its cells plus a warning: (Measurements, error or None).

    Out of memory with several realizations in the batch is not a failure of the model: it raises
    _OutOfMemory so that the batch is split; with one realization it is recorded as NaN like the rest.
    """
    try:
        return measure(job, name, batch, points), None
    except (RuntimeError, FloatingPointError, MemoryError) as err:  # numeric failures only (incl. out of
        # memory): a ValueError is an input check that came too late, and a user error is never stored as NaN
        if is_out_of_memory(err):
            if batch.x_T.is_cuda:
                torch.cuda.empty_cache()
            if len(batch.rows) > 1:
                raise _OutOfMemory() from err
        message = f"{name} failed on realization(s) {batch.rows}: {type(err).__name__}: {str(err).splitlines()[0]}"
        warnings.warn(message + " -> stored as NaN")
        return Measurements.nan(len(batch.rows), job.prepared), message


# ------------------------------------------------------------------ the stage


def compute(cfg: ComputeConfig, reporter: Optional[Reporter] = None) -> dict:
    """Fill the run store for cfg, resuming where it stopped; returns a summary dict. On CUDA the numbers
    are made under edtool.device.cuda_numerics (no TF32 unless cfg.tf32, deterministic kernels)."""
    cfg.validate()
    memory_budget(torch.device("cpu"))  # a bad EDTOOL_MAX_MEMORY is refused before anything is written
    dist_shard = distributed_shard(cfg)  # (rank, world) under torchrun/srun, else None
    try:
        with cuda_numerics(resolve_device(cfg.device), cfg.tf32):
            return _compute(cfg, reporter or Reporter(), dist_shard)
    finally:
        leave()


def _compute(cfg: ComputeConfig, reporter: Reporter, dist_shard: Optional[tuple]) -> dict:
    from edtool.store.locks import run_lock, shard_realizations

    shard = dist_shard or cfg.shard
    location = run_location(cfg.run_dir, name=cfg.run or default_run_name(cfg))
    prepared = _prepare(cfg, reporter)
    mine = shard_realizations(cfg.realizations, shard)
    # the lock comes first: --overwrite must not delete a run that a live process is filling
    with run_lock(location, shard=shard):
        run = _open_store(cfg, prepared, location, shard, dist_shard)
        changed = platform_note(run.config.get("platform"), prepared.config["platform"])
        if changed:  # a resumed run, or a shard, on another GPU or torch: say what that means for its bits
            reporter.note(changed)
        job = _ComputeJob(prepared, run, reporter)
        started = time.perf_counter()
        pending, redo = _pending_cells(job, mine)
        _compute_rows(job, sorted({r for r, _ in pending}), redo)
    if dist_shard is not None:
        barrier()  # waits as long as the other ranks compute (a resumed rank may have nothing left)
    total = time.perf_counter() - started
    warned = [rtol_warning(prepared.rtol_missed, cfg.rtol)] if prepared.rtol_missed else []
    return {"location": location, "progress": run.progress(), "failures": job.failures, "warnings": warned,
            "timings": {**job.timer.seconds, "total": total}, "notes": prepared.notes, "shard": shard}


def _prepare(cfg: ComputeConfig, reporter: Reporter) -> PreparedRun:
    """prepare(cfg), with out of memory while loading said in one line, its notes passed on, and the ELS
    kernels built or loaded (for machines on the CPU) where their one warning reaches the user, not in a cell."""
    try:
        prepared = prepare(cfg)
    except (RuntimeError, MemoryError) as err:  # a model or the data does not fit on the device
        if not is_out_of_memory(err):
            raise
        raise _out_of_memory_error("loading the models and data", err) from err
    for note in prepared.notes:
        reporter.note(note)
    if prepared.device.type == "cpu" and any(name in MACHINE_NAMES for name in cfg.models):
        from edtool.els.kernel import kernels

        kernels()
    return prepared


def _open_store(cfg: ComputeConfig, prepared: PreparedRun, location: str, shard, dist_shard: Optional[tuple]):
    """The run store at `location`, created or reopened (create_run refuses other settings). Under torchrun
    rank 0 creates it first; the shard this process fills is recorded."""
    from edtool.store.run import create_run
    from edtool.store.status import record_shard

    create = dict(config=prepared.config, models=list(cfg.models), seeds=prepared.seeds, labels=prepared.labels,
                  nsteps=cfg.nsteps, image_shape=prepared.image_shape, maps=cfg.maps,
                  times=prepared.grid.step_times.tolist(),  # the grid this run measures on, recorded as `time`
                  extra_arrays=list(extra_array_dims(prepared.config)),
                  radius=(prepared.config.get("locality") or {}).get("radius"))
    if dist_shard is not None and dist_shard[0] != 0:
        barrier()  # rank 0 creates the store first
        run = create_run(location, **create)
    else:
        try:
            run = create_run(location, overwrite=cfg.overwrite, **create)
        finally:  # on a refusal the other ranks meet it themselves rather than wait forever
            if dist_shard is not None:
                barrier()
    record_shard(location, shard)
    return run


def _pending_cells(job: _ComputeJob, mine: List[int]) -> tuple:
    """(pending cells, cells to redo) among this process's realizations `mine`: unfinished ones, damaged done
    ones (reset, so computed again) and, with --retry-failed, finished ones holding NaN; the reporter is
    told the totals."""
    from edtool.store.runstore import describe_cells

    cfg, run, reporter, names = job.prepared.cfg, job.run, job.reporter, list(job.prepared.cfg.models)
    damaged = run.reset_damaged(mine)  # done cells whose chunks are missing or corrupt: computed again
    if damaged:
        reporter.note(f"recomputing {len(damaged)} damaged cell(s): {describe_cells(run, damaged)}")
    pending = run.pending(mine)
    redo = _failed_cells(run, mine) if cfg.retry_failed else []
    if redo:
        reporter.note(f"retrying {len(redo)} finished cell(s) that hold NaN")
        pending = sorted(set(pending) | set(redo))
    steps = {name: cfg.nsteps * sum(1 for _, m in pending if m == i) for i, name in enumerate(names)}
    reporter.start(len(mine) * len(names), len(mine) * len(names) - len(pending), names, steps)
    return pending, redo


def _compute_rows(job: _ComputeJob, todo: List[int], redo: list):
    """Compute the realizations `todo`, --batch at a time; out of memory halves the batch and retries."""
    device, batch = job.prepared.device, job.prepared.cfg.batch
    while todo:
        rows = todo[:batch]
        try:
            _compute_batch(job, rows, redo)
        except (_OutOfMemory, RuntimeError, MemoryError) as err:  # also outside the per-cell guard: the
            # initial noises, a shared path. Cells finished before it are stored; the rest is retried in halves
            if not isinstance(err, _OutOfMemory) and not is_out_of_memory(err):
                raise
            if len(rows) == 1:
                raise _out_of_memory_error(f"computing realization {rows[0]} on {device}", err) from err
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch = max(1, len(rows) // 2)
            job.reporter.note(f"out of memory with {len(rows)} realizations per batch: lowering --batch to {batch}")
            continue
        todo = todo[len(rows):]


def rtol_warning(missed: list, rtol: float) -> str:
    """One line: how many measured points stopped at the probe cap above the --rtol target, and the worst."""
    r, name, j, worst = max(missed, key=lambda m: m[3])
    return (f"--rtol {rtol} not reached at {len(missed)} (realization, model, step) points (the probe cap of "
            f"{RTOL_MAX_PROBES} came first); worst relative standard error {worst:.3g} ({name}, realization {r}, "
            f"step {j}); each point's is ed_stderr / ed_fro in the store")


def _failed_cells(run, realizations: List[int]) -> list:
    """Finished (r, m) cells with a NaN step among `realizations`: what --retry-failed recomputes."""
    done, ed = run.done_mask(realizations), run.read("ed_fro", realizations=realizations)
    return [(r, m) for i, r in enumerate(realizations) for m in range(len(run.models))
            if done[i, m] and not np.isfinite(ed[i, m]).all()]


def _compute_batch(job: _ComputeJob, rows: List[int], redo=()):
    """All not-yet-done models for a batch of realizations; each cell is written as soon as it is done."""
    prepared, cfg, device = job.prepared, job.prepared.cfg, job.prepared.device
    done = dict(zip(rows, job.run.done_mask(rows)))  # only this batch's rows: cost independent of the run size
    for r, m in redo:
        if r in done:
            done[r][m] = False
    x_T = initial_noises([prepared.seeds[r] for r in rows], prepared.image_shape).to(device)
    lab = [prepared.labels[r] for r in rows]
    batch = RealizationBatch(rows, x_T, None if lab[0] < 0 else torch.tensor(lab, device=device))
    job.reference_ops.clear()  # the reference's Jacobians at the previous batch's points

    names = list(cfg.models)
    points, reference_final = None, None
    if cfg.points == "noised-data":  # the same noised held-out points for every model; final is x_0
        from edtool.study.points import noised_points

        x_0 = prepared.held_out[rows].to(device)
        points, reference_final = noised_points(x_0, x_T, prepared.grid), x_0.double().cpu().numpy()
    elif cfg.trajectory == "shared":
        ref = prepared.config["reference"]
        if all(done[r][names.index(ref)] for r in rows):
            # its cell is done: the path is recomputed, cheaply (no Jacobians)
            points, reference_final = _reference_path(prepared.models[ref], batch, prepared.grid)
        else:
            ref_out, err = _measure_safely(job, ref, batch)
            points, reference_final = ref_out.points, ref_out.final
            _write(job, names.index(ref), ref, batch, ref_out, err)

    for m, name in enumerate(names):
        if all(done[r][m] for r in rows) or (cfg.trajectory == "shared" and name == prepared.config["reference"]):
            continue
        if points is not None and not points:  # the reference path failed
            out, err = Measurements.nan(len(rows), prepared), f"{name}: reference path failed"
        else:
            out, err = _measure_safely(job, name, batch, points)
            if points is not None and err is None:
                out.final = reference_final
        _write(job, m, name, batch, out, err)


def _reference_path(model, batch: RealizationBatch, grid: TimeGrid):
    """The points a model's DDIM path visits and its end (float64 numpy), without measuring anything."""
    visited = []
    final = ddim_sample(_eps_fn(model, batch.label), batch.x_T, grid,
                        on_step=lambda j, t, x: visited.append(x.detach()))
    return visited, final.detach().double().cpu().numpy()


def _write(job: _ComputeJob, m: int, name: str, batch: RealizationBatch, cell: Measurements, err: Optional[str]):
    """Write each realization's cell of model m (data first, done flag last inside write_cell)."""
    t0 = time.perf_counter()
    if err is None and not np.all(np.isfinite(cell.ed_fro)):
        err = f"{name}: non-finite values on realization(s) {batch.rows} -> NaN"
        warnings.warn(err)
    for i, r in enumerate(batch.rows):
        job.run.write_cell(r, m, cell.ed_fro[i], cell.jac_fro[i], cell.asym[i], cell.ed_stderr[i], cell.final[i],
                           None if cell.curl_map is None else cell.curl_map[i],
                           **{k: v[i] for k, v in cell.extra.items()})
        asym = cell.asym[i]
        mean_asym = float(np.nanmean(asym)) if np.isfinite(asym).any() else math.nan
        job.reporter.cell_done(r, name, mean_asym, err is not None)
    if err is not None:
        job.failures.append(err)
    job.timer.add("store", t0)
