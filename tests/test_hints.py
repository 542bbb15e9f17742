"""The commands luncher suggests, followed as written: they act on the models directory the
user named, and work there."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import healthyluncher
from healthyluncher import segments
from healthyluncher.runtime import inference_session
from healthyluncher.store import Files, ModelStore
from tests.conftest import answered_at_a_terminal, one_line_error


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """X, a models directory named with --models-dir, while the default one (no
    $LUNCHER_MODELS_DIR: the user data directory of a home of its own) must stay untouched."""
    monkeypatch.delenv("LUNCHER_MODELS_DIR")
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    yield (tmp_path / "my models").resolve()
    assert not home.exists(), sorted(home.rglob("*"))  # the default models directory


def suggested(text: str, elsewhere: Path) -> dict[str, list[str]]:
    """Every `luncher ...` command in `text`, by its subcommand, as the arguments a shell
    gives it; each must name X right after `luncher`."""
    found = {}
    for command in re.findall(r"`(luncher [^`]*)`", text):
        assert command.startswith(f"luncher --models-dir {shlex.quote(str(elsewhere))} "), text
        words = shlex.split(command)[1:]
        found[" ".join(words[2:])] = words
    return found


def personalized(run, models_dir: Path) -> dict[str, object]:
    return run("--models-dir", models_dir, "status", "--json").json_lines()[0]


def _taught(run, pt_model, photos, at: Path) -> None:
    assert run("--models-dir", at, "make-updatable", pt_model).code == 0
    assert run("--models-dir", at, "retrain", "--label", "fast_food", photos["red"][0]).code == 0


def test_undo_suggested_for_a_damaged_model_acts_on_the_models_directory_given(
    run, pt_model, photos, elsewhere
):
    """`luncher --models-dir X predict` with X's personalized model damaged said to run
    `luncher undo` (and that `luncher predict --base` still works): followed as written,
    they opened the default models directory, someone else's models, not X."""
    _taught(run, pt_model, photos, elsewhere)
    personal = ModelStore(elsewhere).personal_dir()
    assert personal is not None
    (personal / Files.MODEL).write_bytes(b"torn")
    line = one_line_error(run("--models-dir", elsewhere, "predict", photos["red"][1]))
    commands = suggested(line, elsewhere)
    assert sorted(commands) == ["predict --base", "undo"], line
    assert run(*commands["undo"]).code == 0  # as written
    assert personalized(run, elsewhere)["predicting_with"] == "base"


def test_repair_suggested_for_damaged_views_acts_on_the_models_directory_given(
    run, pt_model, photos, elsewhere
):
    _taught(run, pt_model, photos, elsewhere)
    for segment in (elsewhere / segments.FOLDER).glob("*.npy"):
        segment.write_bytes(b"torn")
    retrain = ("retrain", "--label", "fast_food", photos["red"][1])
    line = one_line_error(run("--models-dir", elsewhere, *retrain))
    result = run(*suggested(line, elsewhere)["repair"])  # as written
    assert result.code == 0 and "embedded 1 photo(s) again" in result.stdout, result
    assert run("--models-dir", elsewhere, *retrain).code == 0


def test_reset_purge_suggested_by_forget_acts_on_the_models_directory_given(
    run, pt_model, photos, elsewhere
):
    """After a reset, forgetting a photo that only an undo step holds says how: `luncher
    undo`, then `luncher forget`, or `luncher reset --purge`; each named the default
    models directory."""
    _taught(run, pt_model, photos, elsewhere)
    assert run("--models-dir", elsewhere, "reset").code == 0
    result = run("--models-dir", elsewhere, "forget", photos["red"][0])
    commands = suggested(one_line_error(result), elsewhere)
    assert sorted(commands) == ["forget", "reset --purge", "undo"]
    assert personalized(run, elsewhere)["undo_steps"] > 0
    assert run(*commands["reset --purge"]).code == 0  # as written
    assert personalized(run, elsewhere)["undo_steps"] == 0


def test_the_notes_of_reset_name_the_models_directory_given(run, pt_model, photos, elsewhere):
    """`luncher --models-dir X reset` printed that the personalization is 'one `luncher
    undo` away': that undo, as written, undid nothing of X."""
    _taught(run, pt_model, photos, elsewhere)
    result = run("--models-dir", elsewhere, "reset")
    assert result.code == 0, result
    commands = suggested(result.stdout, elsewhere)
    assert sorted(commands) == ["reset --purge", "undo"], result.stdout
    assert personalized(run, elsewhere)["predicting_with"] == "base"
    assert run(*commands["undo"]).code == 0  # as written
    assert personalized(run, elsewhere)["predicting_with"] == "personalized"


def test_a_models_directory_from_the_environment_keeps_the_bare_command(
    run, pt_model, photos, elsewhere, monkeypatch
):
    """$LUNCHER_MODELS_DIR still applies when the user runs the suggestion."""
    _taught(run, pt_model, photos, elsewhere)
    monkeypatch.setenv("LUNCHER_MODELS_DIR", str(elsewhere))
    result = run("reset")
    assert "one `luncher undo` away; `luncher reset --purge` removes" in result.stdout, result
    assert run("undo").code == 0
    for segment in (elsewhere / segments.FOLDER).glob("*.npy"):
        segment.write_bytes(b"torn")
    result = run("retrain", "--label", "fast_food", photos["red"][1])
    one_line_error(result, "run `luncher repair` to embed your photos again")


def test_the_api_suggests_calls_not_command_lines(pt_model, photos, elsewhere):
    healthyluncher.make_updatable(pt_model, models_dir=elsewhere)
    lun = healthyluncher.open(elsewhere)
    lun.retrain("fast_food", photos["red"][:1])
    personal = ModelStore(elsewhere).personal_dir()
    assert personal is not None
    (personal / Files.MODEL).write_bytes(b"torn")
    with pytest.raises(healthyluncher.LuncherError) as caught:
        healthyluncher.open(elsewhere).predict(photos["red"][1:2])
    assert "`Luncher.undo()`" in str(caught.value) and "luncher " not in str(caught.value)


def test_the_question_of_reset_at_a_terminal_names_the_models_directory_given(
    run, pt_model, photos, elsewhere
):
    _taught(run, pt_model, photos, elsewhere)
    code, out, err = answered_at_a_terminal(b"y\n", "--models-dir", str(elsewhere), "reset")
    assert code == 0, err
    assert f"(`luncher --models-dir {shlex.quote(str(elsewhere))} undo` brings" in err.decode()


@pytest.mark.parametrize("answer", [b"y\n", b"n\n"])
def test_stdout_is_exactly_the_json_object_after_a_question(answer, run, pt_model, photos):
    """`luncher reset --json` at a terminal: click wrote the space after the question's
    colon to stdout (`input(" ")`), so the JSON line began with ' '. Questions and prompts
    go to stderr; stdout carries the object alone."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    code, out, err = answered_at_a_terminal(answer, "reset", "--json")
    assert code == (0 if answer == b"y\n" else 1), err
    [line] = out.decode().splitlines(keepends=True)
    assert line == json.dumps(json.loads(line), ensure_ascii=False) + "\n", out
    assert err.decode().startswith("Predict with the base model again"), err


def test_the_question_of_make_updatable_keeps_stdout_to_the_json(run, pt_model, photos):
    """`luncher make-updatable NEW.onnx --json` with a personalization, at a terminal,
    asks whether to keep it: that question's prompt put a space in front of the JSON."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    code, out, err = answered_at_a_terminal(b"n\n", "make-updatable", str(pt_model), "--json")
    assert code == 0, err
    assert err.decode().startswith("Keep your personalization on the new base"), err
    [line] = out.decode().splitlines(keepends=True)
    assert line.startswith("{") and json.loads(line)["dropped_personalization"] is True, out


@pytest.mark.parametrize("personal", [False, True], ids=["base alone", "personalized"])
def test_the_hint_to_make_a_base_with_your_labels_works_as_written(
    personal, run, pt_model, photos, tmp_path, elsewhere
):
    """`labels rename healthy salad` (a class of the base) says to make a base with your
    own labels with `luncher make-updatable MODEL.onnx --examples DIR`. Followed as
    written on a base that is not the shipped one, it was refused: 'a base model is already
    set up ...; use --keep-personalization ... or --force'."""
    at = ("--models-dir", elsewhere)
    assert run(*at, "make-updatable", pt_model).code == 0
    if personal:
        assert run(*at, "retrain", "--label", "pancakes", "--new-label", photos["red"][0]).code == 0
    lunches = tmp_path / "lunches"
    for label, colour in (("salad", "green"), ("fast_food", "red")):
        (lunches / label).mkdir(parents=True)
        for photo in photos[colour]:
            (lunches / label / photo.name).write_bytes(photo.read_bytes())
    line = one_line_error(run(*at, "labels", "rename", "healthy", "salad"))
    commands = suggested(line, elsewhere)
    assert sorted(commands) == ["make-updatable MODEL.onnx --examples DIR --force", "undo"]
    words = commands["make-updatable MODEL.onnx --examples DIR --force"]
    fill = {"MODEL.onnx": str(pt_model), "DIR": str(lunches)}
    result = run(*[fill.get(word, word) for word in words])  # as written
    assert result.code == 0, result
    assert sorted(personalized(run, elsewhere)["labels"]) == ["fast_food", "salad"]
    assert run(*at, "undo").code == 0  # what it replaced is one undo away
    labels = ["fast_food", "healthy", "pancakes"] if personal else ["fast_food", "healthy"]
    assert sorted(personalized(run, elsewhere)["labels"]) == labels


WHICH = {"base": "the base model", "personal": "the personalized model"}
# ONNX Runtime's own words: status codes, C++ sources and signatures.
ORT_TEXT = ("ONNXRuntimeError", "INVALID_PROTOBUF", "RUNTIME_EXCEPTION", ".cc:", ".h:", "::")


@pytest.mark.parametrize(
    ("which", "damage", "command", "says"),
    [
        ("base", Files.MODEL, "predict --base", "model.onnx is not a valid ONNX file"),
        ("base", Files.FROZEN, "retrain", "frozen.onnx is not a valid ONNX file"),
        ("base", Files.MODEL_DATA, "predict --base", "the weights file of model.onnx is cut short"),
        ("personal", Files.MODEL, "predict", "model.onnx is not a valid ONNX file"),
        ("personal", Files.MODEL_DATA, "predict", "the weights file of model.onnx is cut short"),
    ],
)
def test_a_damaged_model_file_is_one_plain_line_that_says_how_to_fix_it(
    which, damage, command, says, run, pt_model, photos, models_dir
):
    """'the base model in X is damaged (ONNX Runtime cannot load the model:
    [ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X/model.onnx
    failed:Protobuf parsing failed.)': ONNX Runtime's text, not what is wrong."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    store = ModelStore(models_dir)
    folder = store.base_dir() if which == "base" else store.personal_dir()
    assert folder is not None
    path = folder / damage
    path.write_bytes(b"torn" if damage.endswith(".onnx") else path.read_bytes()[:10])
    args = [*command.split(), *(["--label", "fast_food"] if command == "retrain" else [])]
    damaged = f"{WHICH[which]} in {folder} is damaged: {says}; "
    line = one_line_error(run(*args, photos["red"][1]), damaged)
    assert not [text for text in ORT_TEXT if text in line], line
    fix = "`luncher make-updatable MODEL.onnx --keep-personalization`"
    assert line.endswith(fix if which == "base" else "(`luncher predict --base` still works)")


def _graph(node: onnx.NodeProto, input_type: int = TensorProto.FLOAT, opset: int = 13) -> bytes:
    x = helper.make_tensor_value_info("x", input_type, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("my.domain", 1)]
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (b"torn", "the model is not a valid ONNX file"),
        (b"", "the model is not a valid ONNX file"),
        (
            _graph(helper.make_node("Foo", ["x"], ["y"], domain="my.domain")),
            "the model uses the op my.domain:Foo, which ONNX Runtime does not have",
        ),
        (
            _graph(helper.make_node("Softmax", ["x"], ["y"]), TensorProto.INT64),
            "ONNX Runtime cannot load the model: This is an invalid model. Type Error: ",
        ),
        (
            _graph(helper.make_node("Relu", ["x"], ["y"]), opset=99),
            "ONNX Runtime cannot load the model: ONNX Runtime only *guarantees* support",
        ),
    ],
    ids=["torn", "empty", "unknown op", "type error", "opset 99"],
)
def test_a_model_onnx_runtime_cannot_load_is_named_in_plain_words(model, says):
    with pytest.raises(healthyluncher.LuncherError) as caught:
        inference_session(model)
    message = str(caught.value)
    assert message.startswith(says) and "\n" not in message, message
    assert not [text for text in ORT_TEXT if text in message], message
