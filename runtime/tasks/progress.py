"""Training progress: a rich bar on a terminal, one plain line per epoch otherwise (CI logs, pipes)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

# advance(batches_done_in_epoch) and end_epoch(epoch, loss)
Reporter = tuple[Callable[[], None], Callable[[int, float], None]]


@contextlib.contextmanager
def training_progress(label: str, epochs: int, batches_per_epoch: int, enabled: bool = True) -> Iterator[Reporter]:
    if not enabled:
        yield (lambda: None), (lambda epoch, loss: None)
        return
    if not sys.stderr.isatty():
        def end_plain(epoch: int, loss: float) -> None:
            print(f"  {label}: epoch {epoch}/{epochs} loss {loss:.4f}", file=sys.stderr, flush=True)

        yield (lambda: None), end_plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(f"{label}: epoch 1/{epochs}", total=epochs * batches_per_epoch)

        def end_rich(epoch: int, loss: float) -> None:
            bar.update(task, description=f"{label}: epoch {min(epoch + 1, epochs)}/{epochs} (loss {loss:.4f})")

        yield (lambda: bar.advance(task)), end_rich
