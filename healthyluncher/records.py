"""The records of a models directory: the base, the personalized copy and the examples (no onnx)."""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher import segments
from healthyluncher.errors import (
    MAKE_UPDATABLE,
    MAKE_UPDATABLE_KEEPING,
    REPAIR,
    UNDO,
    Command,
    DamagedError,
    DamagedViewsError,
    LuncherError,
    Message,
)
from healthyluncher.fileio import not_regular, numpy_problem, read_json, regular
from healthyluncher.meta import SHA256, BaseMeta, PersonalMeta
from healthyluncher.state import State
from healthyluncher.store import Files, ModelStore, resolve_models_dir

# Advice for a personalized copy that is damaged: the step before it is intact (`reset`
# would drop every example, and `predict --base` works meanwhile).
GO_BACK: Message = ("run ", UNDO, " to go back one step")

BUNDLED_MODEL = "healthyluncher-base.onnx"
BUNDLED_REPLAY = "healthyluncher-base.replay.npz"


@dataclass(frozen=True)
class Base:
    path: Path
    meta: BaseMeta


@dataclass(frozen=True)
class Personal:
    path: Path
    meta: PersonalMeta


@dataclass(frozen=True)
class Examples:
    """The user's examples: one row per view, grouped by photo.

    `inputs` is (views, *split_shape) float32; `owner[i]` indexes the photo of view i in
    `digests` and `labels`.
    """

    inputs: np.ndarray
    owner: np.ndarray
    digests: tuple[str, ...]
    labels: tuple[str, ...]
    # Where each view is stored in the models directory's shared segments (segments.py):
    # (views, 2) [index in `segments`, row], -1 for a view not stored yet; None: none is.
    origin: np.ndarray | None = None
    segments: tuple[str, ...] = ()

    @staticmethod
    def empty(sample_shape: tuple[int, ...]) -> Examples:
        return Examples(np.zeros((0, *sample_shape), np.float32), np.zeros(0, np.int64), (), ())

    def __len__(self) -> int:
        return len(self.digests)

    def per_label(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts


def bundled_model() -> Path | None:
    """The base model shipped with the package (wheel), or in the source tree's models/."""
    candidates = []
    try:
        candidates.append(Path(str(resources.files("healthyluncher") / "models" / BUNDLED_MODEL)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "models" / BUNDLED_MODEL)
    override = os.environ.get("LUNCHER_BUNDLED_MODEL")
    if override is not None:
        # Tests point this at a tiny model, or at nothing ("") to act as if none shipped.
        return Path(override) if override else None
    return next((c for c in candidates if c.is_file()), None)


def make_updatable_command(root: Path, command: Command = MAKE_UPDATABLE) -> Command:
    """`command`, a make-updatable that sets up a base (MAKE_UPDATABLE_KEEPING...), for the
    models directory `root`: followed as written, it must set up that one. The bare call
    opens the default one (or the directory of $LUNCHER_MODELS_DIR, which is still set),
    so another one is named. (The command line names the directory given with
    --models-dir in every command it suggests, this one included.)"""
    try:
        default = resolve_models_dir().resolve()
    except LuncherError:  # no home directory: `root` was given, and is named
        default = None
    if root == default:
        return command
    assert command.api.endswith(")"), command
    return command._replace(api=f"{command.api.removesuffix(')')}, models_dir={str(root)!r})")


def load_base(store: ModelStore, state: State) -> Base:
    path = store.base_dir(state)
    command = make_updatable_command(store.root)
    if path is None:
        raise LuncherError(f"there is no base model in {store.root} yet: run ", command)
    # A make-updatable of its own would stop at this damage too: --keep-personalization
    # sets up a new base without reading this one's meta.json.
    again = ("run ", make_updatable_command(store.root, MAKE_UPDATABLE_KEEPING))
    try:
        data = read_json(path / Files.META)
    except FileNotFoundError:
        raise LuncherError(f"{path} is incomplete; ", *again) from None
    except DamagedError as exc:
        raise LuncherError(f"{exc}; ", *again) from None
    if (odd := not_regular(path)) is not None:
        raise LuncherError(f"{odd} is damaged (not a regular file); ", *again)
    try:  # a value the checks refuse is named with its file, like one that does not parse
        return Base(path, BaseMeta.from_json(data))
    except (LuncherError, KeyError, TypeError, ValueError) as exc:
        raise LuncherError(f"{path / Files.META} is damaged ({exc}); ", *again) from None


def same_base(base: Base, other: Path) -> bool:
    """Whether the base directory `other` is `base` made again, file for file: the same
    model set up the same way, and `base` undamaged (meta.json may differ in when and from
    which path it was made)."""

    def files(root: Path) -> list[str]:
        found = (path.relative_to(root).as_posix() for path in root.rglob("*"))
        return sorted(name for name in found if name != Files.META)

    try:
        theirs = BaseMeta.from_json(read_json(other / Files.META))
        if replace(theirs, created="", source="") != replace(base.meta, created="", source=""):
            return False
        names = files(other)
        if files(base.path) != names:
            return False
        return all(_same_file(other / name, base.path / name) for name in names)
    # zlib.error: deflated data that does not inflate; NotImplementedError and RuntimeError:
    # a zip entry compressed by an unknown method, or encrypted.
    except (
        OSError,
        LuncherError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    ):
        return False  # a damaged current base is not the same as a new one


def _same_file(one: Path, other: Path) -> bool:
    """The same bytes; for arrays (.npz), the same arrays: a zip entry holds its time."""
    import filecmp

    if one.is_dir() or other.is_dir():
        return one.is_dir() and other.is_dir()
    if not (one.is_file() and other.is_file()):  # a named pipe in their place: damage
        return False
    if one.suffix != ".npz":
        return filecmp.cmp(one, other, shallow=False)
    with np.load(regular(one), allow_pickle=False) as a, np.load(regular(other)) as b:
        return sorted(a.files) == sorted(b.files) and all(
            np.array_equal(a[name], b[name]) for name in a.files
        )


def load_personal(store: ModelStore, state: State) -> Personal | None:
    path = store.personal_dir(state)
    if path is None:
        return None
    try:
        data = read_json(path / Files.META)
    except FileNotFoundError:
        raise LuncherError(f"{path} is incomplete; ", *GO_BACK) from None
    except DamagedError as exc:
        raise LuncherError(f"{exc}; ", *GO_BACK) from None
    if (odd := not_regular(path)) is not None:
        raise LuncherError(f"{odd} is damaged (not a regular file); ", *GO_BACK)
    try:
        return Personal(path, PersonalMeta.from_json(data))
    except (LuncherError, KeyError, TypeError, ValueError) as exc:
        raise LuncherError(f"{path / Files.META} is damaged ({exc}); ", *GO_BACK) from None


def undo_examples(store: ModelStore, state: State) -> dict[str, int]:
    """The examples of the personalization `undo` brings back: its step's, per label ({}
    for a step without one, no step, or a damaged one, which undo refuses)."""
    if not state.history or state.history[0].personal is None:
        return {}
    step = state.history[0]
    try:
        personal = load_personal(store, State(base=step.base or state.base, personal=step.personal))
    except LuncherError:
        return {}
    return dict(personal.meta.examples_per_label) if personal else {}


def load_examples(
    personal: Personal | None,
    sample_shape: tuple[int, ...],
    *,
    shared: bool = True,
    views: bool = True,
) -> Examples:
    """A copy's examples. Their views are in the file itself, or (`shared`, a copy inside a
    models directory) in the directory's segments, which the file indexes. Without `views`,
    the photos and labels alone (each view an empty row)."""
    if personal is None:
        return Examples.empty(sample_shape)
    path = personal.path / Files.EXAMPLES
    try:
        with np.load(regular(path), allow_pickle=False) as data:
            origin: np.ndarray | None = None
            segment_names: tuple[str, ...] = ()
            if "inputs" in data.files or not shared:
                inputs = data["inputs"]
                if inputs.dtype.kind != "f":  # complex would lose a part, with a warning
                    raise ValueError(f"its head inputs are {inputs.dtype}, not floating point")
                inputs = inputs.astype(np.float32, copy=False)
            else:
                origin = data["origin"].astype(np.int64)
                names = data["segments"]
                inputs = _views(personal, origin, names) if views else np.zeros((len(origin), 0))
                segment_names = tuple(str(name) for name in names)
            owner, digests, labels = data["owner"], data["digests"], data["labels"]
        # A digest names a thumbnail file (a forget deletes it), a label picks a class.
        if owner.dtype.kind not in "iu" or digests.ndim != 1 or labels.ndim != 1:
            raise ValueError("its owners, digests or labels are not lists of their type")
        owner = owner.astype(np.int64)
        digests, labels = tuple(map(str, digests)), tuple(map(str, labels))
        if not all(SHA256.fullmatch(d) for d in digests):
            raise ValueError("a digest is not a sha256")
        if not set(labels) <= set(personal.meta.labels):
            raise ValueError("a label is not one of the model's")
        if owner.shape != (len(inputs),) or len(labels) != len(digests):
            raise ValueError("its arrays differ in length")
        if len(owner) and (owner.min() < 0 or owner.max() >= len(digests)):
            raise ValueError("a view belongs to no photo")
        return Examples(inputs, owner, digests, labels, origin, segment_names)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise LuncherError(f"{path} is damaged ({numpy_problem(exc)}); ", *GO_BACK) from None


def _views(personal: Personal, origin: np.ndarray, names: np.ndarray) -> np.ndarray:
    try:
        return segments.load_views(personal.path.parent / segments.FOLDER, origin, names)
    except DamagedViewsError as exc:  # undo steps share it: undo does not get past it
        raise DamagedViewsError(
            f"{exc}; run ", REPAIR, " to embed your photos again from their thumbnails"
        ) from None


def load_taught(personal: Personal | None) -> dict[str, tuple[str, str]]:
    """{digest: (file name, when taught)} of the examples; what is missing or malformed is
    left out (the file only informs `luncher examples`)."""
    if personal is None:
        return {}
    try:
        data = read_json(personal.path / Files.TAUGHT)
    except (FileNotFoundError, LuncherError):
        return {}
    return taught_entries(data)


def taught_entries(data: Any) -> dict[str, tuple[str, str]]:
    """taught.json's entries (or an archive's), the malformed ones left out."""
    found: dict[str, tuple[str, str]] = {}
    if isinstance(data, dict):
        for digest, entry in data.items():
            if not (isinstance(entry, list) and len(entry) == 2):
                continue
            name, when = entry
            if isinstance(name, str) and isinstance(when, str) and len(name) <= 1024:
                found[str(digest)] = (name, when[:40])
    return found


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz, readable with allow_pickle=False."""
    savez: Any = np.savez
    savez(path, **arrays)


def save_examples(
    examples: Examples, path: Path, *, shared: bool = True
) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Write a copy's examples.npz: with `shared` (a copy in a models directory), an index
    of its views in the directory's segments, storing only views not stored yet; else a
    file that holds the views itself (an archive's). Returns where the views are stored
    now (origin and segments, as Examples has them; None without an index)."""
    arrays = {
        "owner": examples.owner,
        "digests": np.array(examples.digests, dtype=np.str_),
        "labels": np.array(examples.labels, dtype=np.str_),
    }
    if shared and len(examples.inputs):
        folder = path.parent.parent / segments.FOLDER
        origin, names = segments.store_views(
            folder, examples.inputs, examples.origin, examples.segments
        )
        arrays.update(origin=origin, segments=np.array(names, dtype=np.str_))
        save_arrays(path, arrays)
        return origin, names
    arrays["inputs"] = examples.inputs
    save_arrays(path, arrays)
    return None, ()


def load_weights(personal: Personal) -> dict[str, np.ndarray]:
    path = personal.path / Files.WEIGHTS
    try:
        with np.load(regular(path), allow_pickle=False) as data:
            weights = {name: data[name] for name in data.files}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise LuncherError(f"{path} is damaged ({numpy_problem(exc)}); ", *GO_BACK) from None
    # A rename publishes these as they are, and an export writes them.
    if not all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.values()):
        raise LuncherError(f"{path} is damaged (weights not finite float32); ", *GO_BACK)
    return weights


def load_scores(personal: Personal) -> dict[str, np.ndarray]:
    """{digest: probabilities} saved with the copy; {} when missing or damaged (computed again)."""
    try:
        with np.load(regular(personal.path / Files.SCORES), allow_pickle=False) as data:
            digests, probs = data["digests"], data["probabilities"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return {}
    shape = (len(digests), len(personal.meta.labels)) if digests.ndim == 1 else None
    if probs.shape != shape or probs.dtype.kind != "f" or not np.isfinite(probs).all():
        return {}
    return {str(d): p for d, p in zip(digests, probs, strict=True)}
