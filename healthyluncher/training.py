"""The one trainer interface: ONNX Runtime's training artifacts wherever they exist, else numpy.

The head trains through `fit`, whichever trainer this environment has. ONNX Runtime's
on-device training (onnxruntime-training-cpu 1.19.2, the last release, CPython 3.10 to 3.12)
is the engine wherever it is installed. Elsewhere (CPython 3.13 and 3.14, or plain
onnxruntime) the numpy trainer retrains a head that is one linear layer, with the same loss,
optimizer, sampling and batches (tests/test_numpy_trainer.py checks they agree). Training
more than the last layer needs ONNX Runtime.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from healthyluncher.errors import MAKE_UPDATABLE_KEEPING, LuncherError, Param
from healthyluncher.fileio import numpy_problem, regular
from healthyluncher.meta import BaseMeta
from healthyluncher.records import make_updatable_command
from healthyluncher.runtime import training_available, training_installed
from healthyluncher.settings import Hyperparameters
from healthyluncher.store import Files
from healthyluncher.trainers import EpochCallback, TrainingSet, generate_artifacts
from healthyluncher.trainers import save_checkpoint_with as ort_checkpoint
from healthyluncher.trainers import train as ort_train

if TYPE_CHECKING:
    from healthyluncher.linearhead import LinearHead

# "numpy" forces the numpy trainer where ONNX Runtime training exists too (the test suite
# runs once with each); "onnxruntime" insists on ONNX Runtime.
TRAINER_ENV = "LUNCHER_TRAINER"
NEEDS_ORT = (
    "needs ONNX Runtime's training package (onnxruntime-training-cpu, which exists for "
    "CPython 3.10 to 3.12 only)"
)


def trainer_name(*, cheap: bool = False) -> str:
    """What trains the head here: "onnxruntime" or "numpy". `cheap` looks at what is
    installed without importing ONNX Runtime (status needs no more)."""
    wanted = os.environ.get(TRAINER_ENV, "")
    if wanted not in ("", "numpy", "onnxruntime"):  # a typo must not pick a trainer silently
        raise LuncherError(f"{TRAINER_ENV}={wanted!r}: use numpy or onnxruntime, or unset it")
    if wanted == "numpy":
        return "numpy"
    if training_installed() if cheap else training_available():
        return "onnxruntime"
    if wanted == "onnxruntime":
        raise LuncherError(f"{TRAINER_ENV}=onnxruntime, but training {NEEDS_ORT}")
    return "numpy"


def trainer_for(meta: BaseMeta, base_dir: Path, *, cheap: bool = False) -> str:
    """What trains this base's head here: the environment's trainer, except for a base made
    where the numpy trainer trained (no ONNX Runtime training files), whose head the numpy
    trainer trains wherever it runs. Writing the missing files would change the pristine
    base (a new base directory, its weights copied) or cost every retrain 0.2 to 0.5 s to
    generate them again, for weights the numpy trainer matches within 3e-7. A base whose
    head is more than one linear layer has no such choice: without them it is damaged."""
    name = trainer_name(cheap=cheap)
    if name == "numpy" or (base_dir / Files.ARTIFACTS).is_dir():
        return name
    # Cheap: a base from an earlier version without meta's linear head is taken at its word.
    linear = meta.trainable_layers == 1 if cheap else linear_head(meta, base_dir) is not None
    if not linear:
        return name  # its training files are missing: `train` says it is damaged
    if os.environ.get(TRAINER_ENV) == "onnxruntime":
        if cheap:  # status names the trainer insisted on; a retrain says why it cannot
            return name
        raise LuncherError(
            f"{TRAINER_ENV}=onnxruntime, but this base has no ONNX Runtime training files "
            "(it was made with the numpy trainer); unset it, or run ",
            make_updatable_command(base_dir.parent, MAKE_UPDATABLE_KEEPING),
            " here to make them",
        )
    return "numpy"


@dataclass(frozen=True)
class Trained:
    params: dict[str, np.ndarray]
    final_loss: float
    # Writes ONNX Runtime's checkpoint of these weights (None: the numpy trainer has none).
    save_checkpoint: Callable[[Path], None] | None


def check_trainable(meta: BaseMeta, base_dir: Path) -> None:
    """Refuse a base that the trainer here cannot retrain (it can still predict)."""
    if trainer_for(meta, base_dir) == "numpy" and linear_head(meta, base_dir) is None:
        raise LuncherError(
            f"this base trains its last {meta.trainable_layers} layer(s); retraining it "
            f"{NEEDS_ORT}. It still predicts here"
        )


def prepare_head(
    meta: BaseMeta,
    head: object,
    directory: Path,
    hp: Hyperparameters,
    base_dir: Path | None = None,
) -> None:
    """What the trainer here needs of a new head, or of the head of `base_dir` grown, written
    into `directory`: ONNX Runtime's training artifacts; the numpy trainer needs nothing."""
    trainer = trainer_name() if base_dir is None else trainer_for(meta, base_dir)
    if trainer == "onnxruntime":
        generate_artifacts(head, meta.trainable_params, hp.optimizer, directory)


def fit(
    base_dir: Path,
    meta: BaseMeta,
    classes: int,
    artifact_dir: Path,
    data: TrainingSet,
    hp: Hyperparameters,
    on_epoch: EpochCallback | None = None,
) -> Trained:
    """Train the head (grown to `classes`) from the base's weights."""
    if trainer_for(meta, base_dir) == "onnxruntime":
        trained = ort_train(
            artifact_dir, data, hp, batch_limit=meta.head_batch_limit, on_epoch=on_epoch
        )
        return _finite(Trained(trained.params, trained.final_loss, trained.save_checkpoint))
    from healthyluncher.numpy_trainer import train_linear  # only where ORT does not train

    check_trainable(meta, base_dir)
    spec = linear_head(meta, base_dir)
    assert spec is not None  # check_trainable refused otherwise
    start = start_params(base_dir, meta, spec)
    extra = classes - spec.classes
    if extra > 0:
        start, spec = spec.grown(extra, start), spec.with_extra_classes(extra)
    params, loss = train_linear(
        spec, start, data, hp, batch_limit=meta.head_batch_limit, on_epoch=on_epoch
    )
    return _finite(Trained(params, loss, None))


def _finite(trained: Trained) -> Trained:
    """NaN or infinite weights (a diverged run, a damaged start) never become the model."""
    if not all(np.isfinite(value).all() for value in trained.params.values()):
        raise LuncherError(
            "training ended with weights that are NaN or infinite, so nothing was changed; "
            "a smaller ",
            Param("learning_rate"),
            " may help",
        )
    return trained


def fit_head(
    head: Any,
    trainable: tuple[str, ...],
    data: TrainingSet,
    hp: Hyperparameters,
    workdir: Path,
    *,
    batch_limit: int | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict[str, np.ndarray]:
    """Train a head (an onnx.ModelProto, from its own weights) that no base holds yet: the
    one `make-updatable --examples` builds. `workdir` receives ORT's artifacts;
    `batch_limit`: the one batch size the head runs on, if any (`head_batch_limit`)."""
    if trainer_name() == "onnxruntime":
        try:
            generate_artifacts(head, trainable, hp.optimizer, workdir)
        except OSError as exc:  # a full disk: the work folder is in the models directory
            raise LuncherError(
                f"cannot write training files to {workdir.parent}: {exc.strerror or exc}; "
                "nothing was changed"
            ) from None
        return ort_train(workdir, data, hp, batch_limit=batch_limit, on_epoch=on_epoch).params
    from healthyluncher.linearhead import linear_head_of
    from healthyluncher.numpy_trainer import train_linear

    spec = linear_head_of(head, trainable)
    if spec is None:
        raise LuncherError(f"training this head (more than one linear layer) {NEEDS_ORT}")
    from onnx import numpy_helper

    found = {t.name: t for t in head.graph.initializer}
    start = {
        name: numpy_helper.to_array(found[name]).astype(np.float32) for name in spec.param_names
    }
    params, _ = train_linear(spec, start, data, hp, batch_limit=batch_limit, on_epoch=on_epoch)
    return params


def checkpoint_writer(
    base_dir: Path, meta: BaseMeta, artifact_dir: Path, params: dict[str, np.ndarray]
) -> Callable[[Path], None] | None:
    """For restored weights: ONNX Runtime's checkpoint of them, where ORT trains the base."""
    if trainer_for(meta, base_dir) != "onnxruntime":
        return None
    return lambda target: ort_checkpoint(artifact_dir, params, target)


def linear_head(meta: BaseMeta, base_dir: Path | None = None) -> LinearHead | None:
    """The base's head as one linear layer: from meta.json, else (a base from an earlier
    version) read from its head.onnx."""
    from healthyluncher.linearhead import LinearHead, linear_head_of

    if meta.linear_head is not None:
        return LinearHead.from_json(meta.linear_head)
    if meta.trainable_layers != 1 or base_dir is None:
        return None
    import onnx  # a base from an earlier version: read its head once

    return linear_head_of(onnx.load(str(base_dir / Files.HEAD)), meta.trainable_params)


def start_params(base_dir: Path, meta: BaseMeta, spec: LinearHead) -> dict[str, np.ndarray]:
    """The base's trained weights of the linear head (float32)."""
    path = base_dir / Files.HEAD_WEIGHTS
    try:
        with np.load(regular(path), allow_pickle=False) as data:
            params = {name: data[name].astype(np.float32) for name in spec.param_names}
    except FileNotFoundError:
        import onnx
        from onnx import numpy_helper

        head = onnx.load(str(base_dir / Files.HEAD))
        found = {t.name: numpy_helper.to_array(t) for t in head.graph.initializer}
        params = {name: found[name].astype(np.float32) for name in spec.param_names}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        problem = numpy_problem(exc)
    else:
        if all(np.isfinite(value).all() for value in params.values()):
            return params
        problem = "weights not finite"
    again = make_updatable_command(base_dir.parent, MAKE_UPDATABLE_KEEPING)
    raise LuncherError(f"{path} is damaged ({problem}); make the base again with ", again)
