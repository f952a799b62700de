"""Progress reporting for the command line: a tqdm bar fed by ``progress(done, total)`` calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def tqdm_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback drawing a bar (steps, rate, ETA) on stderr."""
    with tqdm(desc=description, unit="step", dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(done - bar.n)

        yield progress
