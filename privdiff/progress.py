"""Progress reporting, used by every layer: the ``Progress`` callback type and, for the command line, a tqdm bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each unit of work (a step, a UNet pass); may raise to cancel."""


@contextmanager
def tqdm_progress(description: str) -> Iterator[Progress]:
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
