"""The nearest-neighbour memory's tensors: their names and values (numpy only, no onnx)."""

from __future__ import annotations

import numpy as np

MEMORY_PREFIX = "luncher_memory"
PERSONAL_ROWS = f"{MEMORY_PREFIX}/personal_rows"
PERSONAL_MASK = f"{MEMORY_PREFIX}/personal_mask"
THRESHOLD = f"{MEMORY_PREFIX}/threshold"
STRENGTH = f"{MEMORY_PREFIX}/strength"
MEMORY_TENSORS = (PERSONAL_ROWS, PERSONAL_MASK, THRESHOLD, STRENGTH)
# Cosine similarity from which a photo counts as one the user taught (the same photo gives
# 1 up to float rounding; an augmented view of it, about 0.9): see heads.add_memory.
EXACT_MATCH = 0.999


def memory_tensors(rows: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The memory's two tensors: unit-length rows, transposed to (D, M), and the (C, M)
    mask that is 0 where row m counts for class c and -4 (below any similarity) elsewhere."""
    unit, mask = _unit_rows(rows, keep)
    return unit.T.copy(), mask


def _unit_rows(rows: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, D) unit-length rows and the (C, M) mask of memory_tensors."""
    unit = rows.reshape(len(rows), -1).astype(np.float32)  # a copy: normalized below
    unit /= np.maximum(np.sqrt(np.einsum("md,md->m", unit, unit)), 1e-12)[:, None]
    return unit, np.where(keep, 0.0, -4.0).astype(np.float32)


def personal_memory(
    rows: np.ndarray, classes: np.ndarray, num_classes: int, threshold: float, strength: float
) -> dict[str, np.ndarray]:
    """The varying memory tensors for the user's examples (rows and their class indices)."""
    unit, mask = memory_tensors(rows, classes[None, :] == np.arange(num_classes)[:, None])
    return {
        PERSONAL_ROWS: unit,
        PERSONAL_MASK: mask,
        THRESHOLD: np.array(threshold, np.float32),
        STRENGTH: np.array(strength, np.float32),
    }


def memory_bonus(
    x: np.ndarray,
    rows: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    threshold: float,
    strength: float,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    batch: int = 256,
) -> np.ndarray:
    """What the memory that heads.add_memory puts in the graph adds to the logits of the
    head inputs x (N, D), computed with numpy in float32 as ONNX Runtime runs that graph
    (tests/test_personalization.py checks that they agree): (N, num_classes). The memory's
    unit rows are made once, and x is scored `batch` rows at a time."""
    class_ids = np.arange(num_classes)[:, None]
    memory = _unit_rows(rows, classes[None, :] == class_ids)
    others = None
    if replay is not None and len(replay[0]):
        others = _unit_rows(replay[0], replay[1][None, :] != class_ids)
    flat = x.reshape(len(x), -1).astype(np.float32)
    parts = [np.zeros((0, num_classes), np.float32)]
    for start in range(0, len(flat), batch):
        chunk = flat[start : start + batch]
        # LpNormalization: a row whose norm is 0 (in float32) stays 0.
        norm = np.sqrt(np.einsum("nd,nd->n", chunk, chunk))[:, None]
        unit = np.divide(chunk, norm, out=np.zeros_like(chunk), where=norm > 0)
        best = _best_per_class(unit, *memory)
        floor = np.float32(threshold)
        if others is not None:
            floor = np.maximum(_best_per_class(unit, *others), floor)
        exact = np.maximum(best - np.float32(EXACT_MATCH), 0) * np.float32(1 / (1 - EXACT_MATCH))
        parts.append((np.maximum(best - floor, 0) + exact) * np.float32(strength))
    return np.concatenate(parts)


def _best_per_class(unit: np.ndarray, memory: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, C): each photo's highest similarity to a memory row that counts for class c."""
    similarity = unit @ memory.T  # (N, M)
    return (similarity[:, None, :] + mask[None]).max(axis=2)  # type: ignore[no-any-return]
