"""More of the command as scripts use it: option values left out, names from standard input,
labels that read as options, narrow encodings."""

from __future__ import annotations

import json

import pytest

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
