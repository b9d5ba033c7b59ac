"""How edtool talks on a terminal: errors and warnings as one line each (exit code 2 for what the user can
fix, never a traceback unless --debug), progress displays, and the tables the commands print. The commands
themselves, and their settings, are in edtool.cli and edtool.config."""

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List

import typer

from edtool.errors import EdtoolError, disk_error_line
from edtool.text import paragraph


def progress_bar(quiet: bool = False):
    """A rich progress display on a terminal; None (plain log lines) otherwise."""
    if quiet or not sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


def reporter(quiet: bool, as_json: bool):
    """The progress reporter of a compute: JSON lines, nothing, a rich display on a terminal, or log lines."""
    from edtool.study.progress import JsonReporter, PlainReporter, QuietReporter, RichReporter

    if as_json:
        return JsonReporter()
    if quiet:
        return QuietReporter()
    return RichReporter() if sys.stdout.isatty() else PlainReporter()


def run_compute(cfg, quiet: bool = False, as_json: bool = False) -> dict:
    """compute() with a progress display and a clean message on Ctrl-C."""
    from edtool.study.compute import compute

    shown = reporter(quiet, as_json)
    try:
        with (shown if hasattr(shown, "__enter__") else nullcontext()):
            summary = compute(cfg, shown)
    except KeyboardInterrupt:
        print("edtool: interrupted; finished cells are saved. Run the same command again to resume.",
              file=sys.stderr)
        sys.exit(130)
    return summary


def print_results_table(location: str, as_json: bool = False):
    """Final table: per model, mean ED and mean asym over the finished cells."""
    import numpy as np

    from edtool.store.run import open_run

    run = open_run(location)
    done = run.done_mask()
    rows = []
    for m, name in enumerate(run.models):
        ed, asym = run.read("ed_fro", m)[done[:, m]], run.read("asym", m)[done[:, m]]
        finite = np.isfinite(ed)
        rows.append({"model": name, "realizations": int(done[:, m].sum()),
                     "mean_ed_fro": float(np.nanmean(ed)) if finite.any() else None,
                     "mean_asym": float(np.nanmean(asym)) if np.isfinite(asym).any() else None,
                     "failed_steps": int((~finite).sum())})
    if as_json:
        return rows
    from rich.console import Console
    from rich.table import Table

    from edtool.study.aggregate import format_number as fmt

    table = Table(title=f"run {location}")
    for col in ("model", "realizations", "mean ||J-J^T||_F", "mean asym", "failed steps"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(r["model"], str(r["realizations"]), fmt(r["mean_ed_fro"]), fmt(r["mean_asym"]),
                      str(r["failed_steps"]))
    Console().print(table)
    return rows


def print_aggregate(summary: dict, location: str) -> None:
    """What `edtool aggregate` prints: per model mean ed_fro (of the score), its spread and mean asym, then NAsym both ways."""
    from edtool.study.aggregate import format_number as fmt

    used = summary.get("realizations_used", "?")
    print(f"aggregated {used} of {summary.get('realizations_total', '?')} realizations of {location}")
    for name in summary["models"]:
        s = summary[name]
        print(f"  {name:<14} mean ed_fro {fmt(s['mean_ed_fro'])}  std {fmt(s['std_ed_fro'])}  "
              f"mean asym {fmt(s['mean_asym'])}  (n={s['num_used']}"
              + (f"; {s['num_failed']} of {s['num_realizations']} with failed steps)" if s["num_failed"] else ")"))
    points = summary.get("points", {}).get("source", "trajectory")
    where = ("at forward-noised held-out images, QCSBM's protocol: comparable with their Table 2"
             if points == "noised-data" else "along DDIM paths: not QCSBM's protocol (use --points noised-data)")
    print(f"NAsym = ||J-J^T||_F^2 / (4 ||J||_F^2) = asym^2, points {points} ({where}):")
    for name in summary["models"]:
        s = summary[name]
        print(f"  {name:<14} mean of ratios (QCSBM's) {fmt(s['nasym_mean_of_ratios'])}  "
              f"ratio of means {fmt(s['nasym_ratio_of_means'])}")


def print_status(rows: list) -> None:
    """What `edtool status` prints: each run as a block of lines that fit 80 columns, named by its whole
    folder (relative to the working directory when inside it) so that runs are told apart."""
    if not rows:
        from edtool.paths import cache_dir

        print(f"no runs under {cache_dir()}")
        return
    print(f"{len(rows)} run(s); `edtool status RUN --json` gives every field")
    for s in rows:
        print(f"\n{shown_location(s['location'])}")
        lines = [f"state: {s['state']}"]
        if s["models"]:
            lines.append(f"models {', '.join(s['models'])} on {s['dataset']}; {s['nsteps']} steps; "
                         f"estimator {s['estimator']}")
            lines.append(f"cells done {s['done']}/{s['total']}: "
                         + ", ".join(f"{name} {n}/{s['realizations']}" for name, n in s["per_model"].items()))
        lines += s.get("shards", []) + [f"leftover {line}" for line in s.get("leftovers", [])]
        if s.get("legacy"):
            lines.append("made before edtool kept digests (moved chunks, edited attributes, time, seed and label "
                         "are not checked)")
        for line in lines:
            print(paragraph(line, indent=2, hang=4))


def shown_location(location: str) -> str:
    """A run's location as the user can type it: relative to the working directory when inside it."""
    path = Path(location)
    if "://" in location or not path.is_absolute():
        return location
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return location


def print_verify(report: dict, quiet: bool = False) -> bool:
    """What `edtool verify` prints (nothing when quiet): each damage and what to do about it, then one
    line for the run; whether the run is whole."""
    bad = report["damaged"]
    arrays = report["damaged_arrays"] + report["damaged_aggregate"]
    if not quiet:
        for item in report["damaged_arrays"]:
            print(f"damaged: array {item['array']}: {item['reason']}; rerun the `edtool compute` that made the run "
                  "to rewrite it")
        for item in report["damaged_aggregate"]:
            print(f"damaged: {item['array']}: {item['reason']}; rerun `edtool aggregate`")
        for cell in bad:
            print(f"damaged: realization {cell['realization']} {cell['model']}: {cell['reason']}")
        if report["legacy"]:
            print("note: this run was made before edtool kept digests: chunks moved or copied between cells, "
                  "edited attributes and the time, seed and label arrays are not checked (compute it again with "
                  "--overwrite to have them checked)")
        if report["unchecksummed"]:
            print(f"note: {', '.join(report['unchecksummed'])} carry no chunk checksums (a run made before "
                  "edtool checksummed chunks): missing chunks are found, flipped bits are not")
        whole = report["done"] - len(bad)
        print(f"run {report['location']}: {len(bad)} damaged cell(s), {whole} whole of {report['done']} done "
              f"({report['total']} in all)" + ("; rerun the `edtool compute` that made it to recompute them"
                                                if bad else "") + (f"; {len(arrays)} damaged array(s)" if arrays else ""))
    return not (bad or arrays)


_shown: List[str] = []  # what this process has said as `edtool: warning: ...` so far


def show_warning(message, category, filename, lineno, file=None, line=None):
    """A Python warning as one line, `edtool: warning: ...` (no source file and line: that is for
    --debug); remembered so that a run's closing summary does not say it a second time."""
    text = " ".join(str(message).split())
    _shown.append(text)
    try:
        print(f"edtool: warning: {text}", file=file or sys.stderr)
    except OSError:  # like warnings' own: a closed stderr does not turn a warning into an error
        pass


def print_warnings(lines: List[str]) -> None:
    """The failures and warnings of a run, on stderr (even with --quiet: they say a number is not what
    was asked for), each once: those already shown while it ran are not repeated."""
    for text in lines:
        if not any(text in shown for shown in _shown):
            show_warning(text, UserWarning, "", 0)


def usage_error_types() -> tuple:
    """What Typer raises for a bad command line: its own exception base (Typer >= 0.2x vendors a copy of
    click), and click's where an older Typer still runs on click. click itself is not a dependency."""
    types = tuple(t for t in (getattr(typer, "TyperException", None),) if t is not None)
    try:
        import click
    except ImportError:
        return types
    return types + (click.ClickException,)


def usage_line(e: Exception) -> str:
    """One line for a usage error: what is wrong, and where the help is."""
    text = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "edtool"
    return f"edtool: error: {text} (see '{path} --help')"


def run_command_line(app: typer.Typer):
    """Console entry point. Every way a command line can be wrong ends here: help or one line on
    stderr and exit code 2, never a traceback (unless --debug); EdtoolError (bad input found by a
    command) likewise."""
    import warnings

    debug = "--debug" in sys.argv
    _shown.clear()
    try:
        with warnings.catch_warnings():  # restored on return: main() called from Python leaves no trace
            if not debug:
                warnings.showwarning = show_warning
            code = app(standalone_mode=False, prog_name="edtool")  # an Exit (e.g. --help) comes back as its code
    except EdtoolError as e:
        if debug:
            raise
        print(f"edtool: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("edtool: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Abort:
        print("edtool: aborted", file=sys.stderr)
        sys.exit(130)
    except usage_error_types() as e:
        if debug:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `edtool` alone: the help (printed by rich already, or here)
            text = e.format_message()
            if text.strip():
                print(text, file=sys.stderr)
        else:
            print(usage_line(e), file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if debug:
            raise
        line = disk_error_line(e)
        if line:  # disk full, permissions, read-only, not a folder: the user's to fix, one line
            print(f"edtool: error: {line}", file=sys.stderr)
            sys.exit(2)
        print(f"edtool: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback, "
              "and please report it)", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:
            print("edtool: interrupted", file=sys.stderr)
        sys.exit(code)
