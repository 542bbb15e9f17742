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
    unit = rows.reshape(len(rows), -1).astype(np.float32)  # a copy: normalized below
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    mask = np.where(keep, 0.0, -4.0).astype(np.float32)
    return unit.T.copy(), mask


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
) -> np.ndarray:
    """What the memory that heads.add_memory puts in the graph adds to the logits of the
    head inputs x (N, D), computed with numpy in float32 as ONNX Runtime runs that graph
    (tests/test_personalization.py checks that they agree): (N, num_classes)."""
    flat = x.reshape(len(x), -1).astype(np.float32)
    # LpNormalization: a row whose norm is 0 (in float32) stays 0.
    norm = np.sqrt(np.einsum("nd,nd->n", flat, flat))[:, None]
    unit = np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 0)
    class_ids = np.arange(num_classes)[:, None]

    def best_per_class(memory: np.ndarray, keep: np.ndarray) -> np.ndarray:
        memory_t, mask = memory_tensors(memory, keep)
        similarity = unit @ memory_t  # (N, M)
        return (similarity[:, None, :] + mask[None]).max(axis=2)  # type: ignore[no-any-return]

    best = best_per_class(rows, classes[None, :] == class_ids)
    floor = np.float32(threshold)
    if replay is not None and len(replay[0]):
        floor = np.maximum(best_per_class(replay[0], replay[1][None, :] != class_ids), floor)
    exact = np.maximum(best - np.float32(EXACT_MATCH), 0) * np.float32(1 / (1 - EXACT_MATCH))
    total = np.maximum(best - floor, 0) + exact
    return total * np.float32(strength)  # type: ignore[no-any-return]
