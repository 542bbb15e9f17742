"""Bases: make-updatable turns an ONNX classifier into a pristine base, or upgrades to one."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from onnx import numpy_helper

from healthyluncher import graph, jsonform
from healthyluncher.arguments import check_options
from healthyluncher.embedder import rebuild_examples
from healthyluncher.errors import LuncherError, Param
from healthyluncher.events import ProgressCallback
from healthyluncher.examples import copy_replay
from healthyluncher.fileio import read_model_file, write_json
from healthyluncher.headfit import (
    HeadReport,
    fit_new_head,
    needs_new_head,
    read_examples,
    replace_final_layer,
)
from healthyluncher.heads import build_template, write_back
from healthyluncher.linearhead import linear_head_of
from healthyluncher.meta import BaseMeta, LayerInfo
from healthyluncher.modelsetup import check_run, model_inputs, model_labels
from healthyluncher.personal import publish_personal
from healthyluncher.precision import float32_head, float32_input, scale_tensor
from healthyluncher.quantize import QuantizedBase, calibration_photos, quantize_base
from healthyluncher.records import (
    BUNDLED_REPLAY,
    Base,
    bundled_model,
    load_base,
    load_examples,
    load_personal,
    make_updatable_command,
    same_base,
    save_arrays,
)
from healthyluncher.runtime import head_batch_limit, inference_session
from healthyluncher.settings import Hyperparameters, check_argument
from healthyluncher.state import State
from healthyluncher.store import Files, ModelStore, Transaction
from healthyluncher.training import NEEDS_ORT, prepare_head, trainer_name


@dataclass(frozen=True)
class UpdatableOptions:
    labels: tuple[str, ...] | None = None
    trainable_layers: int = 1
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    hyperparameters: Hyperparameters = Hyperparameters()
    replay: Path | None = None  # an .npz of head inputs and labels from the base's training data
    force: bool = False
    # With a personalization: carry it over (True), drop it (False), or refuse unless `force`.
    keep_personalization: bool | None = None
    # Quantize the frozen part to int8 (static, per-channel), calibrated on the photos in
    # `calibration`. Opt-in: see results/int8.md for what it gains and costs.
    int8: bool = False
    calibration: Path | None = None
    # A folder with one subfolder of photos per label: the head is trained on them (a new
    # final layer when the labels are not the model's own), and they become the replay set.
    examples: Path | None = None
    balance_subfolders: bool = False  # each subfolder of a label weighs the same (headfit)
    preprocessing: str | None = None  # a preset of modelsetup.PRESETS
    progress: ProgressCallback | None = None

    def __post_init__(self) -> None:
        check_argument("trainable_layers", self.trainable_layers, int)
        check_argument("resize", self.resize, int, optional=True)
        check_argument("hyperparameters", self.hyperparameters, Hyperparameters)
        check_argument("keep_personalization", self.keep_personalization, bool, optional=True)
        check_argument("preprocessing", self.preprocessing, str, optional=True)
        check_options(vars(self))  # force, int8, balance_subfolders, progress


@jsonform.frozen_result
@dataclass(frozen=True)
class UpdatableResult:
    """The new base (`meta`: its meta.json), and what became of the personalization."""

    meta: BaseMeta
    directory: Path
    dropped_personalization: bool
    carried_over: dict[str, int] | None = None  # examples per label kept on the new base
    not_carried: int = 0  # examples whose thumbnail was missing or unreadable
    preprocessing_source: str = ""  # where the preprocessing came from (modelsetup.Inputs)
    examples: HeadReport | None = None  # what --examples trained
    replay_found: Path | None = None  # MODEL.replay.npz, found beside the model and used
    changed: bool = True  # False: the base in use, set up the same way (no new undo step)

    def to_json(self) -> dict[str, Any]:
        """As `luncher make-updatable --json` prints it (JSON values)."""
        form: dict[str, Any] = jsonform.to_json(
            {
                "directory": self.directory,
                "base": self.meta,
                "preprocessing_source": self.preprocessing_source,
                "examples": self.examples,
                "dropped_personalization": self.dropped_personalization,
                "carried_over": self.carried_over,
                "not_carried": self.not_carried,
                "changed": self.changed,
            }
        )
        return form


def make_updatable(
    store: ModelStore,
    model_path: Path,
    options: UpdatableOptions,
    *,
    bundled: bool = False,
) -> UpdatableResult:
    if options.int8 and options.calibration is None:
        raise LuncherError(
            Param("int8", True),
            " needs ",
            Param("calibration", example="DIR"),
            ", photos like the ones you will classify, to measure the ranges of the int8 "
            "activations",
        )
    if options.calibration is not None and not options.int8:
        raise LuncherError(Param("calibration"), " is only used with ", Param("int8", True))
    if options.balance_subfolders and options.examples is None:
        raise LuncherError(
            Param("balance_subfolders", True), " is only used with ", Param("examples")
        )
    found = None
    # Path(".") and Path("/") have no name to change the suffix of (ValueError): not a model
    # file, which loading it says in one line.
    beside = model_path.with_suffix(".replay.npz") if model_path.name else model_path
    if options.replay is None and options.examples is None and os.path.isfile(beside):
        # A base's replay set travels beside it (the shipped one does): without it, a
        # personalization of this base forgets what the base knew.
        options = replace(options, replay=beside)
        found = beside
    with store.transaction() as txn:
        state = txn.state
        keep = bool(options.keep_personalization) and state.personal is not None
        existing_is_replaceable = True
        # Asked to keep a personalization there is none of: nothing is lost (undo goes back).
        if state.base is not None and not options.keep_personalization and not options.force:
            existing_is_replaceable = load_base(store, state).meta.bundled and not state.personal
        if not existing_is_replaceable and not options.force:
            raise LuncherError(
                f"a base model is already set up in {store.root}; use ",
                Param("keep_personalization", True),
                " to move your examples to the new base, or ",
                Param("force", True),
                " to replace it and remove the personalization",
            )
        built = _build(txn, model_path, options, bundled=bundled)
        current = _intact_base(store, state) if keep or not state.personal else None
        if current is not None and same_base(current, built.directory):
            # The base in use, set up the same way: no second copy, no retrain, and no undo
            # step that would push a real one out of the history. The copy just built is
            # named by no state, so it goes.
            txn.commit(state)
            result = replace(built, meta=current.meta, directory=current.path, changed=False)
        elif keep:
            result = _upgrade(txn, built)
        else:
            # The old base and its personalization stay an undo step away (their thumbnails
            # and cached head inputs with them); `reset` or three more steps let them go.
            txn.commit(state.with_base(built.directory.name, None))
            result = replace(built, dropped_personalization=state.personal is not None)
    return replace(result, replay_found=found)


def _intact_base(store: ModelStore, state: State) -> Base | None:
    """The base in use, None when there is none or it is damaged (which a new one mends)."""
    try:
        return load_base(store, state) if state.base is not None else None
    except LuncherError:
        return None


def _upgrade(txn: Transaction, built: UpdatableResult) -> UpdatableResult:
    """Embed the kept thumbnails with the new base just built, retrain with the same
    settings, and switch base and personalization in one state change. Until that switch,
    the old base and personalization stay current, so a crash at any point leaves them
    working."""
    store = txn.store
    personal = load_personal(store, txn.state)
    assert personal is not None
    old = load_examples(personal, ())
    new_base = Base(built.directory, built.meta)
    hp = personal.meta.hyperparameters
    examples, missing = rebuild_examples(
        store, new_base, old.digests, old.labels, hp, made_with=personal.meta.labels
    )
    if len(examples) == 0:
        raise LuncherError(
            "none of your examples have a thumbnail to embed with the new base; use ",
            Param("force", True),
            " to replace the base without them",
        )
    labels = built.meta.labels + tuple(
        dict.fromkeys(label for label in examples.labels if label not in built.meta.labels)
    )
    fitted = publish_personal(txn, new_base, labels, examples, hp)
    # Base and personalization switch together, in one write of state.json (undo: the old).
    txn.commit(txn.state.with_base(built.directory.name, fitted.name))
    # What building the base found (its preprocessing's source, the --examples report)
    # is reported as for a fresh base, with what became of the personalization.
    return replace(built, carried_over=examples.per_label(), not_carried=missing)


def ensure_base(store: ModelStore) -> State:
    """The current state, after initializing an empty models directory from the shipped
    base model."""
    state = store.current_state()
    if state.base is not None:
        return state
    shipped = bundled_model()
    if shipped is None:
        raise LuncherError(
            f"there is no base model in {store.root} yet: run ", make_updatable_command(store.root)
        )
    with store.transaction() as txn:
        if txn.state.base is None:  # another process may have done it meanwhile
            replay = shipped.with_name(BUNDLED_REPLAY)
            options = UpdatableOptions(replay=replay if replay.is_file() else None)
            built = _build(txn, shipped, options, bundled=True)
            txn.commit(txn.state.with_base(built.directory.name, None))
    return store.current_state()


def _build(
    txn: Transaction,
    model_path: Path,
    options: UpdatableOptions,
    *,
    bundled: bool,
) -> UpdatableResult:
    """Write a new base directory (published, not yet current: the caller commits)."""
    store = txn.store
    photos = calibration_photos(options.calibration) if options.calibration else []
    raw = read_model_file(model_path)
    model = graph.load_model(model_path)
    graph.normalize_versions(model)
    float32_input(model)  # a float16 image input: float32 in, a Cast to float16 first
    analysis = graph.analyze(model)
    examples = None
    if options.examples is not None:
        examples = read_examples(options.examples, options.balance_subfolders)
    replaced = False
    if examples is None:
        labels = model_labels(options.labels, analysis)
    else:
        named = options.labels or graph.metadata_labels(analysis.metadata)
        if named is not None and len(named) != analysis.num_classes:
            named = None
        replaced = needs_new_head(named, examples.labels)
        if replaced:  # a stock 1000-class export, say: a final layer for these labels
            if options.labels is not None and set(options.labels) == set(examples.labels):
                examples = examples.in_order(options.labels)  # --labels names their order
            replace_final_layer(model, analysis.num_classes, len(examples.labels))
            analysis = graph.analyze(model)
            labels = examples.labels
        else:  # the model's own classes: fine-tune its head, in its order
            labels = model_labels(named, analysis)
            examples = examples.in_order(labels)
    inputs = model_inputs(
        analysis,
        preset=options.preprocessing,
        mean=options.mean,
        std=options.std,
        resize=options.resize,
    )
    prep = inputs.preprocessing
    cut = graph.split(model, analysis, options.trainable_layers)
    float32_head(model, cut)  # a float16 model trains its head in float32
    linear = linear_head_of(cut.head, cut.trainable_params)
    if linear is None and trainer_name() == "numpy":
        if options.trainable_layers > 1:
            raise LuncherError(
                f"training {options.trainable_layers} layers {NEEDS_ORT}; use ",
                Param("trainable_layers", 1),
                " here",
            )
        last = "training this model's last layer (it is not one Gemm or MatMul + Add)"
        raise LuncherError(f"{last} {NEEDS_ORT}")
    trainable = set(cut.trainable_params)
    layer_infos = tuple(
        LayerInfo(
            layer.name,
            layer.op,
            layer.params,
            trainable=any(name in trainable for name in layer.trainable_names),
        )
        for layer in analysis.layers
    )
    report = None
    replay_set = None
    if examples is not None:
        hp = options.hyperparameters
        with txn.staging(work=True) as work:
            params, replay_set, report = fit_new_head(
                cut, analysis, prep, examples, replaced, hp, work, options.progress
            )
        if report.input_scale != 1.0:  # head inputs too large for the default settings
            for target in (model, cut.frozen):
                assert target is not None  # only scaled where a frozen part exists
                scale_tensor(target, cut.split_tensor, report.input_scale)
        for target in (model, cut.head):
            write_back(target, params)
    model_bytes = model.SerializeToString()
    # Fail now, with a clear message, on anything ONNX Runtime cannot run.
    sample = check_run(inference_session(model_bytes), analysis, prep)
    frozen = cut.frozen
    identity = hashlib.sha256(raw)
    if report is not None:
        # A head trained on the user's photos: another base than the file alone (and,
        # when its inputs were scaled, another frozen part).
        identity.update(cut.head.SerializeToString())
        identity.update(np.float64(report.input_scale).tobytes())
    quantized: QuantizedBase | None = None
    if options.int8:
        assert options.calibration is not None
        with txn.staging(work=True) as work:
            quantized = quantize_base(model, cut, analysis, prep, photos, options.calibration, work)
        frozen = quantized.frozen
        model_bytes = quantized.model.SerializeToString()
        inference_session(model_bytes).run(None, {analysis.input.name: sample})
        # The int8 base embeds photos differently from the fp32 base of the same file, so
        # its identity (the cache of embeddings, backups) covers the quantized part too.
        identity.update(frozen.SerializeToString())

    with txn.staging() as staged:
        head_bytes = cut.head.SerializeToString()
        (staged / Files.HEAD).write_bytes(head_bytes)
        split_sample = sample
        if frozen is not None:
            session = inference_session(frozen.SerializeToString())
            split_sample = np.asarray(
                session.run(None, {analysis.input.name: sample})[0], dtype=np.float32
            )
        # The large frozen weights go to one file shared by model.onnx and frozen.onnx:
        # a retrain then writes a small model.onnx next to a copy of this file.
        full = quantized.model if quantized is not None else model
        parts = [full] if frozen is None else [full, frozen]
        data = graph.externalize(parts, set(cut.trainable_params), Files.MODEL_DATA)
        (staged / Files.MODEL_DATA).write_bytes(data)
        (staged / Files.MODEL).write_bytes(full.SerializeToString())
        if frozen is not None:
            (staged / Files.FROZEN).write_bytes(frozen.SerializeToString())
        batch_limit = head_batch_limit(head_bytes, split_sample)
        if linear is not None:  # the numpy trainer starts from these
            weights = {t.name: t for t in cut.head.graph.initializer}
            save_arrays(
                staged / Files.HEAD_WEIGHTS,
                {
                    name: numpy_helper.to_array(weights[name]).astype(np.float32)
                    for name in linear.param_names
                },
            )
        replay_count = 0
        if replay_set is not None:
            names = np.array([labels[i] for i in replay_set[1]], dtype=np.str_)
            arrays = {"inputs": replay_set[0], "labels": names, "weights": replay_set[2]}
            save_arrays(staged / Files.REPLAY, arrays)
            replay_count = len(names)
        elif options.replay is not None:
            replay_count = copy_replay(options.replay, staged / Files.REPLAY, labels, split_sample)
        meta = BaseMeta(
            name=model_path.stem,
            source="bundled" if bundled else str(model_path.resolve()),
            sha256=identity.hexdigest(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            bundled=bundled,
            labels=labels,
            preprocessing=prep,
            input_name=analysis.input.name,
            input_batch=analysis.input.batch,
            output_name=analysis.output_name,
            output_is_probability=analysis.output_is_probability,
            split_tensor=cut.split_tensor,
            has_frozen_part=frozen is not None,
            trainable_layers=options.trainable_layers,
            trainable_params=cut.trainable_params,
            layers=layer_infos,
            hyperparameters=options.hyperparameters,
            head_batch_limit=batch_limit,
            replay_examples=replay_count,
            int8=quantized is not None,
            calibration_photos=quantized.calibration_photos if quantized else 0,
            linear_head=linear.to_json() if linear is not None else None,
        )
        try:  # what every later read would refuse (a control character in a name): not written
            BaseMeta.from_json(meta.to_json())
        except LuncherError as exc:
            why = str(exc).removeprefix("meta.json: ")
            raise LuncherError(f"{model_path} cannot be a base: {why}") from None
        prepare_head(meta, cut.head, staged / Files.ARTIFACTS, options.hyperparameters)
        template = build_template(
            full, cut.head, cut.trainable_params, cut.split_tensor, len(labels)
        )
        template.save(staged / Files.TEMPLATE)
        write_json(staged / Files.META, meta.to_json(), durable=False)  # publish fsyncs it
        name = txn.publish(staged, "base")
    return UpdatableResult(
        meta=meta,
        directory=store.root / name,
        dropped_personalization=False,
        preprocessing_source=inputs.source,
        examples=report,
    )
