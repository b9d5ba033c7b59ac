"""Reporters for `compute`: a rich live display on a terminal, plain log lines otherwise."""

import json
import math
import sys

from edtool.study.compute import Reporter


class PlainReporter(Reporter):
    """One line per finished cell (and notes), for logs and non-terminals."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.total = self.done = 0

    def _print(self, text):
        print(text, file=self.stream, flush=True)

    def start(self, total_cells, done_cells, models, steps=None):
        self.total, self.done = total_cells, done_cells
        if done_cells:
            self._print(f"resuming: {done_cells}/{total_cells} cells already done")
        self._print(f"computing {total_cells - done_cells} cells ({', '.join(models)})")

    def cell_done(self, r, model, asym_mean, failed):
        self.done += 1
        status = "FAILED (NaN stored)" if failed else f"mean asym {asym_mean:.4f}"
        self._print(f"[{self.done}/{self.total}] realization {r} {model}: {status}")

    def note(self, message):
        self._print(f"note: {message}")


class JsonReporter(PlainReporter):
    """Machine-readable: one JSON object per event on stdout."""

    def _emit(self, **event):
        self._print(json.dumps(event))

    def start(self, total_cells, done_cells, models, steps=None):
        self.total, self.done = total_cells, done_cells
        self._emit(event="start", total_cells=total_cells, done_cells=done_cells, models=models)

    def cell_done(self, r, model, asym_mean, failed):
        self.done += 1
        self._emit(event="cell", realization=r, model=model, mean_asym=None if math.isnan(asym_mean) else asym_mean,
                   failed=failed, done=self.done, total=self.total)

    def note(self, message):
        self._emit(event="note", message=message)


class QuietReporter(Reporter):
    pass


class RichReporter(Reporter):
    """Overall bar over cells plus one bar per model (steps, rate, ETA, latest asym)."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console or Console()
        self.progress = Progress(TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console)
        self.tasks = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, total_cells, done_cells, models, steps=None):
        """One overall bar over cells; one bar per model over the steps it still has to measure."""
        self.overall = self.progress.add_task("all cells", total=total_cells, completed=done_cells, info="")
        for name in models:
            if steps is None or steps.get(name):
                self.tasks[name] = self.progress.add_task(name, total=None if steps is None else steps[name],
                                                          info="waiting", start=False)

    def step(self, r, model, j, nsteps, asym):
        if model not in self.tasks:
            self.tasks[model] = self.progress.add_task(model, total=None, info="")
        self.progress.start_task(self.tasks[model])  # the clock (rate, ETA) runs from the model's first step
        self.progress.update(self.tasks[model], advance=1, info=f"r={r} step {j + 1}/{nsteps} asym {asym:.4f}")

    def cell_done(self, r, model, asym_mean, failed):
        self.progress.update(self.overall, advance=1,
                             info=f"last: {model} r={r} " + ("[red]FAILED[/red]" if failed else f"asym {asym_mean:.4f}"))

    def note(self, message):
        self.console.print(f"[yellow]note:[/yellow] {message}")
