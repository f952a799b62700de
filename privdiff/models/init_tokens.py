"""Which token embeddings initialise a placeholder's vectors (shared by every backend)."""

from __future__ import annotations

from privdiff.errors import PrivdiffError


def pick_init_ids(word: str, ids: list[int], n_vectors: int, special_ids: set[int] = frozenset()) -> list[int]:
    """The word's token ids repeated or subsampled to ``n_vectors`` (A1111's rule: vector i takes
    token i*len//n). An empty word or one made of special tokens raises PrivdiffError."""
    if n_vectors < 1:
        raise PrivdiffError(f"number of vectors must be at least 1, got {n_vectors}")
    if not ids or set(ids) & set(special_ids):
        raise PrivdiffError(f"initialisation word {word!r} is empty or not in the vocabulary")
    return [ids[i * len(ids) // n_vectors] for i in range(n_vectors)]
