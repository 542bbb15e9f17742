"""ONNX Runtime's training files: the library writes what generate_artifacts writes, in this
process when that changes nothing of the program's, else in a child Python."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import healthyluncher
from healthyluncher import artifacts, child, decompose, graph
from healthyluncher.runtime import _TRAINING_LOCK, _training_package, runtime, training_api
from healthyluncher.store import Files, ModelStore
from tests.conftest import needs_ort, require_ort_training
from tests.models import pytorch_style
from tests.test_cuts import _one_line_without_ort_text, _reduce_max
from tests.test_host_process import host


def canonical(model: onnx.ModelProto) -> bytes:
    """The model with its tensor names numbered in order of appearance and its node names
    dropped: onnxblock names what it adds from a counter of the whole process, so two runs
    of ONNX Runtime's own generator differ there too."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names: dict[str, str] = {}

    def number(name: str) -> str:
        return names.setdefault(name, f"t{len(names)}") if name else name

    copy.graph.name = ""
    for value in [*copy.graph.input, *copy.graph.output, *copy.graph.value_info]:
        value.name = number(value.name)
    for tensor in copy.graph.initializer:
        tensor.name = number(tensor.name)
    for node in copy.graph.node:
        node.name = ""
        inputs, outputs = [number(n) for n in node.input], [number(n) for n in node.output]
        del node.input[:], node.output[:]
        node.input.extend(inputs)
        node.output.extend(outputs)
    return copy.SerializeToString()


def head_of(path: Path, layers: int) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    model = graph.load_model(path)
    graph.normalize_versions(model)
    cut = graph.split(model, graph.analyze(model), layers)
    return decompose.for_training(cut.head), cut.trainable_params


@needs_ort
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("layers", [1, 2])
def test_the_training_files_are_the_ones_generate_artifacts_writes(tmp_path, optimizer, layers):
    """Only the graph builders' log level differs from generate_artifacts (which gives them
    none, so they wrote INFO lines to the process's stderr whatever the program set)."""
    require_ort_training()
    runtime()
    with _TRAINING_LOCK, _training_package():  # without onnxruntime/training/__init__.py
        from onnxruntime.training import artifacts as onnxruntime_artifacts

    head, trainable = head_of(pytorch_style(tmp_path / "tiny.onnx"), layers)
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    onnxruntime_artifacts.generate_artifacts(
        head,
        requires_grad=list(trainable),
        frozen_params=[],
        loss=onnxruntime_artifacts.LossType.CrossEntropyLoss,
        optimizer={
            "adamw": onnxruntime_artifacts.OptimType.AdamW,
            "sgd": onnxruntime_artifacts.OptimType.SGD,
        }[optimizer],
        artifact_directory=str(theirs),
    )
    artifacts._lower_ir_versions(theirs)
    artifacts.write(head, trainable, optimizer, ours)
    for name in artifacts.FILES:
        assert canonical(onnx.load(str(ours / name))) == canonical(onnx.load(str(theirs / name)))
    assert (ours / "checkpoint").read_bytes() == (theirs / "checkpoint").read_bytes()


@needs_ort
def test_without_a_root_handler_the_files_are_written_by_a_child_python(pt_model, models_dir):
    """onnxblock logs with logging.debug, which gives a root logger without a handler one
    (logging.basicConfig): the program's logging would change, so a child Python writes
    them, and the root logger is never touched."""
    added: list[logging.Handler] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.root, "handlers", [])
        patch.setattr(logging.root, "addHandler", added.append)
        ran = []
        real_run = child.run
        patch.setattr(child, "run", lambda *a, **k: ran.append(a[0]) or real_run(*a, **k))
        healthyluncher.make_updatable(pt_model, models_dir=models_dir)
        lun = healthyluncher.open(models_dir)
        assert logging.root.handlers == [] and added == []
    assert ran == ["healthyluncher.artifacts:child_job"]
    base = ModelStore(models_dir).base_dir()
    assert base is not None
    directory = base / Files.ARTIFACTS
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    api.Module(str(directory / "training_model.onnx"), state)
    assert lun.labels == ("healthy", "fast_food")


@needs_ort
def test_luncher_writes_training_files_in_its_own_process(pt_model, models_dir):
    """luncher's process is its own: a NullHandler on its root logger lets it write them
    without starting a child Python (about 1 s per make-updatable)."""
    done = host(
        """
        import subprocess, sys
        started = []
        real_run = subprocess.run
        subprocess.run = lambda *args, **kwargs: started.append(args) or real_run(*args, **kwargs)
        from healthyluncher.cli import main
        sys.argv = ["luncher", "make-updatable", sys.argv[1]]
        try:
            main()
        except SystemExit as done:
            assert not done.code, done.code
        print(len(started))
        """,
        pt_model,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0"
    assert (models_dir / "state.json").is_file()


@needs_ort
def test_what_onnx_runtime_refuses_in_the_child_is_the_same_one_line(run, tmp_path):
    model = _reduce_max(tmp_path / "m.onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decompose, "NO_GRADIENT", frozenset())  # ORT itself refuses it
        here = run("make-updatable", model, "--trainable-layers", "2")
        patch.setattr(logging.root, "handlers", [])
        there = run("make-updatable", model, "--trainable-layers", "2")
    assert here.code == there.code == 1
    assert _one_line_without_ort_text(there.stderr) == _one_line_without_ort_text(here.stderr)
    assert "ReduceMax ('channel_max') in the trainable part has no" in there.stderr


@needs_ort
def test_without_a_python_to_start_the_root_handler_added_meanwhile_goes_again(
    pt_model, models_dir
):
    """Where no child can be started (a frozen application, an embedded Python), the files
    are written here, and what logging.basicConfig added is removed when they are."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.root, "handlers", [])
        patch.setattr(child, "python", lambda: None)
        healthyluncher.make_updatable(pt_model, models_dir=models_dir)
        assert logging.root.handlers == []
    assert healthyluncher.open(models_dir).labels == ("healthy", "fast_food")


def test_a_child_that_dies_without_an_answer_is_one_line():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(child, "_BOOT", "import os; os._exit(3)")
        with pytest.raises(healthyluncher.LuncherError) as caught:
            child.run("healthyluncher.artifacts:child_job", {}, what="the generator")
    assert str(caught.value) == "the generator stopped unexpectedly (exit status 3)"


def test_a_child_runs_only_jobs_of_the_package():
    with pytest.raises(child.JobError) as caught:
        child.run("os:getcwd", {}, what="a job")
    assert caught.value.kind == "ValueError" and "not a job of ours" in caught.value.message


def test_a_child_imports_from_where_the_program_imports(tmp_path):
    """A program may have added to its import path (a notebook's sys.path.append): the
    child gets the program's path, the package's directory first, without the current
    directory."""
    commands: list[list[str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        patch.setattr(sys, "path", [*sys.path, ""])
        real_run = subprocess.run
        patch.setattr(
            subprocess,
            "run",
            lambda command, **kwargs: commands.append(command) or real_run(command, **kwargs),
        )
        with pytest.raises(child.JobError):
            child.run("os:getcwd", {}, what="a job")
    (command,) = commands
    path = json.loads(command[-1])
    assert path[0] == str(Path(child.__file__).resolve().parent.parent)
    assert str(tmp_path) in path and "" not in path


def test_a_childs_error_keeps_the_parameters_and_commands_it_names():
    """The child sends a LuncherError's parts; a suggested command (errors.Command) came
    back as text, in the API's words, to the command line too."""
    from healthyluncher import errors

    raising = (
        "; import healthyluncher.errors as e"
        "; e.job = lambda args, data: (_ for _ in ()).throw("
        "e.LuncherError('use ', e.Param('int8', True), ' or run ', e.UNDO))"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(child, "_BOOT", child._BOOT.replace("; healthyluncher.child.main()", ""))
        patch.setattr(child, "_BOOT", child._BOOT + raising + "; healthyluncher.child.main()")
        with pytest.raises(healthyluncher.LuncherError) as caught:
            child.run("healthyluncher.errors:job", {}, what="a job")
    assert caught.value.parts == ("use ", errors.Param("int8", True), " or run ", errors.UNDO)
    assert str(caught.value) == "use int8=True or run `Luncher.undo()`"
    assert caught.value.render(lambda p: "--int8") == "use --int8 or run `luncher undo`"
