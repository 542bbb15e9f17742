"""The nearest-neighbour memory's tensors: their names and values (numpy only, no onnx)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEMORY_PREFIX = "luncher_memory"
PERSONAL_ROWS = f"{MEMORY_PREFIX}/personal_rows"
PERSONAL_MASK = f"{MEMORY_PREFIX}/personal_mask"
PERSONAL_FLOOR = f"{MEMORY_PREFIX}/personal_floor"
PERSONAL_CENTRE = f"{MEMORY_PREFIX}/centre"
STRENGTH = f"{MEMORY_PREFIX}/strength"
MEMORY_TENSORS = (PERSONAL_CENTRE, PERSONAL_ROWS, PERSONAL_MASK, PERSONAL_FLOOR, STRENGTH)
# Cosine similarity from which a photo counts as one the user taught (the same photo gives
# 1 up to float rounding; an augmented view of it, about 0.9): see heads.add_memory.
EXACT_MATCH = 0.999


@dataclass(frozen=True)
class Memory:
    """The user's examples as the memory holds them: (M, ...) head inputs and their (M,)
    class indices; each row's similarity to its nearest replayed base example of another
    class (`conflicts`, -1 without one) and its floor (see `build_memory`); the view of
    the examples each row is (`views`, -1 for a row that summarizes several photos); and
    the `centre` (D,) every head input is measured from (see `build_memory`)."""

    rows: np.ndarray
    classes: np.ndarray
    conflicts: np.ndarray
    floors: np.ndarray
    views: np.ndarray
    unit: np.ndarray  # (M, D) the rows minus the centre at unit length, made once
    centre: np.ndarray  # (D,) float32


def build_memory(
    rows: np.ndarray,
    classes: np.ndarray,
    threshold: float,
    replay: tuple[np.ndarray, ...] | None,  # head inputs, class indices (, weights)
    *,
    views: np.ndarray | None = None,
    known: np.ndarray | None = None,
    batch: int = 512,
    centre: np.ndarray | None = None,
) -> Memory:
    """The memory of these rows. A row's floor is the threshold, or, if higher, the row's
    own similarity to its nearest replayed base example of another class: each example of
    the user's claims the photos closer to it than that base example is (a ball around
    it), so a dish the base knows under another label keeps it, and a photo far from every
    base example is not claimed by whichever example happens to be nearest.

    Similarities are cosines of head inputs minus `centre` (zero when None), which
    copy_memory makes the mean of the base's replay set (SimpleShot's centring): what
    every photo shares no longer counts as likeness (results/memory-rules-centred.md).

    `known`: (M,) conflicts found before (a copy's cache of them), NaN where not: only
    those rows are compared with the replay set (M x 400 similarities for 2,048 rows
    cost a retrain of 5,000 examples about 30 ms)."""
    if known is None:
        conflicts = np.full(len(rows), np.nan, np.float32)
    else:
        conflicts = known.astype(np.float32)  # a copy
    todo = np.flatnonzero(np.isnan(conflicts))
    conflicts[todo] = -1.0
    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    centre = np.zeros(width, np.float32) if centre is None else centre.astype(np.float32)
    unit = _unit(rows, centre)
    if replay is not None and len(replay[0]) and len(todo):
        others = _unit(replay[0], centre)
        for start in range(0, len(todo), batch):
            chosen = todo[start : start + batch]
            similarity = unit[chosen] @ others.T  # (b, R)
            similarity[classes[chosen, None] == replay[1][None, :]] = -1.0
            conflicts[chosen] = similarity.max(axis=1)
    floors = np.maximum(conflicts, np.float32(threshold))
    if views is None:
        views = np.full(len(rows), -1, np.int64)
    return Memory(rows, classes, conflicts, floors, views, unit, centre)


def personal_memory(memory: Memory, num_classes: int, strength: float) -> dict[str, np.ndarray]:
    """The varying memory tensors of heads.add_memory's graph for this memory."""
    return {
        PERSONAL_CENTRE: memory.centre.astype(np.float32),
        PERSONAL_ROWS: memory.unit.T.copy(),
        PERSONAL_MASK: _mask(memory.classes, num_classes),
        PERSONAL_FLOOR: memory.floors.astype(np.float32),
        STRENGTH: np.array(strength, np.float32),
    }


def memory_bonus(
    x: np.ndarray,
    memory: Memory,
    num_classes: int,
    strength: float,
    *,
    logits: np.ndarray | None = None,
    batch: int = 256,
) -> np.ndarray:
    """What the memory that heads.add_memory puts in the graph adds to the head's `logits`
    (N, num_classes) for the head inputs x (N, D), computed with numpy in float32 as ONNX
    Runtime runs that graph (tests/test_personalization.py checks that they agree). The
    memory's unit rows are made once, and x is scored `batch` rows at a time. Without
    `logits` (evaluations of the rule alone), a taught photo's lift to the top is left out."""
    unit = memory.unit
    mask = _mask(memory.classes, num_classes)
    floors = memory.floors.astype(np.float32)
    flat = x.reshape(len(x), -1).astype(np.float32) - memory.centre
    parts = [np.zeros((0, num_classes), np.float32)]
    for start in range(0, len(flat), batch):
        chunk = flat[start : start + batch]
        # LpNormalization: a row whose norm is 0 (in float32) stays 0.
        norm = np.sqrt(np.einsum("nd,nd->n", chunk, chunk))[:, None]
        similarity = np.divide(chunk, norm, out=np.zeros_like(chunk), where=norm > 0) @ unit.T
        above = _best_per_class(similarity - floors[None, :], mask)
        best = _best_per_class(similarity, mask)
        exact = np.maximum(best - np.float32(EXACT_MATCH), 0) * np.float32(1 / (1 - EXACT_MATCH))
        bonus = (np.maximum(above, 0) + exact) * np.float32(strength)
        if logits is not None:  # a taught photo's label first rises to the head's top
            head = logits[start : start + batch].astype(np.float32)
            with np.errstate(invalid="ignore"):  # inf - inf: NaN, which callers check
                bonus += exact * (head.max(axis=1, keepdims=True) - head)
        parts.append(bonus)
    return np.concatenate(parts)


def _unit(rows: np.ndarray, centre: np.ndarray | float = 0.0) -> np.ndarray:
    """(M, D) float32 rows minus `centre`, at unit length (a copy)."""
    unit = rows.reshape(len(rows), -1).astype(np.float32) - centre
    unit /= np.maximum(np.sqrt(np.einsum("md,md->m", unit, unit)), 1e-12)[:, None]
    return unit


def _mask(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, M): 0 where row m counts for class c, -4 (below any similarity less a floor)
    elsewhere."""
    keep = classes[None, :] == np.arange(num_classes)[:, None]
    return np.where(keep, 0.0, -4.0).astype(np.float32)


def _best_per_class(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, C): each photo's highest value (N, M) over the rows that count for class c."""
    return (values[:, None, :] + mask[None]).max(axis=2)  # type: ignore[no-any-return]
