"""Placeholder vectors injected into a text encoder's token-embedding output (shared by every backend).

The prompt is tokenized around the placeholder with ``n`` slot positions where it stood; while the
injection is active, a forward hook on the token-embedding layer replaces the embeddings at the slots
with per-row vectors, so the result is differentiable in them. Tokenizer and weights stay untouched,
and the hook is removed on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def inject_vectors(
    embedding: nn.Module, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
) -> Iterator[None]:
    """While active, the embedding layer's output at (rows, cols) is replaced by ``values`` [len, dim]."""

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        idx = (rows.to(out.device), cols.to(out.device))
        return out.index_put(idx, values.to(device=out.device, dtype=out.dtype))

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def slot_columns(starts: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) [B*n] of ``n`` consecutive slots from column ``starts[b]`` in each row b."""
    cols = torch.tensor(starts)[:, None] + torch.arange(n)
    rows = torch.arange(len(starts))[:, None].expand(-1, n)
    return rows.reshape(-1), cols.reshape(-1)
