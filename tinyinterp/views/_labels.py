"""Token labels for the views: per-position names from ids and a vocabulary of names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def vocabulary(token_labels: Any) -> Sequence[str] | None:
    """A name per token id: a sequence of strings, a Task (its ``token_labels``) or None."""
    if token_labels is None:
        return None
    if hasattr(token_labels, "token_labels"):
        token_labels = token_labels.token_labels
    if isinstance(token_labels, str) or not isinstance(token_labels, Sequence):
        raise TypeError("token_labels must be a sequence of names indexed by token id (e.g. "
                        f"task.token_labels) or a Task, got {type(token_labels).__name__}")
    return [str(x) for x in token_labels]


def position_labels(tokens: Any, n_batch: int, n_pos: int, token_labels: Any = None,
                    labels: Any = None) -> list[list[str]]:
    """[batch][pos] strings: ``labels`` as given ([batch][pos] or one [pos] row for every
    example), else each token's name from ``token_labels`` (or its id), else "p{pos}"."""
    if labels is not None:
        rows = [list(map(str, r)) for r in labels]
        if rows and not isinstance(labels[0], (list, tuple, np.ndarray)):
            rows = [list(map(str, labels))]
        if len(rows) == 1 and n_batch > 1:
            rows = rows * n_batch
        if len(rows) != n_batch or any(len(r) != n_pos for r in rows):
            raise ValueError(f"labels must be [batch={n_batch}][pos={n_pos}] strings (or one "
                             f"[pos={n_pos}] row), got {len(rows)} rows of lengths "
                             f"{sorted({len(r) for r in rows})}")
        return rows
    if tokens is None:
        return [[f"p{i}" for i in range(n_pos)] for _ in range(n_batch)]
    t = np.asarray(tokens)
    if t.ndim == 1:
        t = t[None]
    if t.shape != (n_batch, n_pos):
        raise ValueError(f"tokens {t.shape} must be [batch={n_batch}, pos={n_pos}]")
    vocab = vocabulary(token_labels)
    if vocab is None:
        return [[str(int(x)) for x in row] for row in t]
    if t.size and (t.min() < 0 or t.max() >= len(vocab)):
        raise ValueError(f"token ids {int(t.min())}..{int(t.max())} do not all have a name: "
                         f"token_labels names ids 0..{len(vocab) - 1}")
    return [[vocab[int(x)] for x in row] for row in t]
