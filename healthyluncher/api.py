"""The public API: a models directory opened as a `Luncher`, and `make_updatable`.

Everything the `luncher` command does goes through here, so a program gets the same
results, the same errors (`LuncherError`) and the same safety (one atomic, locked
transaction per change) as a person at a terminal. Nothing here prints.

The modules behind each call are imported where they are used: `predict` never loads the
retrain machinery, a cached retrain never loads Pillow, onnx or the predictor, and only
`make_updatable` and backups load onnx (each module is a few milliseconds of every start).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from healthyluncher import heldlocks
from healthyluncher.arguments import check_options, image_stream, path_argument, photo_sources
from healthyluncher.errors import LuncherError
from healthyluncher.events import ProgressCallback
from healthyluncher.meta import check_label
from healthyluncher.photos import ImageFailure
from healthyluncher.runtime import quiet_default_logger as quiet_default_logger  # luncher's
from healthyluncher.settings import Hyperparameters, plain_number
from healthyluncher.state import State
from healthyluncher.store import ModelStore, resolve_models_dir

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np

    from healthyluncher.backup import ImportResult
    from healthyluncher.bases import UpdatableResult
    from healthyluncher.exporting import ExportResult
    from healthyluncher.imaging import PhotoInput
    from healthyluncher.personalizing import ResetResult, RetrainResult, Status, UndoResult
    from healthyluncher.predictor import Prediction, Predictor
    from healthyluncher.teaching import (
        ForgetResult,
        LabelInfo,
        RenameResult,
        RepairResult,
        TaughtExample,
    )

    Whole: TypeAlias = int | np.integer[Any]  # `epochs=np.int64(5)`, as plain_number takes
    Real: TypeAlias = float | np.floating[Any] | np.integer[Any]

T = TypeVar("T")


def open(  # noqa: A001
    models_dir: str | os.PathLike[str] | None = None,
    *,
    on_wait: Callable[[str], None] | None = None,
) -> Luncher:
    """Open a models directory, as `luncher` does: `models_dir`, else the environment
    variable LUNCHER_MODELS_DIR, else your user data directory. An empty one is set up
    from the shipped base model on first use. `on_wait` is told, once, in words, when a
    change has to wait for another process that holds the models directory.

    >>> lun = healthyluncher.open()
    >>> lun.predict(["lunch.jpg"])[0].label
    'healthy'
    """
    root = resolve_models_dir(
        None if models_dir is None else path_argument(models_dir, "models_dir")
    )
    return Luncher(root, on_wait=on_wait)


class Luncher:
    """One models directory: predict with it, personalize it, undo, export and import.

    Safe to use from several threads: changes run one at a time, and predictions and reads
    (`status`, `examples`, `label_info`) go on meanwhile with the model as it was; several
    processes take turns on the models directory's lock.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str],
        *,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        root = resolve_models_dir(path_argument(models_dir, "models_dir"))  # absolute, as open's
        check_options({"on_wait": on_wait})
        self._store = ModelStore(root, on_wait=on_wait)
        self._lock = threading.RLock()  # changes
        self._predictor_lock = threading.Lock()  # readers never wait for a change (ModelStore)
        self._predictors: dict[tuple[bool, str | None, str | None], Predictor] = {}
        heldlocks.after_fork_in_child(self)

    def _after_fork_in_child(self) -> None:  # all thread locks (any holder's), sessions anew
        heldlocks.kept_in_child(self._predictors)  # destroying their sessions there hangs
        self._lock, self._predictor_lock, self._predictors = threading.RLock(), threading.Lock(), {}

    def __repr__(self) -> str:
        return f"Luncher({str(self.models_dir)!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # to a pool's worker: one Luncher per process
        return (functools.partial(_reopened, on_wait=self._store.on_wait), (self.models_dir,))

    @property
    def models_dir(self) -> Path:
        """The models directory, as an absolute path."""
        return self._store.root

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels predictions choose from (the base's, plus any you added)."""
        return self._predictor(base=False).model.labels

    @property
    def personalized(self) -> bool:
        """Whether predictions come from your personalized copy (else from the base)."""
        return self._ready().personal is not None

    # -- predicting ------------------------------------------------------------------------

    def predict(
        self, photos: PhotoInput | Iterable[PhotoInput], *, base: bool = False
    ) -> list[Prediction]:
        """Label each photo, in the order given (directories are searched, sorted).

        Photos are file paths, photo files' bytes (an upload), PIL images or (H, W, 3)
        uint8 arrays, mixed freely.
        `base=True` ignores the personalization. A photo that cannot be read raises
        LuncherError naming it; `predict_each` reports it and goes on instead.
        """
        results: list[Prediction] = []
        for item in self.predict_each(photos, base=base):
            if isinstance(item, ImageFailure):
                raise LuncherError(item.error)
            results.append(item)
        return results

    def predict_each(
        self, photos: PhotoInput | Iterable[PhotoInput], *, base: bool = False
    ) -> Iterator[Prediction | ImageFailure]:
        """Like `predict`, one result at a time as photos decode: a `Prediction`, or an
        `ImageFailure` for a photo that cannot be read."""
        check_options({"base": base})
        sources = image_stream(photos)
        return self._predictor(base=base).predict(sources)

    def _predictor(self, *, base: bool) -> Predictor:
        """The session over the current model, loaded again only when the state changes."""
        with self._predictor_lock:
            state = self._ready()
            key = (base, state.base, None if base else state.personal)
            predictor = self._predictors.get(key)
            if predictor is None:
                from healthyluncher.predictor import Predictor

                predictor = Predictor(self._store, use_base=base)
                self._predictors = {k: p for k, p in self._predictors.items() if k[0] != base}
                self._predictors[key] = predictor  # one per `base`: a server asks for both
            return predictor

    # -- personalizing ---------------------------------------------------------------------

    def retrain(
        self,
        label: str,
        photos: PhotoInput | Iterable[PhotoInput],
        *,
        new_label: bool = False,
        epochs: Whole | None = None,
        learning_rate: Real | None = None,
        views: Whole | None = None,
        memory_strength: Real | None = None,
        save: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RetrainResult:
        """Teach the model that these photos are `label`, and retrain.

        A label the model does not have is refused unless `new_label=True`, which adds it.
        `epochs`, `learning_rate` and `views` (augmented views per photo) override the
        stored settings for this retrain; `save=True` keeps them as the settings of later
        retrains. `memory_strength` (default 40; 0 turns the memory of your examples off)
        is part of the model, so it is always kept. `progress` receives `Progress` events;
        an exception it raises cancels the retrain (nothing is saved) and comes out as is.

        A photo given twice (by content), or already taught as `label`, is skipped and
        listed in `duplicates`. When no photo is new and the settings are the last
        retrain's, nothing is retrained or saved (no undo step): `changed` is False.
        """
        from healthyluncher.personalizing import retrain

        self._check_overrides(epochs, learning_rate, views, memory_strength)
        return self._run(
            retrain,
            label,
            photo_sources(photos),
            new_label=new_label,
            epochs=epochs,
            learning_rate=learning_rate,
            augment_views=views,
            memory_strength=memory_strength,
            save=save,
            progress=progress,
        )

    def forget(
        self,
        photos: PhotoInput | Iterable[PhotoInput],
        *,
        progress: ProgressCallback | None = None,
    ) -> ForgetResult:
        """Remove these photos (matched by content) from your examples and retrain without
        them; the undo history is cleared so that they cannot come back (a photo only an
        undo step holds, one an import replaced, is forgotten by clearing it alone)."""
        from healthyluncher.teaching import forget

        return self._run(forget, photo_sources(photos, former=True), progress=progress)

    def undo(self) -> UndoResult:
        """Go back to the personalized model as it was before the last change."""
        from healthyluncher.personalizing import undo

        return self._run(undo)

    def reset(self, *, purge: bool = False) -> ResetResult:
        """Predict with the base again; `undo` brings the personalization back. `purge`:
        remove it, every undo step and your photos' thumbnails and cache for good."""
        check_options({"purge": purge})
        with self._lock:
            from healthyluncher.personalizing import reset

            return reset(self._store, purge=purge)  # works on a damaged directory

    def repair(self, *, progress: ProgressCallback | None = None) -> RepairResult:
        """Rebuild a damaged state.json from the newest complete state in the models
        directory, and remove what interrupted commands left behind; if the saved views of
        your photos are damaged, embed the photos again from their thumbnails."""
        check_options({"progress": progress})
        with self._lock:
            from healthyluncher.teaching import repair

            return repair(self._store, progress)

    def status(self) -> Status:
        """The base, your examples, the settings, the trainer and the disk used."""
        from healthyluncher.personalizing import status

        return self._read(status)

    def examples(self, label: str | None = None) -> list[TaughtExample]:
        """The photos you taught (of one label, if given), with their digests, file
        names, dates and thumbnails."""
        from healthyluncher.teaching import list_examples

        return self._read(list_examples, label)

    def label_info(self) -> list[LabelInfo]:
        """Every label, with how many of your photos have it and whether the base has it."""
        from healthyluncher.teaching import list_labels

        return self._read(list_labels)

    def rename_label(self, old: str, new: str) -> RenameResult:
        """Rename a label you added (`undo` reverses it)."""
        from healthyluncher.teaching import rename_label

        return self._run(rename_label, old, new)

    def remove_label(self, label: str, *, progress: ProgressCallback | None = None) -> ForgetResult:
        """Forget every example of `label` and retrain; a label you added goes with them
        (one without examples goes alone, and then `undo` brings it back)."""
        from healthyluncher.teaching import forget

        return self._run(forget, [], progress=progress, label=check_label(label))

    # -- backups ---------------------------------------------------------------------------

    def export_backup(self, path: str | os.PathLike[str], *, force: bool = False) -> ExportResult:
        """Write your personalization, examples and thumbnails to one .tar.gz (the name
        must end in .tar.gz or .tgz); an existing file is replaced only with `force`."""
        from healthyluncher.exporting import export_backup

        return self._run(export_backup, path_argument(path, "path"), force=force)

    def import_backup(
        self,
        path: str | os.PathLike[str],
        *,
        rebuild: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ImportResult:
        """Restore a backup written by `export_backup` (`undo` goes back). A backup of
        another base needs `rebuild=True`: its photos are embedded again and retrained."""
        from healthyluncher.backup import import_backup

        source = path_argument(path, "path")
        return self._run(import_backup, source, rebuild=rebuild, progress=progress)

    # -- plumbing --------------------------------------------------------------------------

    def _ready(self) -> State:
        """The current state, after setting up an empty models directory from the shipped
        base (only then are onnx and the training API imported)."""
        state = self._store.current_state()
        if state.base is not None:
            return state
        from healthyluncher.bases import ensure_base

        return ensure_base(self._store)

    def _read(self, operation: Callable[..., T], *args: Any) -> T:
        """A read: without the lock of changes, so it never waits for one that another
        thread is making (it sees the state before or after it, as `predict` does)."""
        self._ready()
        return operation(self._store, *args)

    def _run(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        check_options(kwargs)
        with self._lock:
            self._ready()
            return operation(self._store, *args, **kwargs)

    @staticmethod
    def _check_overrides(
        epochs: Whole | None,
        learning_rate: Real | None,
        views: Whole | None,
        memory_strength: Real | None = None,
    ) -> None:
        # Validated by Hyperparameters itself, before any photo is read.
        Hyperparameters().replace(
            epochs=epochs,
            learning_rate=learning_rate,
            augment_views=views,
            memory_strength=memory_strength,
        )


@functools.lru_cache(maxsize=16)  # a pickled Luncher: one per process (a pool's worker)
def _reopened(models_dir: Path, on_wait: Callable[[str], None] | None) -> Luncher:
    return Luncher(models_dir, on_wait=on_wait)  # so each task does not load sessions again


def make_updatable(
    model: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    trainable_layers: Whole = 1,
    models_dir: str | os.PathLike[str] | None = None,
    resize: Whole | None = None,
    mean: Sequence[Real] | np.ndarray | None = None,
    std: Sequence[Real] | np.ndarray | None = None,
    hyperparameters: Hyperparameters | None = None,
    replay: str | os.PathLike[str] | None = None,
    force: bool = False,
    keep_personalization: bool | None = None,
    int8: bool = False,
    calibration: str | os.PathLike[str] | None = None,
    examples: str | os.PathLike[str] | None = None,
    preprocessing: str | None = None,
    progress: ProgressCallback | None = None,
    balance_subfolders: bool = False,
) -> UpdatableResult:
    """Make an ONNX image classifier the base of a models directory: its last
    `trainable_layers` layers with weights train on your photos, the rest stays frozen.

    With a personalization present, `keep_personalization=True` carries it over to the
    new base (embedded again and retrained), `False` or `force=True` drops it, and `None`
    refuses. `int8` quantizes the frozen part, calibrated on the photos in `calibration`.

    `examples` is a folder with one subfolder of photos per label (Create ML's layout): the
    head is trained on them, with a new final layer when the labels are not the model's own
    (a stock 1000-class ImageNet export, say), and they become the base's replay set.
    Each label weighs the same in training; `balance_subfolders` makes each subfolder of a
    label (its dishes, say) weigh the same within it too.
    `preprocessing` names a pixel normalization ("imagenet", "inception", "unit", "raw").
    """
    from healthyluncher.bases import UpdatableOptions
    from healthyluncher.bases import make_updatable as build

    options = UpdatableOptions(
        labels=_in_order(labels, "labels", "names"),
        trainable_layers=plain_number(trainable_layers),
        resize=plain_number(resize),
        mean=_in_order(mean, "mean", "numbers"),
        std=_in_order(std, "std", "numbers"),
        hyperparameters=Hyperparameters() if hyperparameters is None else hyperparameters,
        replay=None if replay is None else path_argument(replay, "replay"),
        force=force or keep_personalization is False,
        keep_personalization=keep_personalization,
        int8=int8,
        calibration=None if calibration is None else path_argument(calibration, "calibration"),
        examples=None if examples is None else path_argument(examples, "examples"),
        balance_subfolders=balance_subfolders,
        preprocessing=preprocessing,
        progress=progress,
    )
    lun = open(models_dir)
    with lun._lock:
        return build(lun._store, path_argument(model, "model"), options)


def _in_order(values: Any, name: str, of: str) -> tuple[Any, ...] | None:
    """A list argument as a tuple (numpy's numbers as Python's). A set is refused: its order
    is not the caller's, and the labels would go to the model's outputs in a random one."""
    if values is None:
        return None
    if isinstance(values, str):
        raise LuncherError(f"{name} must be a list of {of}, not the string {values!r:.80}")
    unordered = isinstance(values, (bytes, AbstractSet, Mapping))  # a dict's keys are ordered
    if unordered != isinstance(values, type({}.keys())) or not isinstance(values, Iterable):
        kind = "a set, which has no order" if isinstance(values, AbstractSet) else None
        kind = kind or ("a dict" if isinstance(values, Mapping) else type(values).__name__)
        raise LuncherError(f"{name} must be a list of {of} in order, not {kind}")
    return tuple(map(plain_number, values))
