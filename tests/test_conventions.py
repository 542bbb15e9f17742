"""The command line people already know: gh/git/ruff conventions, and no surprises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from healthyluncher.cli_app import hoist_global_options
from healthyluncher.version import __version__
from tests.conftest import answered_at_a_terminal
from tests.models import pytorch_style

COMMANDS = (
    "make-updatable",
    "export",
    "import",
    "predict",
    "retrain",
    "reset",
    "undo",
    "forget",
    "status",
)


def luncher(
    *args: str, stdin: str | None = None, columns: int = 80
) -> subprocess.CompletedProcess[str]:
    """The real command, in a subprocess (as a shell runs it)."""
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "healthyluncher", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_version(run):
    result = run("--version")
    assert result.code == 0 and result.stdout.strip() == f"luncher (healthyluncher) {__version__}"


def test_shell_completion_is_offered(run):
    result = run("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_names_every_option_whole(command):
    result = luncher(command, "--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
    assert "…" not in result.stdout and "{" not in lines[0]  # no cut names, no {images}
    options = re.findall(r"--[a-z][a-z0-9-]+", result.stdout)
    assert options and all(not option.endswith("-") for option in options)


def test_global_options_may_follow_the_command(run, pt_model, photos, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    assert run("make-updatable", pt_model, "--models-dir", elsewhere).code == 0
    assert (elsewhere / "state.json").is_file()
    result = run("predict", f"--models-dir={elsewhere}", "--json", photos["red"][0])
    assert result.code == 0 and len(result.json_lines()) == 1
    assert hoist_global_options(["--models-dir", "x", "predict", "-q", "a.jpg"]) == [
        "--models-dir",
        "x",
        "-q",
        "predict",
        "a.jpg",
    ]
    assert hoist_global_options(["retrain", "--label", "x", "--", "--debug"]) == [
        "retrain",
        "--label",
        "x",
        "--",
        "--debug",
    ]


def test_json_before_the_command_is_the_commands(run, pt_model, photos):
    """`luncher --json status` said "No such option: --json (Possible options:
    --version)", as if no command took it; every command does."""
    assert hoist_global_options(["--json", "labels", "rename", "a", "b"]) == [
        "labels",
        "rename",
        "a",
        "b",
        "--json",
    ]
    assert hoist_global_options(["--json", "predict", "--", "-x.jpg"]) == [
        "predict",
        "--json",
        "--",
        "-x.jpg",
    ]
    assert run("make-updatable", pt_model).code == 0
    result = run("--json", "predict", photos["red"][0])
    assert result.code == 0 and len(result.json_lines()) == 1, result
    assert run("--json", "-q", "status").json_lines()[0]["labels"] == ["healthy", "fast_food"]


def test_every_command_speaks_json(run, pt_model, photos, tmp_path):
    made = run("make-updatable", pt_model, "--json")
    assert made.code == 0
    assert made.json_lines()[0]["base"]["labels"] == ["healthy", "fast_food"]
    taught = run("retrain", "--label", "délicieux 🥞", "--new-label", "--json", photos["red"][0])
    assert "délicieux 🥞" in taught.stdout  # non-ASCII kept readable
    assert taught.json_lines()[0]["new_label"] is True
    archive = tmp_path / "b.tar.gz"
    outputs = [
        run("export", archive, "--json"),
        run("forget", photos["red"][0], "--json"),
        run("import", archive, "--json"),
        run("undo", "--json"),
        run("import", archive, "--json"),
        run("reset", "--json"),
        run("status", "--json"),
    ]
    for result in outputs:
        assert result.code == 0, result
        assert len(result.json_lines()) == 1
    assert outputs[3].json_lines()[0]["restored"] == "base"
    assert outputs[5].json_lines()[0]["removed_model"] is True
    assert outputs[6].json_lines()[0]["predicting_with"] == "base"


def test_json_errors_are_json_too(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    missing = tmp_path / "nowhere.jpg"
    result = run("retrain", "--label", "healthy", "--json", missing)
    assert result.code == 1
    assert "cannot read" in result.json_lines()[0]["error"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["predcit", "--json", "x.jpg"], "No such command 'predcit'"),
        (["retrain", "--json", "--label", "healthy", "--epochs", "many", "x.jpg"], "--epochs"),
        (["predict", "--json"], "Missing argument"),
    ],
)
def test_json_usage_errors_are_json_too(args, fragment, models_dir):
    """A usage error (exit 2) printed click's text alone, even with --json."""
    result = luncher(*args)
    assert result.returncode == 2
    [line] = result.stdout.splitlines()
    assert fragment in json.loads(line)["error"]
    assert fragment in result.stderr and "Traceback" not in result.stderr


ABSURD = [
    ("retrain", "--epochs", "99999999999999999999"),
    ("retrain", "--epochs", "1001"),
    ("retrain", "--views", "99999999999999999999"),
    ("retrain", "--learning-rate", "1e400"),
    ("retrain", "--learning-rate", "1e300"),
    ("retrain", "--learning-rate", "nan"),
    ("retrain", "--learning-rate", "0"),
    ("retrain", "--memory-strength", "1e9"),
    ("retrain", "--memory-strength", "nan"),
    ("make-updatable", "--trainable-layers", "99999999999999999999"),
    ("make-updatable", "--trainable-layers", "10001"),
    ("make-updatable", "--resize", "99999999999999999999"),
    ("make-updatable", "--epochs", "99999999999999999999"),
    ("make-updatable", "--learning-rate", "inf"),
    ("make-updatable", "--batch-size", "99999999999999999999"),
    ("make-updatable", "--mean", "1e400,0,0"),
    ("make-updatable", "--std", "nan,1,1"),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize(("command", "option", "value"), ABSURD)
def test_absurd_or_overflowing_numbers_are_usage_errors(
    command, option, value, as_json, pt_model, photos, monkeypatch, capsys
):
    """`--epochs 99999999999999999999` exited 1 (the library's refusal) where `--epochs 1e9`
    exited 2: a number option past the API's bounds, NaN or an overflow (1e400 is inf) is a
    usage error now, before anything is read, in one line (JSON too with --json)."""
    from healthyluncher.cli import main

    target = photos["red"][0] if command == "retrain" else pt_model
    args = [command, option, value, *(["--label", "healthy"] if command == "retrain" else [])]
    args += ["--json"] if as_json else []
    monkeypatch.setattr(sys, "argv", ["luncher", *args, str(target)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    [error] = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert f"'{option}'" in error and "Traceback" not in captured.err
    if as_json:
        [line] = captured.out.splitlines()
        assert json.loads(line)["error"] == error.removeprefix("Error: ")
    else:
        assert captured.out == ""


def test_a_dash_reads_paths_from_stdin(pt_model, photos, models_dir):
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    listing = "\n".join(str(p) for p in photos["red"] + photos["green"]) + "\n"
    result = luncher("predict", "--json", "-", stdin=listing)
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["path"] for x in result.stdout.splitlines()] == listing.split()


def test_a_dash_reads_nul_separated_paths_as_find_print0_writes(pt_model, photos, tmp_path):
    """`find photos/ -print0 | luncher predict -` said `unexpected ValueError: embedded
    null byte`. NUL-separated paths are read as such: a file name cannot hold a NUL, and
    it may hold a newline (`find -print0` is how a script passes those)."""
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    odd = tmp_path / "two\nlines.jpg"
    odd.write_bytes(photos["green"][0].read_bytes())
    paths = [str(p) for p in photos["red"]] + [str(odd)]
    result = luncher("predict", "--json", "-", stdin="\0".join(paths) + "\0")
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["path"] for x in result.stdout.splitlines()] == paths
    result = luncher("retrain", "--label", "fast_food", "-", stdin="\0".join(paths))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names are bytes")
def test_a_dash_reads_file_names_that_are_not_utf8(pt_model, photos, tmp_path):
    """`find photos/ | luncher predict -` in a UTF-8 locale (standard input strict, as
    en_US.UTF-8 makes it) was 'unexpected UnicodeDecodeError' at a name in Latin-1: the
    names are read as the file system's bytes."""
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(name, "wb") as file:
        file.write(photos["red"][0].read_bytes())
    listing = b"\n".join([name, os.fsencode(photos["green"][0])]) + b"\n"
    for separator in (b"\n", b"\0"):
        done = subprocess.run(
            [sys.executable, "-m", "healthyluncher", "predict", "--json", "-"],
            input=listing.replace(b"\n", separator),
            capture_output=True,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
            check=False,
        )
        assert done.returncode == 0, done
        paths = [json.loads(line)["path"] for line in done.stdout.splitlines()]
        assert [os.fsencode(path) for path in paths] == listing.split(b"\n")[:2]


def test_quiet_prints_results_and_errors_only(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    loud = run("retrain", "--label", "fast_food", photos["green"][0])
    quiet = run("--quiet", "retrain", "--label", "fast_food", photos["green"][1])
    assert "Trained" in loud.stdout and "Trained" not in quiet.stdout
    assert "before" in quiet.stdout  # the result itself stays


def test_quiet_make_updatable_prints_its_result_not_its_layers(run, pt_model):
    loud = run("make-updatable", pt_model)
    quiet = run("--quiet", "make-updatable", pt_model, "--force", "--epochs", "7")
    assert loud.code == 0 and quiet.code == 0, (loud, quiet)
    assert "Layers of" in loud.stdout and "Preprocessing from" in loud.stdout
    (line,) = quiet.stdout.splitlines()  # each build has a folder of its own
    assert line.startswith("Base ready in") and line.endswith("training from tensor 'features'.")


def test_predict_prints_one_row_per_photo_as_it_goes(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    lines = run("predict", *photos["red"], *photos["green"]).stdout.splitlines()
    assert lines[0] == "Predictions (base model)"
    assert lines[1].split()[:3] == ["photo", "label", "probability"]
    assert len(lines) == 2 + 6


def test_ctrl_c_in_a_read_only_command_does_not_talk_about_changes(
    run, pt_model, photos, monkeypatch
):
    import healthyluncher.predictor as predictor

    assert run("make-updatable", pt_model).code == 0

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(predictor.Predictor, "predict", interrupted)
    result = run("predict", photos["red"][0])
    assert result.code == 130 and result.stderr.strip() == "interrupted"


def test_a_waiting_process_says_what_it_waits_for(pt_model, photos, models_dir):
    from healthyluncher.store import ModelStore

    assert luncher("make-updatable", str(pt_model)).returncode == 0
    holder = subprocess.Popen(  # holds the lock until its standard input closes
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path;"
            "from healthyluncher.store import ModelStore\n"
            f"with ModelStore(Path({str(models_dir)!r})).lock():\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    waiting = subprocess.Popen(
        [sys.executable, "-m", "healthyluncher", "retrain", "--label", "healthy"]
        + [str(photos["red"][0])],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert waiting.stderr is not None
    first = waiting.stderr.readline()  # blocks until the waiting process says something
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait()
    assert waiting.wait(timeout=120) == 0
    assert "another luncher process is changing" in first
    assert ModelStore(models_dir).read_state().personal is not None


def test_undo_after_make_updatable_brings_back_the_old_base_and_personalization(
    run, pt_model, photos, tmp_path
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    before = run("predict", "--json", *photos["green"]).json_lines()
    other = pytorch_style(tmp_path / "other.onnx", seed=5)
    assert run("make-updatable", other, "--force").code == 0
    assert run("status", "--json").json_lines()[0]["base_name"] == "other"
    undone = run("undo", "--json").json_lines()[0]
    assert undone["restored"] == "personalized"
    status = run("status", "--json").json_lines()[0]
    assert status["base_name"] == "tiny_pt" and status["examples_per_label"] == {"fast_food": 3}
    assert run("predict", "--json", *photos["green"]).json_lines() == before


def test_reset_names_thumbnails_as_thumbnails(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    result = run("reset", "--purge")
    assert "3 thumbnail(s)" in result.stdout
    assert run("reset").stdout.startswith("Nothing to reset")


def test_examples_lists_what_was_taught(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"][:2]).code == 0
    rows = run("examples", "--json").json_lines()
    assert [r["name"] for r in rows] == [p.name for p in photos["green"][:2]]
    assert all(r["label"] == "fast_food" and len(r["digest"]) == 64 for r in rows)
    assert all(Path(r["thumbnail"]).is_file() and r["taught"] for r in rows)
    assert run("examples", "--label", "healthy", "--json").stdout == ""
    table = run("examples").stdout
    assert photos["green"][0].name in table and rows[0]["digest"][:12] in table


def test_a_photo_whose_file_is_gone_is_forgotten_by_digest_or_thumbnail(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    rows = run("examples", "--json").json_lines()
    photos["green"][0].unlink()
    photos["green"][1].unlink()
    assert run("forget", rows[0]["digest"][:10]).code == 0
    assert run("forget", rows[1]["thumbnail"]).code == 0
    left = run("examples", "--json").json_lines()
    assert [r["digest"] for r in left] == [rows[2]["digest"]]
    assert not Path(rows[0]["thumbnail"]).exists() and not Path(rows[1]["thumbnail"]).exists()
    result = run("forget", "0123456789abcdef")
    assert result.code == 1 and "none of your examples has this digest" in result.stderr


def test_removing_a_label_with_a_typo_says_it_is_not_a_label(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "dessert", "--new-label", photos["red"][0]).code == 0
    typo = run("labels", "remove", "desert")  # was "there are no examples of 'desert'"
    assert typo.code == 1 and "'desert' is not a label" in typo.stderr, typo
    empty = run("labels", "remove", "healthy")
    assert empty.code == 1 and "there are no examples of 'healthy'" in empty.stderr, empty


def test_labels_are_listed_renamed_and_removed_and_undo_reverses(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "pancake", "--new-label", *photos["red"]).code == 0
    assert run("retrain", "--label", "healthy", photos["green"][0]).code == 0
    listed = run("labels", "--json").json_lines()[0]["labels"]
    assert [(x["label"], x["examples"], x["from_base"]) for x in listed] == [
        ("healthy", 1, True),
        ("fast_food", 0, True),
        ("pancake", 3, False),
    ]
    before = run("predict", "--json", *photos["red"]).json_lines()
    assert run("labels", "rename", "pancake", "pancakes").code == 0
    renamed = run("predict", "--json", *photos["red"]).json_lines()
    assert [r["label"] for r in renamed] == ["pancakes"] * 3
    assert [r["probability"] for r in renamed] == [r["probability"] for r in before]
    refused = run("labels", "rename", "healthy", "good")
    assert refused.code == 1 and "class of the base model" in refused.stderr
    assert run("undo").code == 0
    assert run("predict", "--json", *photos["red"]).json_lines() == before
    assert run("labels", "remove", "pancake").code == 0
    assert run("status", "--json").json_lines()[0]["labels"] == ["healthy", "fast_food"]
    assert run("examples", "--json").json_lines()[0]["label"] == "healthy"


def test_import_says_which_examples_it_replaced(run, pt_model, photos, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    archive = tmp_path / "b.tar.gz"
    assert run("export", archive).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"][:2]).code == 0
    result = run("import", archive)
    assert "replaced your previous examples (fast_food: 3, healthy: 2)" in result.stdout
    again = run("import", archive, "--json").json_lines()[0]
    assert again["changed"] is False and again["replaced"] == {}  # the backup is in use now


def test_predict_shows_a_progress_bar_at_a_terminal_for_many_photos(monkeypatch):
    import io

    from rich.console import Console

    from healthyluncher import cli_output

    # A terminal that redraws, whatever the environment the tests run in says: rich draws
    # no bar under TERM=dumb (or unknown), nor with TTY_INTERACTIVE=0.
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80)
    monkeypatch.setattr(cli_output.err, "_console", console)
    with cli_output.counting(3) as done:  # a few photos: no bar
        done()
    assert screen.getvalue() == ""
    with cli_output.counting(20) as done:
        for _ in range(20):
            done()
    assert "photos" in screen.getvalue() and "20/20" in screen.getvalue()


def _at_a_terminal(*args: str, answer: str) -> tuple[int, str]:
    """The real command with a pseudo-terminal as its standard input, answering `answer`
    to its question; (exit code, what it printed on stdout and stderr)."""
    code, out, err = answered_at_a_terminal(
        answer.encode() + b"\n", *args, env={**os.environ, "COLUMNS": "200"}
    )
    return code, (out + err).decode()


def test_reset_asks_at_a_terminal_and_can_be_undone(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    personalized = run("predict", "--json", *photos["red"]).json_lines()
    code, output = _at_a_terminal("reset", answer="n")
    assert (
        code == 1
        and "Predict with the base model again" in output
        and "Nothing was changed" in output
    )
    assert run("status", "--json").json_lines()[0]["predicting_with"] == "personalized"
    code, output = _at_a_terminal("reset", answer="y")
    assert code == 0 and "one `luncher undo` away" in output, output
    assert run("status", "--json").json_lines()[0]["predicting_with"] == "base"
    assert run("undo").code == 0
    assert run("predict", "--json", *photos["red"]).json_lines() == personalized
    # --yes, or no terminal (a script), does not ask.
    assert run("reset", "--yes").code == 0
    code, output = _at_a_terminal("reset", "--purge", answer="n")
    assert code == 1 and "for good" in output  # a purge asks too, and defaults to no


def test_a_typo_in_a_label_is_refused_with_the_closest_label(run, pt_model, photos):
    """Before, `retrain --label heathy` silently added a class for good."""
    assert run("make-updatable", pt_model).code == 0
    for typo, meant in (("heathy", "healthy"), ("Healthy", "healthy"), ("fastfood", "fast_food")):
        result = run("retrain", "--label", typo, *photos["red"])
        assert result.code == 1, result
        line = result.stderr.strip()
        assert f"did you mean {meant!r}?" in line and "--new-label" in line, line
    status = run("status", "--json").json_lines()[0]
    assert status["labels"] == ["healthy", "fast_food"] and status["predicting_with"] == "base"
    unknown = run("retrain", "--label", "dessert", *photos["red"])
    assert unknown.code == 1 and "did you mean" not in unknown.stderr
    assert "To add it as a new label, add --new-label" in unknown.stderr
    added = run("retrain", "--label", "dessert", "--new-label", *photos["red"])
    assert added.code == 0, added
    assert run("status", "--json").json_lines()[0]["labels"] == ["healthy", "fast_food", "dessert"]


def test_ctrl_c_while_the_command_loads_is_one_line_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C during start-up imports used to print a traceback (4 of 38 tries)."""
    import builtins

    import healthyluncher.__main__ as entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "healthyluncher.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        entry.run()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("how", ["luncher", "python -m healthyluncher"])
def test_ctrl_c_while_typer_builds_the_command_is_one_line_not_a_traceback(how, capsys):
    """Past the imports, typer builds the click command outside its own Ctrl-C handling:
    an interrupt there printed a traceback too."""
    from importlib.metadata import entry_points

    import typer.main

    import healthyluncher.__main__

    [script] = entry_points(group="console_scripts", name="luncher")
    run = script.load() if how == "luncher" else healthyluncher.__main__.run

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.main, "get_command", interrupted)
        patch.setattr(sys, "argv", ["luncher", "--version"])
        with pytest.raises(SystemExit) as exit_info:
            try:
                run()
            except KeyboardInterrupt:
                pytest.fail("Ctrl-C escaped the entry point: Python printed a traceback")
    assert exit_info.value.code == 130
    assert capsys.readouterr() == ("", "interrupted\n")


# A console script as pip writes it (`from MODULE import FUNCTION; sys.exit(FUNCTION())`),
# with a finder first on sys.meta_path that raises KeyboardInterrupt, as Ctrl-C would, when
# the `stop`-th module is imported (the entry point's own module aside: pip's script finds
# it before any code of the package can run); with `stop` 0 it counts the imports instead.
INTERRUPTED_START = """
import sys

stop, entry, function = int(sys.argv[1]), sys.argv[2], sys.argv[3]
imports = 0


class Interrupt:
    @staticmethod
    def find_spec(name, path=None, target=None):
        global imports
        if name != entry:
            imports += 1
            if imports == stop:
                raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, Interrupt)
sys.argv = ["luncher", *sys.argv[4:]]
try:
    run = getattr(__import__(entry, fromlist=[function]), function)
    sys.exit(run())
finally:
    if not stop:
        sys.stderr.write(f"imports: {imports}\\n")
"""


def test_ctrl_c_at_any_import_of_the_start_up_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C in the first ~12 ms of `luncher` printed a traceback: the console script
    imported `healthyluncher.__main__`, and with it the package's __init__ (and typing),
    before the entry point's guard. Each run here is interrupted at another import of the
    start-up (the first ones, then spread to the last), deterministically."""
    from importlib.metadata import entry_points

    [script] = entry_points(group="console_scripts", name="luncher")

    def start(stop: int) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", INTERRUPTED_START, str(stop), script.module]
        return subprocess.run(
            [*command, script.attr, "--version"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )

    counted = start(0)
    assert counted.returncode == 0 and __version__ in counted.stdout, counted.stderr
    total = int(counted.stderr.rsplit("imports: ", 1)[1])
    assert total > 50  # typer and the command's modules: the start-up was observed
    stops = sorted({*range(1, 6), *range(6, total + 1, max(1, total // 10)), total})
    for stop in stops:
        result = start(stop)
        assert result.returncode == 130, (stop, result.stderr)
        assert result.stderr in ("interrupted\n", ""), (stop, result.stderr)
        assert result.stdout == "", (stop, result.stdout)


def test_ctrl_c_after_the_switch_says_the_change_was_saved(run, pt_model, photos, monkeypatch):
    """Ctrl-C while `undo` or `reset` cleaned up after switching said "the models directory
    was not changed" (2 of 38 tries), though it had changed."""
    from healthyluncher.store import ModelStore

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0

    def interrupted(self, state):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelStore, "collect_garbage", interrupted)
        result = run("reset", "--yes")
    assert result.code == 130 and "after the change was saved" in result.stderr, result
    assert "not changed" not in result.stderr
    assert run("status", "--json").json_lines()[0]["predicting_with"] == "base"


def test_every_option_that_takes_a_value_names_it_in_words():
    """`--models-dir <given_path>` showed the name of a parser function, and the rest
    `<str>`, `<int range>` or `<float>` by typer's version: help now names what to type
    (`--epochs N`, `--label LABEL`, `--models-dir DIR`), as the README does."""
    import typer.main

    from healthyluncher.cli_app import app

    def commands(group, path=()):  # type: ignore[no-untyped-def]
        for name, command in getattr(group, "commands", {}).items():
            yield (*path, name), command
            yield from commands(command, (*path, name))

    root = typer.main.get_command(app)
    seen = 0
    for path, command in [((), root), *commands(root)]:
        for param in command.params:
            if param.param_type_name != "option" or param.is_flag or param.hidden:
                continue
            if param.name in ("install_completion", "show_completion"):
                continue
            choices = getattr(param.type, "choices", None)
            if choices:  # a choice lists its values
                continue
            seen += 1
            assert param.metavar and re.fullmatch(r"[A-Z][A-Za-z0-9_,.]*", param.metavar), (
                " ".join(path),
                param.opts,
                param.metavar,
            )
    assert seen >= 15
    text = luncher("--help").stdout + luncher("retrain", "--help").stdout
    assert "--models-dir DIR" in text and "--epochs N" in text
    assert not re.search(r"<[a-z_ ]+>", text)


def test_help_and_version_load_neither_numpy_nor_onnx_runtime():
    """`luncher --help` imported the API (and numpy with it) to quiet ONNX Runtime's logger
    before typer even parsed the line: 0.26 s against 0.14 in the bench."""
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['luncher', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('healthyluncher', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('numpy', 'onnxruntime', 'PIL') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    for args in (["--help"], ["--version"], ["retrain", "--help"]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=False
        )
        assert "HEAVY []" in done.stderr, (args, done.stderr[-300:])


def test_the_luncher_process_leaves_its_objects_to_the_exit_not_to_the_collector():
    """Python's garbage collections while it exits went over every object of typer, numpy
    and ONNX Runtime: 25 ms of CPU time per command. `luncher` freezes them at exit, after
    the command, so its output and the atexit handlers are as before; a program that calls
    the entry point in its own process is frozen only when it exits itself."""
    # Python 3.12 starts with some objects in the permanent generation already (375).
    probe = (
        "import atexit, gc, sys\n"
        "start = gc.get_freeze_count()\n"
        "atexit.register(lambda: print('FROZEN', gc.get_freeze_count() > start, file=sys.stderr))\n"
        "sys.argv = ['luncher', '--version']\n"
        "from healthyluncher.__main__ import run\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print('AFTER', gc.get_freeze_count() - start, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert __version__ in done.stdout
    assert "AFTER 0" in done.stderr and "FROZEN True" in done.stderr, done.stderr


def test_a_piped_retrain_imports_neither_rich_nor_onnx(run, pt_model, photos, models_dir):
    """The README: "A cached retrain never imports onnx, Pillow's image code or rich", and
    rich loads "only at a terminal". The summary's `escape` of the example counts imported
    rich.markup (and most of rich with it, about 40 ms) on every retrain, piped or not, and
    status, reset and undo printed their lines through a rich Console, piped too."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *map(str, photos["red"])).code == 0
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['luncher', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('healthyluncher', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert not stop.code, stop.code\n"
        "loaded = sorted(m for m in ('rich', 'onnx') if m in sys.modules)\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    # The same photos, the other label: every photo from the cache, and a real retrain.
    retrain = ["retrain", "--label", "fast_food", *map(str, photos["red"])]
    said = {}
    for args in (retrain, ["status"], ["reset", "--yes"], ["undo"]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=False
        )
        assert "LOADED []" in done.stderr, (args, done.stderr[-500:])
        said[args[0]] = done.stdout
    assert "Trained" in said["retrain"] and "came from the cache" in said["retrain"]
    assert "predicting with   the personalized model" in said["status"]
    assert "[" not in said["status"] + said["reset"] + said["undo"]  # no markup left
