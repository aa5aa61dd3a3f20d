"""Progress of a tuning run: a rich bar (trials done, time left) and TVM's native output kept in a file.

The gradient task scheduler submits every task's first batch before it joins any
results, so measure callbacks fire in bursts at the end (seen: 0 of 8 trials for 85 s,
then 8 within 15 s). Builds happen batch by batch as the scheduler goes, so the bar
advances on candidates built, and the trial count reported is the measured one.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


class TrialProgress:
    """Counts built and measured candidates; shows a bar when enabled and stderr is a terminal."""

    def __init__(self, total: int, enabled: bool, description: str):
        self.total = max(1, total)
        self.built = 0
        self.done = 0  # measured trials
        self.description = description
        self._progress = None
        self._task = None
        self._stream = None
        if enabled and sys.stderr is not None and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            # A duplicate of the terminal's stderr: fd 2 itself goes to a log file while tuning.
            self._stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                console=Console(file=self._stream, force_terminal=True))

    def __enter__(self) -> "TrialProgress":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._stream.close()

    def phase(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.description}: {text}")

    def add_built(self, count: int) -> None:
        self.built += count
        if self._progress is not None:
            self._progress.update(self._task, completed=min(self.built, self.total))

    def add_measured(self, count: int) -> None:
        self.done += count

    def callback(self):
        """A MetaSchedule MeasureCallback counting measured trials."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        counter = self

        @derived_object
        class _CountTrials(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                counter.add_measured(len(measure_candidates))

        return _CountTrials()

    def builder(self, inner):
        """`inner` (a MetaSchedule Builder) reporting each built batch to this counter."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.builder import PyBuilder

        counter = self

        @derived_object
        class _CountingBuilder(PyBuilder):
            def build(self, build_inputs):
                results = inner.build(build_inputs)
                counter.add_built(len(results))
                return results

        return _CountingBuilder()


@contextlib.contextmanager
def native_stderr_to(path: str) -> Iterator[None]:
    """Send fd 2 (TVM's C++ warnings, builder/runner workers' output) to `path` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
