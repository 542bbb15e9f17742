"""More of the command as scripts use it: option values left out, names from standard input,
labels that read as options, narrow encodings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_plain_columns_line_up_where_the_output_escapes_characters(
    tmp_path, pt_model, photos, models_dir, encoding
):
    # With an output encoding that cannot hold a name (a C locale without UTF-8 mode,
    # Windows' code page in a redirected output), the name is written as \uXXXX escapes,
    # but its column was padded for the character: each such row was out of line.
    def run_with(*args: object) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONIOENCODING": encoding, "LUNCHER_MODELS_DIR": str(models_dir)}
        return subprocess.run(
            [sys.executable, "-m", "healthyluncher", *map(str, args)],
            capture_output=True,
            text=True,
            encoding="ascii" if encoding == "ascii" else "cp1252",
            env=env,
            cwd=tmp_path,
            check=False,
        )

    assert run_with("make-updatable", pt_model).returncode == 0
    assert run_with("retrain", "--new-label", "--label", "crème", photos["red"][0]).returncode == 0
    folder = tmp_path / "lunches"
    folder.mkdir()
    for name in ("café.png", "北京.png", "żurek.png", "plain.png"):
        shutil.copy(photos["green"][0], folder / name)
    done = run_with("predict", "lunches")
    assert done.returncode == 0, done
    header, *rows = done.stdout.splitlines()[1:]
    assert len(rows) == 4
    start = header.index("label")
    for row in rows:
        assert row[start - 2 : start] == "  " and row[start] != " ", (header, row)
    done = run_with("labels")
    header, *rows = done.stdout.splitlines()[1:]
    end = header.index("your photos") + len("your photos")
    for row in rows:
        assert row[end - 1].isdigit() and row[end : end + 2] == "  ", (header, row)


def test_names_read_from_standard_input_keep_their_spaces(tmp_path, pt_model, photos, models_dir):
    # `ls | luncher predict -` (or find's output) with 'lunch.png ' or ' lunch.png' in the
    # folder: each line was stripped, and the photo refused as 'lunch.png: cannot read: No
    # such file or directory'. A line is a name as it is, less a Windows line end.
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    names = [" leading.png", "trailing.png ", "crlf.png"]
    for name in names:
        shutil.copy(photos["red"][0], tmp_path / name)
    listing = " leading.png\ntrailing.png \ncrlf.png\r\n\n"
    done = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "predict", "--json", "-"],
        input=listing,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done
    assert [json.loads(line)["path"] for line in done.stdout.splitlines()] == names


def test_export_after_a_reset_names_undo_not_a_retrain(run, pt_model, photos, tmp_path):
    # After `reset`, export said "the model is not personalized (teach it with `luncher
    # retrain` first)": the personalization, one `luncher undo` away, was not named.
    assert run("make-updatable", pt_model).code == 0
    one_line_error(run("export", tmp_path / "fresh.tar.gz"), "luncher retrain")
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    assert run("reset").code == 0
    line = one_line_error(run("export", tmp_path / "b.tar.gz"), "`luncher undo`")
    assert "luncher retrain" not in line, line
    assert not (tmp_path / "b.tar.gz").exists()
    assert run("undo").code == 0
    assert run("export", tmp_path / "b.tar.gz").code == 0


def test_a_replay_file_that_cannot_be_read_says_why_in_words(run, pt_model, tmp_path):
    # 'error: /x/gone.npz: not a replay set ([Errno 2] No such file or directory:
    # '/x/gone.npz')': Python's exception text, with the name a second time.
    for given, why in ((tmp_path / "gone.npz", "No such file or directory"), (tmp_path, "")):
        line = one_line_error(run("make-updatable", pt_model, "--replay", given), "replay set")
        assert why in line and "Errno" not in line, line
        assert line.count(str(given)) == 1, line


def test_examples_of_a_label_without_photos_does_not_call_the_model_unpersonalized(
    run, pt_model, photos
):
    # `luncher examples --label fast_food` with photos taught only as 'healthy' said "No
    # examples: the model is not personalized." while status said it was.
    assert run("make-updatable", pt_model).code == 0
    assert run("examples").stdout == "No examples: the model is not personalized.\n"
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    done = run("examples", "--label", "fast_food")
    assert done.code == 0 and done.stdout == "No examples of 'fast_food'.\n", done
    assert run("--quiet", "examples", "--label", "fast_food").stdout == ""


def _at_a_terminal(*args: object, env: dict[str, str]) -> tuple[int, str]:
    """`luncher ARGS` with standard output and error on a terminal; (exit code, what the
    terminal showed)."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthyluncher", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the command has ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    return proc.wait(timeout=60), shown.decode("utf-8", "replace")


@pytest.mark.parametrize("columns", ["0", "00"])
def test_a_terminal_of_zero_columns_still_shows_results_and_errors(
    pt_model, photos, models_dir, columns
):
    # COLUMNS=0 at a terminal: rich drew every line at width 0, that is not at all:
    # `luncher status` showed nothing (exit 0), an error showed nothing (exit 1), and
    # `predict` showed its header without a row.
    env = {**os.environ, "COLUMNS": columns, "LUNCHER_MODELS_DIR": str(models_dir)}
    code, shown = _at_a_terminal("status", env=env)
    assert code == 1 and "error:" in shown and "no base model" in shown, shown
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    code, shown = _at_a_terminal("status", env=env)
    assert code == 0 and "predicting with" in shown, shown
    code, shown = _at_a_terminal("predict", photos["red"][0], env=env)
    assert code == 0 and "Predictions" in shown and "r0.png" in shown, shown


def _cells_of_rows(shown: str) -> list[list[str]]:
    """The cells of a rich table as a terminal shows it, each the pieces of its text joined
    over the lines its row takes (a new row starts where the first column has text)."""
    import re

    rows: list[list[str]] = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", shown).splitlines():
        if not line.startswith("│"):
            continue
        parts = [part.strip() for part in line.strip().strip("│").split("│")]
        if parts[0] or not rows:
            rows.append(parts)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], parts, strict=True)]
    return rows


def test_a_narrow_terminal_folds_the_examples_table_and_cuts_nothing(pt_model, photos, models_dir):
    # At a terminal narrower than the table, every column but the first was cut with '…':
    # the thumbnail path (`luncher forget THUMBNAIL` takes it) and the date were lost.
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    assert luncher("retrain", "--label", "healthy", *map(str, photos["red"])).returncode == 0
    listed = [json.loads(line) for line in luncher("examples", "--json").stdout.splitlines()]
    env = {**os.environ, "COLUMNS": "60", "LUNCHER_MODELS_DIR": str(models_dir)}
    code, shown = _at_a_terminal("examples", env=env)
    assert code == 0 and "…" not in shown, shown
    rows = _cells_of_rows(shown)
    assert sorted(row[4] for row in rows) == sorted(item["thumbnail"] for item in listed)
    assert sorted(row[3] for row in rows) == sorted(item["taught"] for item in listed)
    assert sorted(row[1] for row in rows) == sorted(item["digest"][:12] for item in listed)


def test_repair_of_a_sound_directory_does_not_claim_it_removed_something(run, pt_model):
    # 'state.json is intact; leftovers of interrupted commands were removed.' on a models
    # directory that had none.
    assert run("make-updatable", pt_model).code == 0
    done = run("repair")
    assert done.code == 0, done
    assert "were removed" not in done.stdout, done.stdout
    assert done.stdout == "state.json is intact, and nothing is left of interrupted commands.\n"


@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell closes the stream")
def test_a_closed_standard_error_loses_the_messages_not_the_command(pt_model, photos, models_dir):
    # `luncher retrain ... 2>&-` (a cron line, `exec 2>&-`): nothing was retrained, exit 1,
    # and no word on stdout; with --json the only output was '{"error": "unexpected
    # AttributeError: 'NoneType' object has no attribute 'isatty' ..."}'.
    def closed_stderr(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-m", "healthyluncher"]
            + [str(a) for a in args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**os.environ, "LUNCHER_MODELS_DIR": str(models_dir)},
            check=False,
        )

    assert closed_stderr("make-updatable", pt_model).returncode == 0
    done = closed_stderr("retrain", "--label", "healthy", photos["red"][0])
    assert done.returncode == 0 and "Probability of 'healthy'" in done.stdout, done
    done = closed_stderr("retrain", "--json", "--label", "fast_food", photos["green"][0])
    assert done.returncode == 0 and json.loads(done.stdout)["changed"] is True, done
    done = closed_stderr("predict", "--json", photos["red"][0], "gone.jpg")
    assert done.returncode == 1, done
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [set(line) for line in lines] == [
        {"path", "label", "probability", "probabilities"},
        {"path", "error"},
    ], lines
    assert closed_stderr("bogus").stdout == ""  # the usage error is not written to stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_messages_that_cannot_be_written_do_not_stop_the_command(pt_model, photos, models_dir):
    # Standard error on a full disk (`2>>log` there, or /dev/full): the first warning was
    # 'unexpected OSError: [Errno 28] No space left on device': predict stopped at the first
    # unreadable photo, and retrain saved the change but printed none of its summary.
    def full_stderr(*args: object) -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run(
                [sys.executable, "-m", "healthyluncher", *map(str, args)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=full,
                text=True,
                env={**os.environ, "LUNCHER_MODELS_DIR": str(models_dir)},
                check=False,
            )

    assert full_stderr("make-updatable", pt_model).returncode == 0
    done = full_stderr("predict", "--json", "gone.jpg", photos["red"][0])
    assert done.returncode == 1, done
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [sorted(line) for line in lines] == [
        ["error", "path"],
        ["label", "path", "probabilities", "probability"],
    ], done.stdout
    done = full_stderr("retrain", "--label", "fast_food", "gone.jpg", *photos["green"])
    assert done.returncode == 1 and "Probability of 'fast_food'" in done.stdout, done
    assert "Trained" in done.stdout and "unexpected" not in done.stdout, done


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--json"], "Missing command."),
        (["-q", "--json"], "Missing command."),
        (["--json", "--version"], None),
        (["--models-dir", "somewhere", "--json"], "Missing command."),
    ],
)
def test_json_without_a_command_is_not_called_an_unknown_option(args, said):
    # `luncher --json` said "No such option: --json (Possible options: --version)": every
    # command takes --json, and the command is what is missing.
    done = luncher(*args)
    assert "No such option" not in done.stderr + done.stdout, done
    if said is None:
        assert done.returncode == 0 and done.stdout.startswith("luncher (healthyluncher)"), done
    else:
        assert done.returncode == 2 and f"Error: {said}" in done.stderr, done
        assert json.loads(done.stdout) == {"error": said}


def test_quiet_tables_start_with_their_header_as_predict_does(run, pt_model, photos):
    # `luncher -q predict` starts with the header row (its title is a note), but `-q
    # examples`, `-q labels` and `-q retrain` kept their titles: `luncher -q examples | awk
    # 'NR>1 {print $2}' | luncher forget -` forgot 'digest' ('digest: cannot read').
    assert run("make-updatable", pt_model).code == 0
    retrained = run("-q", "retrain", "--label", "healthy", *photos["red"])
    assert retrained.code == 0
    first = {
        "predict": run("-q", "predict", photos["red"][0]).stdout.splitlines()[0],
        "retrain": retrained.stdout.splitlines()[0],
        "examples": run("-q", "examples").stdout.splitlines()[0],
        "labels": run("-q", "labels").stdout.splitlines()[0],
    }
    assert first["predict"].split()[:2] == ["photo", "label"], first
    assert first["retrain"].split() == ["photo", "before", "after"], first
    assert first["examples"].split() == ["label", "digest", "file", "taught", "thumbnail"], first
    assert first["labels"].split() == ["label", "your", "photos"], first
    # Without -q, every table has its title.
    assert run("examples").stdout.startswith("Your examples (3)\n")


def test_status_never_says_a_models_directory_holds_nothing(run, pt_model):
    # 'undo steps 0; the models directory holds 0.0 MiB' for a models directory of 14 kB
    # (export says '3767 bytes' of its archive).
    assert run("make-updatable", pt_model).code == 0
    size = run("status", "--json").json_lines()[0]["disk_bytes"]
    assert 0 < size < 2**20
    [line] = [x for x in run("status").stdout.splitlines() if x.startswith("undo steps")]
    assert line.endswith(f"the models directory holds {size} bytes"), line


def test_predict_names_each_photo_as_it_was_given(tmp_path, pt_model, photos, models_dir):
    # `find . -name '*.jpg' | luncher predict --json -` printed "path": "red/r0.png" for
    # ./red/r0.png (Python's Path drops './' and doubled slashes), so a script could not
    # match a result to its photo, and './-x.png' came back as '-x.png', an option.
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    (tmp_path / "red2").mkdir()
    shutil.copy(photos["red"][0], tmp_path / "red2" / "r0.png")
    shutil.copy(photos["red"][1], tmp_path / "-x.png")
    shutil.copy(photos["green"][0], tmp_path / "g.jpg")

    def predict(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "healthyluncher", "predict", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "LUNCHER_MODELS_DIR": str(models_dir)},
            check=False,
        )

    given = ["./-x.png", ".//g.jpg", "./red2/", "./gone.jpg"]
    expected = ["./-x.png", ".//g.jpg", "./red2/r0.png", "./gone.jpg"]
    for args, stdin in (((*given,), None), (("-",), "\n".join(given) + "\n")):
        done = predict("--json", *args, stdin=stdin)
        assert done.returncode == 1, done  # gone.jpg
        assert [json.loads(x)["path"] for x in done.stdout.splitlines()] == expected, done
    done = predict(*given[:3])
    assert done.returncode == 0, done
    assert [row.split()[0] for row in done.stdout.splitlines()[2:]] == expected[:3]


def test_a_label_from_an_examples_folder_name_cannot_begin_with_a_dash(
    run, pt_model, tmp_path, models_dir
):
    # `make-updatable --examples DIR` with a subfolder '-junk' made a class '-junk', although
    # a label given on the command line may not begin with '-': every command that names
    # the label (`labels remove -junk`, `retrain --label -junk`) then read it as an option.
    from tests.conftest import label_folders

    root = label_folders(tmp_path / "examples", count=4)
    (root / "healthy").rename(root / "-healthy")
    line = one_line_error(run("make-updatable", pt_model, "--examples", root), "-healthy")
    assert "cannot begin with '-'" in line, line
    assert "--examples" in line, line
    assert not list(models_dir.glob("base-*"))  # nothing was made
