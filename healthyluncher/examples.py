"""The user's examples as training data: merging, selecting, weighting, and the memory rows."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.fileio import numpy_problem, regular
from healthyluncher.memory import Memory, build_memory
from healthyluncher.records import Base, Examples, Personal, save_arrays
from healthyluncher.settings import Hyperparameters
from healthyluncher.store import Files
from healthyluncher.trainers import TrainingSet

# Rows of the nearest-neighbour memory at most: about 10 MB of float32 for the shipped
# base's 1280-d head inputs. Past it, fewer augmented views per photo are remembered.
MEMORY_ROWS = 2048


def merge_examples(old: Examples, new: list[tuple[str, np.ndarray]], label: str) -> Examples:
    """Add photos (digest, views) under `label`; a photo seen before takes the new label."""
    replaced = {digest for digest, _ in new}
    keep = [i for i, d in enumerate(old.digests) if d not in replaced]
    # Nothing retaught (the usual retrain): no copy of every view (25 MB at 5,000 photos).
    kept = old if len(keep) == len(old.digests) else select_examples(old, keep)
    if not new:
        return kept
    owner = [kept.owner] + [
        np.full(len(views), len(kept) + i, np.int64) for i, (_, views) in enumerate(new)
    ]
    inputs = np.concatenate([kept.inputs, *(views for _, views in new)]).astype(
        np.float32, copy=False
    )
    origin = None
    if kept.origin is not None:  # the new views are not stored yet
        origin = np.full((len(inputs), 2), -1, np.int64)
        origin[: len(kept.origin)] = kept.origin
    return Examples(
        inputs=inputs,
        owner=np.concatenate(owner),
        digests=kept.digests + tuple(d for d, _ in new),
        labels=kept.labels + (label,) * len(new),
        origin=origin,
        segments=kept.segments,
    )


def select_examples(examples: Examples, keep: list[int]) -> Examples:
    """The photos at `keep`, in that order, with their views (one pass, no mask per photo)."""
    if not keep:
        return Examples(examples.inputs[:0], examples.owner[:0], (), ())
    wanted = np.asarray(keep, np.int64)
    new_index = np.full(len(examples), -1, np.int64)
    new_index[wanted] = np.arange(len(wanted))
    row_owner = new_index[examples.owner]
    rows = np.flatnonzero(row_owner >= 0)
    rows = rows[np.argsort(row_owner[rows], kind="stable")]
    return Examples(
        examples.inputs[rows],
        row_owner[rows],
        tuple(examples.digests[i] for i in keep),
        tuple(examples.labels[i] for i in keep),
        None if examples.origin is None else examples.origin[rows],
        examples.segments,
    )


def apart_from_forgotten(examples: Examples, kept: Examples, gone: set[str]) -> Examples:
    """`kept` (photos selected from `examples`) with every view that shares a segment with
    a view of a photo in `gone` marked as not stored yet: a forget writes them into a new
    segment, and the old ones, which still hold the forgotten photos' views, go with the
    undo steps (else the head inputs of a forgotten photo stayed on disk)."""
    if examples.origin is None or kept.origin is None or not examples.segments:
        return kept
    leaving = np.array([digest in gone for digest in examples.digests], bool)
    rows = examples.origin[leaving[examples.owner]] if len(examples.owner) else examples.origin
    touched = np.zeros(len(examples.segments), bool)
    touched[rows[rows[:, 0] >= 0, 0]] = True
    origin = kept.origin.copy()
    stored = origin[:, 0] >= 0
    origin[stored & touched[np.where(stored, origin[:, 0], 0)]] = -1
    return Examples(kept.inputs, kept.owner, kept.digests, kept.labels, origin, kept.segments)


def training_set(
    examples: Examples,
    replay: tuple[np.ndarray, ...] | None,
    labels: tuple[str, ...],
    hp: Hyperparameters,
) -> TrainingSet:
    """Personal views weighted `personal_weight` per photo, plus replayed base examples.

    Each class present gets the same total weight, so a label with many replayed examples
    does not drown one with a few personal photos, nor the other way round.
    """
    index = {label: i for i, label in enumerate(labels)}
    views_per_photo = np.bincount(examples.owner, minlength=len(examples))
    parts_y = [np.array([index[examples.labels[o]] for o in examples.owner], np.int64)]
    parts_w = [hp.personal_weight / views_per_photo[examples.owner]]
    extra = None
    if replay is not None and len(replay[0]):
        extra = replay[0]
        parts_y.append(replay[1])
        parts_w.append(replay[2] if len(replay) > 2 else np.ones(len(replay[0])))
    y = np.concatenate(parts_y).astype(np.int64)
    w = np.concatenate(parts_w).astype(np.float64)
    for cls in np.flatnonzero(np.bincount(y)):  # not np.unique: it imports numpy.ma
        mask = y == cls
        w[mask] /= w[mask].sum()
    return TrainingSet(inputs=examples.inputs, labels=y, weights=w, extra=extra)


# Far beyond any network's activations, and small enough that training stays finite: head
# inputs of 1e38 trained into NaN, and the user was told to try a smaller learning rate.
HEAD_INPUT_LIMIT = 1e12


def sane_inputs(inputs: np.ndarray) -> bool:
    """Head inputs read from a file are finite and within HEAD_INPUT_LIMIT (NaN fails)."""
    return bool(np.all(np.abs(inputs) <= HEAD_INPUT_LIMIT))


Replay = tuple[np.ndarray, np.ndarray, np.ndarray]
_replay: dict[tuple[Any, ...], Replay] = {}  # the last one read, by its file's identity


def load_replay(base: Base) -> Replay | None:
    """The base's replay set: head inputs, class indices and training weights (read-only
    arrays; a retrain needs them twice, and a base's files never change in place)."""
    path = base.path / Files.REPLAY
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns, base.meta.labels)
    if key in _replay:
        return _replay[key]
    inputs, names, weights = read_replay(path)
    index = {label: i for i, label in enumerate(base.meta.labels)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise LuncherError(f"{path}: replay labels {unknown} are not model labels")
    replay = (inputs, np.array([index[name] for name in names], np.int64), weights)
    for array in replay:
        array.flags.writeable = False
    _replay.clear()
    _replay[key] = replay
    return replay


def read_replay(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A replay file's head inputs, label names and weights, every value checked: it comes
    from anywhere (--replay), and every retrain trains on it."""
    try:
        with np.load(regular(path), allow_pickle=False) as data:
            inputs, names = data["inputs"].astype(np.float32, copy=False), data["labels"]
            weights = replay_weights(data, len(inputs), path)
    except (OSError, KeyError, ValueError, TypeError) as exc:  # TypeError: a 0-d array
        raise LuncherError(f"{path}: not a replay set ({numpy_problem(exc)})") from None
    if names.shape != (len(inputs),) or inputs.ndim < 2 or not sane_inputs(inputs):
        raise LuncherError(f"{path}: not a replay set (labels without inputs, or inputs NaN "
                           f"or over {HEAD_INPUT_LIMIT:g})")  # fmt: skip
    return inputs, [str(name) for name in names], weights


def copy_replay(
    source: Path, target: Path, labels: tuple[str, ...], split_sample: np.ndarray
) -> int:
    """Copy a replay set into a new base, checked against its labels and head input shape;
    returns its number of examples."""
    inputs, replay_labels, _ = read_replay(source)
    if inputs.shape[1:] != split_sample.shape[1:]:
        raise LuncherError(
            f"{source}: replay inputs have shape {inputs.shape[1:]}, the head takes "
            f"{split_sample.shape[1:]}"
        )
    unknown = sorted(set(replay_labels) - set(labels))
    if unknown:
        raise LuncherError(f"{source}: replay labels {unknown} are not model labels")
    shutil.copyfile(source, target)
    return len(inputs)


def replay_weights(data: Any, rows: int, source: Path) -> np.ndarray:
    """A replay file's training weights (each row 1 when it has none): a photo replayed
    both as it is and as a thumbnail weighs 1 in all, as a user's photo over its views."""
    if "weights" not in data.files:
        return np.ones(rows)
    weights = np.asarray(data["weights"])
    fine = weights.shape == (rows,) and weights.dtype.kind == "f"
    if not fine or not np.all((weights > 0) & (weights <= 1)):  # NaN fails both
        raise LuncherError(f"{source}: the replay set's weights are damaged")
    return weights.astype(np.float64)


def memory_rows(
    examples: Examples, labels: tuple[str, ...], centre: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The views to remember, their class indices and their indices in `examples.inputs`
    (-1 for a summary), at most MEMORY_ROWS.

    When every photo's own view fits, they all go in, then augmented views while they fit.
    Beyond that, the newest photos keep their own views (a photo taught today takes its
    label today) and the older ones are summarized: each run of photos taught one after
    the other under one label becomes one or more rows, so every photo still counts
    (`memory_plan` says how the rows are split): seen from `centre` (the memory's, zero
    when None), a row points the mean way of its photos' views."""
    first = _first_view_indices(examples)
    class_of = np.array([labels.index(label) for label in examples.labels], np.int64)
    photos = len(examples)
    if photos <= MEMORY_ROWS:
        rest = np.ones(len(examples.owner), bool)
        rest[first] = False
        chosen = np.concatenate([first, np.flatnonzero(rest)])[:MEMORY_ROWS]
        return examples.inputs[chosen], class_of[examples.owner[chosen]], chosen
    newest, older = memory_plan(photos)
    # Fancy indexing copies once; the rows are normalized in that copy.
    flat = examples.inputs[first[:older]].reshape(older, -1).astype(np.float32, copy=False)
    if centre is not None:
        flat -= centre
    flat /= np.maximum(np.sqrt(np.einsum("nd,nd->n", flat, flat)), 1e-12)[:, None]
    means = _run_means(flat, class_of[:older], MEMORY_ROWS - newest)
    summaries = (means[0] if centre is None else means[0] + centre, means[1])
    rows = np.concatenate(
        [summaries[0].reshape(-1, *examples.inputs.shape[1:]), examples.inputs[first[older:]]]
    )
    views = np.concatenate([np.full(len(summaries[1]), -1, np.int64), first[older:]])
    classes = np.concatenate([summaries[1], class_of[older:]])
    return rows.astype(np.float32, copy=False), classes, views


def copy_memory(
    base: Base,
    examples: Examples,
    labels: tuple[str, ...],
    threshold: float,
    known: dict[str, float] | None = None,
) -> Memory:
    """The memory a copy with these examples holds: its rows, and their floors against the
    base's replay set, measured from the replay set's mean; `known`: conflicts found
    before, by view_keys (a copy's cache)."""
    replay = load_replay(base)
    centre = replay_centre(replay)
    rows, classes, views = memory_rows(examples, labels, centre)
    found = None
    if known:
        keys = view_keys(views, examples.origin, examples.segments)
        found = np.array([known.get(key, np.nan) if key else np.nan for key in keys], np.float32)
    return build_memory(rows, classes, threshold, replay, views=views, known=found, centre=centre)


def replay_centre(replay: Replay | None) -> np.ndarray | None:
    """The mean head input of a replay set (each row once, as the eval measured it), or
    None without one: the memory's centre."""
    if replay is None or not len(replay[0]):
        return None
    rows = replay[0].reshape(len(replay[0]), -1)
    centre: np.ndarray = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    return centre


def view_keys(views: np.ndarray, origin: np.ndarray | None, segments: tuple[str, ...]) -> list[str]:
    """Where each of these views is stored ("segment/row": its content's name, segments
    being content-addressed), or "" for a summary or a view not stored yet."""
    if origin is None or not len(origin):
        return [""] * len(views)
    stored = (views >= 0) & (views < len(origin))
    where = origin[np.where(stored, views, 0)]
    stored &= (where[:, 0] >= 0) & (where[:, 0] < len(segments))
    return [
        f"{segments[segment]}/{row}" if ok else ""
        for segment, row, ok in zip(
            where[:, 0].tolist(), where[:, 1].tolist(), stored.tolist(), strict=True
        )
    ]


def load_floors(personal: Personal | None, base: Base) -> dict[str, float]:
    """The conflicts a copy of `base` saved for its memory rows (save_floors), by view
    key; {} when there are none, or they are unreadable, of another base or invalid (they
    are then computed again)."""
    if personal is None or personal.meta.base_sha256 != base.meta.sha256:
        return {}
    try:
        with np.load(regular(personal.path / Files.FLOORS), allow_pickle=False) as data:
            keys, conflicts, rule = data["keys"], data["conflicts"], data["rule"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return {}  # no "rule": saved before the memory measured from a centre
    if rule.shape != () or rule.dtype.kind != "U" or str(rule) != FLOORS_RULE:
        return {}
    if keys.ndim != 1 or keys.dtype.kind != "U" or conflicts.shape != keys.shape:
        return {}
    if conflicts.dtype != np.float32 or not np.all(np.abs(conflicts) <= 1.001):  # NaN too
        return {}
    return dict(zip(keys.tolist(), conflicts.tolist(), strict=True))


# How the saved conflicts were measured: similarities from the replay set's mean.
FLOORS_RULE = "centred"


def save_floors(
    path: Path, memory: Memory, origin: np.ndarray | None, segments: tuple[str, ...]
) -> None:
    """Save the memory rows' conflicts by where their views are stored, for the next
    retrain (load_floors); summaries are computed again."""
    keys = view_keys(memory.views, origin, segments)
    keep = np.array([i for i, key in enumerate(keys) if key], np.int64)
    save_arrays(
        path,
        {
            "keys": np.array([keys[i] for i in keep], dtype=np.str_),
            "conflicts": memory.conflicts[keep].astype(np.float32),
            "rule": np.array(FLOORS_RULE),
        },
    )


def memory_plan(photos: int) -> tuple[int, int]:
    """(photos remembered one by one, the newest; older photos summarized) for this many
    photos: all of them one by one while they fit in MEMORY_ROWS, else the newest
    seven-eighths of the rows, and the rest of the rows summarize the older photos."""
    if photos <= MEMORY_ROWS:
        return photos, 0
    newest = MEMORY_ROWS - MEMORY_ROWS // 8
    return newest, photos - newest


def _run_means(unit: np.ndarray, classes: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `budget` rows summarizing these photos (in the order taught): runs of one
    label, cut into equal chunks so that the chunks number at most `budget`, each the mean
    of its photos."""
    starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
    if len(starts) > budget:  # labels alternate photo by photo: group by label instead
        order = np.argsort(classes, kind="stable")
        unit, classes = unit[order], classes[order]
        starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
    ends = np.r_[starts[1:], len(classes)]
    size = 1
    while size < len(classes) and (
        sum(-(-(e - s) // size) for s, e in zip(starts, ends, strict=True)) > budget
    ):
        size *= 2
    rows, row_classes = [], []
    for start, end in zip(starts, ends, strict=True):
        for at in range(start, end, size):
            rows.append(unit[at : min(end, at + size)].mean(axis=0))
            row_classes.append(classes[start])
    return np.stack(rows), np.array(row_classes, np.int64)


def _first_view_indices(examples: Examples) -> np.ndarray:
    """Row index of each photo's own (first) view."""
    first = np.full(len(examples), len(examples.owner))
    np.minimum.at(first, examples.owner, np.arange(len(examples.owner)))
    return first


def first_views(examples: Examples) -> np.ndarray:
    """Each photo's own (first) view: (photos, *sample_shape)."""
    views: np.ndarray = examples.inputs[_first_view_indices(examples)]
    return views
