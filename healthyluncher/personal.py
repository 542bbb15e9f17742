"""The personalized copy: rendering its models, writing it, and publishing it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher import weightsfile
from healthyluncher.errors import LuncherError
from healthyluncher.events import Progress, ProgressCallback
from healthyluncher.examples import (
    copy_memory,
    first_views,
    load_floors,
    load_replay,
    save_floors,
    training_set,
)
from healthyluncher.fileio import write_json
from healthyluncher.linearhead import LinearHead
from healthyluncher.memory import Memory, memory_bonus, personal_memory
from healthyluncher.meta import PersonalMeta
from healthyluncher.photos import PhotoSource
from healthyluncher.records import (
    Base,
    Examples,
    Personal,
    load_personal,
    load_scores,
    load_taught,
    load_weights,
    make_updatable_command,
    save_arrays,
    save_examples,
)
from healthyluncher.runtime import HeadRunner, softmax
from healthyluncher.settings import Hyperparameters
from healthyluncher.store import Files, Transaction
from healthyluncher.template import load as load_template
from healthyluncher.training import checkpoint_writer, fit, prepare_head, trainer_for

# Example photos a new copy scores at most besides those just taught (scoring all of them
# grew with every photo ever taught: 5,000 photos, 0.5 s of a 1.4 s retrain). The scores
# are only the next retrain's "before" of a photo taught again; the model answers for the
# others, with numpy where the head is linear.
MAX_SCORED = 256


@dataclass(frozen=True)
class Fitted:
    name: str  # the new personal directory
    final_loss: float
    scores: dict[str, np.ndarray]  # {digest: probabilities} of every example, after training


def publish_personal(
    txn: Transaction,
    base: Base,
    labels: tuple[str, ...],
    examples: Examples,
    hp: Hyperparameters,
    *,
    restore: tuple[dict[str, np.ndarray], PersonalMeta] | None = None,
    keep_history: bool = True,
    names: dict[str, str] | None = None,
    progress: ProgressCallback | None = None,
    remember: Hyperparameters | None = None,
    taught: dict[str, tuple[str, str]] | None = None,
) -> Fitted:
    """Train the head from the base's weights on the examples plus replay (or, with
    `restore`, take those exact weights and that meta), publish a new personalized copy in
    `txn`, and commit the state that makes it current: the one way a personalized copy is
    made, by retrain, forget, import and base upgrades alike.

    `remember`: the settings later retrains start from, when not `hp` (a one-off --epochs).
    `taught`: photos' file names and dates to keep beside the current copy's (an import's).

    Labels beyond the base's grow the head: old classes keep their weights, the new ones
    start at zero, and training artifacts for the grown head are written with the copy.
    """
    extra = len(labels) - len(base.meta.labels)
    with txn.staging() as staged:
        copying = weightsfile.copy_in_background(
            base.path / Files.MODEL_DATA, staged / Files.MODEL_DATA
        )
        try:
            artifact_dir = base.path / Files.ARTIFACTS
            if extra > 0:
                artifact_dir = staged / Files.ARTIFACTS
                previous_copy = load_personal(txn.store, txn.state)
                if not _reuse_grown_head(base, previous_copy, len(labels), hp, staged):
                    _grown_head(base, extra, hp, staged / Files.HEAD, artifact_dir)
            if restore is None:

                def on_epoch(epoch: int, total: int, loss: float) -> None:
                    if progress:
                        progress(Progress("training", epoch, total, loss))

                data = training_set(examples, load_replay(base), labels, hp)
                trained = fit(base.path, base.meta, len(labels), artifact_dir, data, hp, on_epoch)
                params, final_loss = trained.params, trained.final_loss
                save_checkpoint = trained.save_checkpoint
            else:
                params, final_loss = restore[0], restore[1].final_loss
                save_checkpoint = checkpoint_writer(base.path, base.meta, artifact_dir, params)
            if save_checkpoint is not None:  # ONNX Runtime's state, where it trains
                save_checkpoint(staged / Files.CHECKPOINT)
            previous = load_personal(txn.store, txn.state)
            memory = _memory_of(base, examples, labels, hp, previous)
            rendered = render_personal(base, labels, params, examples, hp, memory=memory)
            copying.join()  # write_model finds the weights file complete
            write_model(rendered, base, staged)
            save_arrays(staged / Files.WEIGHTS, params)
            origin, segment_names = save_examples(examples, staged / Files.EXAMPLES)
            if memory is not None:
                save_floors(staged / Files.FLOORS, memory, origin, segment_names)
            meta = PersonalMeta(
                base_sha256=base.meta.sha256,
                labels=labels,
                hyperparameters=remember or hp,  # the settings later retrains start from
                trained_with=hp if remember not in (None, hp) else None,
                trained_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                retrains=(previous.meta.retrains if previous else 0) + 1,
                examples_per_label=examples.per_label(),
                final_loss=final_loss,
            )
            if restore is not None:
                meta = replace(restore[1], examples_per_label=examples.per_label())
            # Staged files are made durable all at once by txn.publish (fsync_tree).
            write_json(staged / Files.META, meta.to_json(), durable=False)
            listed = {**load_taught(previous), **(taught or {})}
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            listed.update({digest: (name, now) for digest, name in (names or {}).items()})
            kept = {d: list(listed[d]) for d in examples.digests if d in listed}
            write_json(staged / Files.TAUGHT, kept, compact=True, durable=False)
            # The summary, and the "before" of these photos' next retrain without the model
            # (an older photo taught again is scored by the model then).
            which = _scored(examples, set(names or ()))
            probs = example_scores(base, labels, params, examples, hp, rendered, which, memory)
            digests = [examples.digests[i] for i in which]
            save_arrays(
                staged / Files.SCORES,
                {"digests": np.array(digests, dtype=np.str_), "probabilities": probs},
            )
        finally:
            copying.join()  # never leave it writing into a removed directory
        name = txn.publish(staged, "personal")
    txn.commit(txn.state.with_personal(name, keep_history=keep_history))
    scores = dict(zip(digests, probs, strict=True))
    return Fitted(name=name, final_loss=final_loss, scores=scores)


def _scored(examples: Examples, taught: set[str]) -> np.ndarray:
    """Indices of the photos a new copy scores: all up to MAX_SCORED, else the newest
    MAX_SCORED and those taught by this change."""
    chosen = set(range(max(0, len(examples) - MAX_SCORED), len(examples)))
    chosen.update(i for i, digest in enumerate(examples.digests) if digest in taught)
    return np.array(sorted(chosen), np.int64)


def example_scores(
    base: Base,
    labels: tuple[str, ...],
    params: dict[str, np.ndarray],
    examples: Examples,
    hp: Hyperparameters,
    rendered: PersonalModel,
    which: np.ndarray | None = None,
    memory: Memory | None = None,
) -> np.ndarray:
    """What the new copy says about the example photos at `which` (their first views; all
    of them when None: an import checks that the weights it takes give scores at all)."""
    inputs = first_views(examples) if which is None else first_views(examples)[which]
    probs = _numpy_probabilities(base, labels, params, examples, hp, inputs, memory)
    if probs is None:
        runner = HeadRunner(rendered.head, batch_limit=base.meta.head_batch_limit)
        return runner.probabilities(inputs)
    return probs


def _numpy_probabilities(
    base: Base,
    labels: tuple[str, ...],
    params: dict[str, np.ndarray],
    examples: Examples,
    hp: Hyperparameters,
    inputs: np.ndarray,
    memory: Memory | None = None,
) -> np.ndarray | None:
    """What a copy with these weights and examples says about head inputs, computed with
    numpy when its head is one linear layer, the memory in front of it: a retrain of cached
    photos then never starts ONNX Runtime where the numpy trainer trains, and no model is
    rendered. None for any other head (it runs in ONNX Runtime)."""
    spec = None
    if base.meta.linear_head is not None and inputs.ndim == 2:
        spec = LinearHead.from_json(base.meta.linear_head)
    if spec is None or len(labels) < spec.classes:
        return None
    spec = spec.with_extra_classes(len(labels) - spec.classes)
    logits = spec.logits(params, inputs)
    if _remembers(hp, examples):
        memory = memory or copy_memory(base, examples, labels, hp.memory_floor)
        logits += memory_bonus(inputs, memory, len(labels), hp.memory_strength, logits=logits)
    return softmax(logits.astype(np.float64))


def _memory_of(
    base: Base,
    examples: Examples,
    labels: tuple[str, ...],
    hp: Hyperparameters,
    cached: Personal | None,
) -> Memory | None:
    """The memory of a copy with these examples, or None when it has none; rows that
    `cached` (a copy of the same base) saved conflicts for are not compared again."""
    if not _remembers(hp, examples):
        return None
    return copy_memory(base, examples, labels, hp.memory_floor, load_floors(cached, base))


def _remembers(hp: Hyperparameters, examples: Examples) -> bool:
    """Whether the copy has a nearest-neighbour memory in front of its logits: the one rule
    the graphs (template or onnx) and the numpy scores follow alike."""
    return hp.memory_strength > 0 and len(examples) > 0


def _reuse_grown_head(
    base: Base, previous: Personal | None, classes: int, hp: Hyperparameters, staged: Path
) -> bool:
    """Copy the grown head and its training artifacts of the current copy into `staged`
    when they fit (the same base, class count and optimizer): generating them again costs
    a retrain with a label of your own 0.2 to 0.5 s. Their checkpoint holds the grown
    base's weights, the start of every retrain, not the copy's trained ones."""
    if previous is None or previous.meta.base_sha256 != base.meta.sha256:
        return False  # a copy of the old base, in an upgrade: its head is that base's
    if len(previous.meta.labels) != classes:
        return False
    if previous.meta.hyperparameters.optimizer != hp.optimizer:
        return False
    head, artifacts = previous.path / Files.HEAD, previous.path / Files.ARTIFACTS
    needs_artifacts = trainer_for(base.meta, base.path) == "onnxruntime"
    if not head.is_file() or (needs_artifacts and not artifacts.is_dir()):
        return False
    try:
        shutil.copyfile(head, staged / Files.HEAD)
        if needs_artifacts:
            shutil.copytree(artifacts, staged / Files.ARTIFACTS)
    except OSError:
        shutil.rmtree(staged / Files.ARTIFACTS, ignore_errors=True)
        return False
    return True


def _grown_head(
    base: Base, extra: int, hp: Hyperparameters, head_path: Path, artifact_dir: Path
) -> None:
    """The base's head with `extra` more classes, and its training artifacts."""
    import onnx

    from healthyluncher import heads

    head = onnx.load(str(base.path / Files.HEAD))
    heads.grow_classes(head, heads.class_axes(head, len(base.meta.labels)), extra)
    onnx.save(head, str(head_path))
    prepare_head(base.meta, head, artifact_dir, hp, base.path)


def personal_graphs(
    base: Base,
    labels: tuple[str, ...],
    params: dict[str, np.ndarray],
    examples: Examples,
    hp: Hyperparameters,
    *,
    with_model: bool = True,
    memory: Memory | None = None,
) -> tuple[Any, Any]:
    """(the full inference model, the head for scoring) with these weights and memory;
    without `with_model`, (None, the head).

    Labels beyond the base's grow the last layer first; the memory of the user's examples
    goes in front of the logits of both, so `predict` and the retrain summary agree. The
    full model is read without its external weights file: write it with `write_model`.
    """
    import onnx  # only for a base without a template, or one that grew new labels

    from healthyluncher import heads

    head = onnx.load(str(base.path / Files.HEAD))
    targets = [head]
    model = None
    if with_model:
        model = onnx.load(str(base.path / Files.MODEL), load_external_data=False)
        targets.append(model)
    logits = head.graph.output[0].name
    extra = len(labels) - len(base.meta.labels)
    if extra > 0:
        axes = heads.class_axes(head, len(base.meta.labels))
        for target in targets:
            heads.grow_classes(target, axes, extra)
    for target in targets:
        heads.write_back(target, params)
    if _remembers(hp, examples):
        memory = memory or copy_memory(base, examples, labels, hp.memory_floor)
        for target in targets:
            heads.add_memory(
                target, base.meta.split_tensor, logits, memory, len(labels), hp.memory_strength
            )
    return model, head


@dataclass(frozen=True)
class PersonalModel:
    """A personalized copy's models, serialized."""

    model: bytes | None  # the full inference model (external weights named in `locations`)
    head: bytes  # the head with the memory, for scoring head inputs
    locations: tuple[str, ...]


def render_personal(
    base: Base,
    labels: tuple[str, ...],
    params: dict[str, np.ndarray],
    examples: Examples,
    hp: Hyperparameters,
    *,
    with_model: bool = True,
    memory: Memory | None = None,
) -> PersonalModel:
    """The personalized models for these weights and examples: from the base's template
    when it fits (no onnx import), else built with onnx by `personal_graphs`; `memory`:
    the copy's memory, when the caller has it."""
    template = None
    if _remembers(hp, examples):
        template = load_template(base.path / Files.TEMPLATE)
        if template is None:  # a base of an older version: onnx, once
            from healthyluncher import heads

            template = heads.rebuild_template(base)
    if template is not None and template.num_classes == len(labels):
        memory = memory or copy_memory(base, examples, labels, hp.memory_floor)
        tensors = dict(params)
        tensors.update(personal_memory(memory, len(labels), hp.memory_strength))
        model_bytes, head_bytes = template.render(tensors)
        return PersonalModel(model_bytes if with_model else None, head_bytes, template.locations)
    from healthyluncher import heads  # onnx: only off the template's fast path

    model, head = personal_graphs(
        base, labels, params, examples, hp, with_model=with_model, memory=memory
    )
    if model is None:
        return PersonalModel(None, head.SerializeToString(), ())
    locations = tuple(sorted(heads.external_locations(model)))
    return PersonalModel(model.SerializeToString(), head.SerializeToString(), locations)


def write_model(personal: PersonalModel, base: Base, directory: Path) -> None:
    """Write a personalized model.onnx into `directory`, with a copy of the base's file of
    large frozen weights beside it: only the small graph is serialized on each retrain.
    (A copy, not a hard link: see weightsfile.py.)"""
    assert personal.model is not None
    for location in personal.locations:
        if Path(location).name != location:
            raise LuncherError(f"the base model names an unexpected weights file {location!r}")
        source, target = base.path / location, directory / location
        try:
            if target.is_file() and target.stat().st_size == source.stat().st_size:
                continue  # copied in the background while the head trained
            shutil.copyfile(source, target)
        except FileNotFoundError:
            missing = f"the base model's weights file is missing ({source}); run "
            again = make_updatable_command(base.path.parent)  # the models directory
            raise LuncherError(missing, again, " again") from None
    (directory / Files.MODEL).write_bytes(personal.model)


def current_probabilities(
    base: Base,
    personal: Personal | None,
    examples: Examples,
    inputs: np.ndarray,
    named: Sequence[tuple[PhotoSource, str]],
) -> np.ndarray:
    """What the current model (personalized or base) says about these head inputs (the
    first views of the photos `named`). Photos the personalized copy already scored when it
    was trained are looked up; the model runs only when some are new to it."""
    limit = base.meta.head_batch_limit
    if personal is None:
        return HeadRunner(base.path / Files.HEAD, batch_limit=limit).probabilities(inputs)
    known = load_scores(personal)
    if all(digest in known for _, digest in named):
        return np.stack([known[digest] for _, digest in named])
    meta = personal.meta
    params = load_weights(personal)
    hp = meta.hyperparameters
    memory = _memory_of(base, examples, meta.labels, hp, personal)
    probs = _numpy_probabilities(base, meta.labels, params, examples, hp, inputs, memory)
    if probs is not None:
        return probs
    rendered = render_personal(
        base, meta.labels, params, examples, hp, with_model=False, memory=memory
    )
    return HeadRunner(rendered.head, batch_limit=limit).probabilities(inputs)
