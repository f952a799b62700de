"""Fixed-shape batches, so a record's result does not depend on which other records were sampled.

Kernels pick their algorithm (blocking, summation order) by tensor shape: the same image trained, encoded or
embedded in a batch of 2 and in a batch of 1 differs by ~1e-6 relative in float32. If per-record results moved
with the batch's size, adding or removing one record would move every other record's row as well, beyond the
sensitivity C the noise covers. So every batch of per-record work has exactly the public ``batch_size`` rows, the
last one padded with a fixed public dummy (zeros) whose results are dropped. Within one shape, rows are computed
independently of the other rows' values and positions by the kernels privdiff's models use (the tests check it
bit for bit on CPU); this is a property of those kernels, checked, not proven.
"""

from __future__ import annotations

import torch


def padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` followed by zero rows up to ``size`` rows (``rows`` itself when it has that many)."""
    missing = size - rows.shape[0]
    if missing <= 0:
        return rows
    return torch.cat([rows, rows.new_zeros(missing, *rows.shape[1:])])


def dummy_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """The public random stream of a dummy row: a fixed seed, the same in every run."""
    return torch.Generator(device=device).manual_seed(0)
