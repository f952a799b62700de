"""Progress reporting for the command line: a tqdm bar fed by ``progress(done, total)`` calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def tqdm_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback drawing a bar (steps, rate, ETA) on stderr from its first call on, so a run
    refused before any work prints its one-line error alone."""
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(desc=description, unit="step", dynamic_ncols=True, total=total)
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
