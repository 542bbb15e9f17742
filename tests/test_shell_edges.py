"""More of the command as scripts use it: option values left out, names from standard input,
labels that read as options, narrow encodings."""

from __future__ import annotations

import json

import pytest

from tests.conftest import one_line_error
from tests.test_conventions import luncher


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--models-dir"],
        ["predict", "lunch.jpg", "--models-dir"],
        ["forget", "--json", "lunch.jpg", "--models-dir"],
    ],
)
def test_a_models_dir_option_without_its_value_is_named_not_taken_for_the_command(args):
    # `luncher predict lunch.jpg --models-dir $DIR` with DIR unset: the option was moved in
    # front of the command, took the command for its value, and the error was "No such
    # command 'lunch.jpg'." (or "Missing command.", or "No such option: --json").
    done = luncher(*args)
    assert done.returncode == 2, done
    assert "Option '--models-dir' requires an argument." in done.stderr, done.stderr
    for wrong in ("No such command", "Missing command", "No such option"):
        assert wrong not in done.stderr, done.stderr
    if "--json" in args:
        assert json.loads(done.stdout) == {"error": "Option '--models-dir' requires an argument."}
    else:
        assert done.stdout == ""


def test_a_label_that_reads_as_an_option_is_never_made(run, pt_model, photos):
    # `luncher retrain --new-label --label $LABEL --epochs 3 photos/` with LABEL unset made
    # a class named '--epochs' (3 skipped as an unreadable photo), which every command that
    # takes a label then read as an option.
    assert run("make-updatable", pt_model).code == 0
    red = photos["red"][0].parent
    for args in (
        ["retrain", "--new-label", "--label", "--epochs", "3", red],
        ["retrain", "--new-label", "--label=-q", red],
    ):
        line = one_line_error(run(*args), "begins with '-'")
        assert "option" in line, line
    assert run("retrain", "--new-label", "--label", "pancakes", red).code == 0
    one_line_error(run("labels", "rename", "pancakes", "--", "--json"), "begins with '-'")
    listed = run("labels", "--json").json_lines()[0]["labels"]
    assert [x["label"] for x in listed] == ["healthy", "fast_food", "pancakes"]
    # Where the model is made: --labels.
    one_line_error(
        run("make-updatable", pt_model, "--force", "--labels=-healthy,fast_food"),
        "begins with '-'",
    )
