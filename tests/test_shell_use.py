"""The command as shell scripts and people at a terminal use it: signals, streams, encodings."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import unicodedata
from pathlib import Path

import pytest

import healthyluncher
from healthyluncher.store import Files, ModelStore
from tests.conftest import answered_at_a_terminal, one_line_error, solid
from tests.test_conventions import luncher

# Runs `luncher ARGS...` with MODULE.NAME replaced by a function that touches READY and
# sleeps: the command is then stopped at a known point, with its work half done.
PAUSED = """
import importlib, sys, time
from pathlib import Path

module, name, ready = sys.argv[1:4]

def paused(*args, **kwargs):
    Path(ready).touch()
    time.sleep(60)

setattr(importlib.import_module(module), name, paused)
sys.argv = ["luncher", *sys.argv[4:]]
from healthyluncher.__main__ import run

run()
"""


def _stopped(where: str, ready: Path, how: signal.Signals, *args: str) -> tuple[int, str, str]:
    module, name = where.rsplit(".", 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED, module, name, str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate()
    proc.send_signal(how)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _hidden(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith(".s"))


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize(
    ("command", "where"),
    [
        (("retrain", "--label", "healthy"), "healthyluncher.personal.fit"),
        (("import", "--json"), "healthyluncher.backup._restore"),
    ],
    ids=["retrain", "import"],
)
def test_sigterm_stops_a_command_as_ctrl_c_does(
    command, where, run, pt_model, photos, models_dir, tmp_path
):
    """`timeout 60 luncher retrain ...` or a `kill`: SIGTERM ended the process where it
    stood, silently (exit -15), leaving a `.staging-*` directory, or for an import a
    `.scratch-*` full of the user's thumbnails, behind. It now unwinds as Ctrl-C does:
    one line, exit 143 (128 + 15), nothing left behind."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    archive = tmp_path / "b.tar.gz"
    assert run("export", archive).code == 0
    if command[0] == "import":
        assert run("reset").code == 0  # the backup is not in use, so the import restores it
    state = (models_dir / "state.json").read_bytes()
    target = [str(archive)] if command[0] == "import" else [str(p) for p in photos["green"]]
    code, out, err = _stopped(where, tmp_path / "ready", signal.SIGTERM, *command, *target)
    assert code == 128 + signal.SIGTERM, (code, out, err)
    assert err == "terminated: the models directory was not changed\n"
    if "--json" in command:
        assert json.loads(out) == {"error": "terminated: the models directory was not changed"}
    assert _hidden(models_dir) == [] and (models_dir / "state.json").read_bytes() == state


def test_an_unexpected_error_is_json_too_with_json(run, pt_model, photos, monkeypatch):
    """With --json, a bug's one-line error reached stderr only: a script reading stdout got
    nothing at all, where the README promises one `{"error": ...}` object."""
    assert run("make-updatable", pt_model).code == 0
    import healthyluncher.predictor as predicting

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(predicting.Predictor, "predict", boom)
    result = run("predict", "--json", photos["red"][0])
    line = one_line_error(result, "disk on fire")
    assert result.json_lines() == [{"error": line.removeprefix("error: ")}]


def test_json_is_valid_utf8_for_a_file_name_that_is_not(pt_model, tmp_path, models_dir):
    """A file name that is not UTF-8 (`caf\\xe9.png` from an old Latin-1 camera card) was
    written into the JSON as the raw byte: the line was not UTF-8, and `json.loads` of the
    output failed. It is now a \\udcXX escape, which Python turns back into the bytes."""
    if sys.platform == "darwin" or os.name == "nt":
        pytest.skip("file names are always Unicode here")
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    folder = tmp_path / "card"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    solid(folder / name, (200, 30, 40))
    proc = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "predict", "--json", str(folder)],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert os.fsencode(row["path"]) == os.fsencode(str(folder / name))


def test_plain_columns_line_up_with_wide_characters(run, pt_model, tmp_path, monkeypatch):
    """Piped, columns were padded by character count: a name in CJK (two columns a
    character on every terminal and editor) pushed its row's label out of line."""
    assert run("make-updatable", pt_model).code == 0
    monkeypatch.chdir(tmp_path)
    solid(tmp_path / "弁当の写真.png", (200, 30, 40))
    solid(tmp_path / "lunch-photo-1.png", (30, 200, 40))
    result = run("predict", "弁当の写真.png", "lunch-photo-1.png")
    assert result.code == 0, result
    header, *lines = result.stdout.splitlines()[1:]

    def label_column(line: str) -> int:
        photo, label = re.split("  +", line)[:2]
        before = line[: line.index(label, len(photo))]
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in before)

    assert [label_column(line) for line in lines] == [header.index("label")] * 2, lines


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_file_of_a_few_bytes_is_not_an_image_not_a_struct_error(run, pt_model, tmp_path, size):
    """A file of 1 to 3 bytes named .png was refused with Python's own words from inside a
    Pillow plugin: 'unpack_from requires a buffer of at least 4 bytes ...'."""
    assert run("make-updatable", pt_model).code == 0
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(b"abc"[:size])
    line = one_line_error(run("predict", tiny), "tiny.png")
    assert line.endswith("not an image file Pillow can read"), line


def test_no_base_model_names_the_models_directory_it_looked_in(run, photos, tmp_path):
    """`luncher --models-dir ~/luncher-modles status` said 'there is no base model yet'
    without saying where it looked, so the typo went unnoticed."""
    elsewhere = tmp_path / "luncher-modles"
    for command in (("status",), ("predict", str(photos["red"][0]))):
        one_line_error(run("--models-dir", elsewhere, *command), str(elsewhere), "make-updatable")


def test_the_command_that_sets_up_a_base_names_the_models_directory(
    run, photos, pt_model, tmp_path
):
    """`luncher --models-dir X predict` on an empty X said to run `luncher make-updatable
    MODEL.onnx`, which, followed as written, set up the default models directory instead."""
    elsewhere = (tmp_path / "my models").resolve()
    line = one_line_error(run("--models-dir", elsewhere, "predict", photos["red"][0]))
    command = re.fullmatch(r"error: there is no base model in .* yet: run `(.*)`", line)
    assert command, line
    assert command[1] == f"luncher --models-dir '{elsewhere}' make-updatable MODEL.onnx"
    _, *args = [pt_model if arg == "MODEL.onnx" else arg for arg in shlex.split(command[1])]
    assert run(*args).code == 0  # as written
    assert run("--models-dir", elsewhere, "predict", photos["red"][0]).code == 0
    # Chosen by $LUNCHER_MODELS_DIR, which is still set: the bare command is right.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNCHER_MODELS_DIR", str(tmp_path / "other"))
        line = one_line_error(run("predict", photos["red"][0]))
    assert line.endswith("yet: run `luncher make-updatable MODEL.onnx`"), line


def _suggested(result: object, elsewhere: Path, **placeholders: Path) -> list[str]:
    """The `luncher ...` command a one-line error suggests first, as arguments with its
    placeholders (MODEL.onnx, DIR) filled in; it must name the models directory."""
    line = one_line_error(result)
    command, *_ = re.findall(r"`(luncher [^`]*)`", line)
    assert command.startswith(f"luncher --models-dir {shlex.quote(str(elsewhere))} "), line
    fill = {name.replace("_", "."): str(path) for name, path in placeholders.items()}
    return [fill.get(word, word) for word in shlex.split(command)[1:]]


@pytest.mark.parametrize("damaged", ["frozen part", "base model"])
def test_the_hint_to_make_a_damaged_base_again_names_the_models_directory(
    damaged, run, pt_model, photos, tmp_path
):
    """With X's base damaged, `luncher --models-dir X retrain` (or `predict --base`) said
    to run `luncher make-updatable MODEL.onnx --keep-personalization`: followed as written,
    it set up the default models directory, and X stayed damaged."""
    elsewhere = (tmp_path / "my models").resolve()
    at = ("--models-dir", elsewhere)
    assert run(*at, "make-updatable", pt_model).code == 0
    assert run(*at, "retrain", "--label", "fast_food", photos["red"][0]).code == 0
    base = ModelStore(elsewhere).base_dir()
    assert base is not None
    if damaged == "frozen part":
        (base / Files.FROZEN).write_bytes(b"torn")
        command = ("retrain", "--label", "fast_food", str(photos["red"][1]))
    else:
        (base / Files.MODEL).write_bytes(b"torn")
        command = ("predict", "--base", str(photos["red"][1]))
    args = _suggested(run(*at, *command), elsewhere, MODEL_onnx=pt_model)
    assert args[-1] == "--keep-personalization", args
    assert run(*args).code == 0  # as written: X's base made again, its example kept
    assert run(*at, "status", "--json").json_lines()[0]["examples_per_label"] == {"fast_food": 1}
    assert run(*at, *command).code == 0


def test_the_hint_to_make_a_base_with_your_labels_names_the_models_directory(
    run, pt_model, photos, tmp_path, monkeypatch
):
    """`luncher --models-dir X labels rename healthy salad` (a label of the base) said to
    make a base with `luncher make-updatable MODEL.onnx --examples DIR`: followed as
    written, that base went to the default models directory, not to X."""
    monkeypatch.setenv("LUNCHER_BUNDLED_MODEL", str(pt_model))  # X starts as the shipped base
    elsewhere = (tmp_path / "my models").resolve()
    lunches = tmp_path / "lunches"
    for label, colour in (("salad", "green"), ("fast_food", "red")):
        (lunches / label).mkdir(parents=True)
        for photo in photos[colour]:
            (lunches / label / photo.name).write_bytes(photo.read_bytes())
    result = run("--models-dir", elsewhere, "labels", "rename", "healthy", "salad")
    args = _suggested(result, elsewhere, MODEL_onnx=pt_model, DIR=lunches)
    assert run(*args).code == 0  # as written
    labels = run("--models-dir", elsewhere, "status", "--json").json_lines()[0]["labels"]
    assert sorted(labels) == ["fast_food", "salad"]
    # Chosen by $LUNCHER_MODELS_DIR, which is still set: the bare command is right.
    monkeypatch.setenv("LUNCHER_MODELS_DIR", str(elsewhere))
    line = one_line_error(run("labels", "rename", "fast_food", "burgers"))
    assert "`luncher make-updatable MODEL.onnx --examples DIR --force`" in line, line


@pytest.mark.parametrize("command", ["export", "import"])
def test_a_dash_for_a_backup_is_refused_not_taken_as_a_file_named_dash(
    command, run, pt_model, tmp_path, monkeypatch
):
    """`luncher export - | ssh ...` wrote a file named '-' in the current directory (and
    `import -` read one): everywhere else in luncher, and in tar, `-` is a stream."""
    assert run("make-updatable", pt_model).code == 0
    monkeypatch.chdir(tmp_path)
    result = run(command, "-")
    assert result.code == 2 and "a file name" in result.stderr, result
    assert not (tmp_path / "-").exists()


def test_export_refuses_a_name_that_says_another_format(run, pt_model, photos, tmp_path):
    """`luncher export b.zip` wrote a gzip-compressed tar under the name of a zip (unzip
    refuses it); `b.tar` one that tar without -z mistakes. A backup is what import reads, a
    .tar.gz: any other name is now a usage error that names the endings it takes, and
    nothing is written. The API refuses it the same way, in one line."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    folder = tmp_path / "out"
    folder.mkdir()
    lun = healthyluncher.open()
    for name in ("b.zip", "b.tar", "b.tar.bz2", "lunch.jpg", "backup"):
        result = run("export", folder / name)
        assert result.code == 2, result
        [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert f"{name}: " in line and ".tar.gz or .tgz" in line, line
        assert "Traceback" not in result.stderr
        with pytest.raises(healthyluncher.LuncherError, match=r"ending in \.tar\.gz or \.tgz$"):
            lun.export_backup(folder / name)
    proc = luncher("export", "--json", str(folder / "b.zip"))
    assert proc.returncode == 2 and ".tar.gz or .tgz" in json.loads(proc.stdout)["error"]
    assert list(folder.iterdir()) == []
    for name in ("b.tgz", "B.TAR.GZ"):  # what the name says: import reads it back
        assert run("export", folder / name).code == 0
        with tarfile.open(folder / name, "r:gz") as tar:
            assert "manifest.json" in tar.getnames()
        assert run("import", folder / name).code == 0


def test_questions_go_to_the_terminal_not_into_the_json(run, pt_model, photos):
    """`luncher reset --json | jq` at a terminal: the question was printed on stdout, into
    jq (a parse error), and the person never saw it."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    code, out, err = answered_at_a_terminal(b"y\n", "reset", "--json")
    assert code == 0, err
    assert "Predict with the base model again" in err.decode()
    assert json.loads(out)["removed_model"] is True


@pytest.mark.parametrize(
    ("answer", "purge", "says"),
    [
        (b"n\n", False, "Nothing was changed: you answered no."),
        (b"n\n", True, "Nothing was changed: you answered no."),
        (b"\x04", False, "Aborted!"),  # Ctrl-D: no answer at all
    ],
    ids=["no", "purge", "eof"],
)
def test_a_declined_reset_is_one_json_object_with_json(answer, purge, says, run, pt_model, photos):
    """`luncher reset --json` answered no at a terminal exited 1 with nothing on stdout
    (and Ctrl-D printed `Aborted!` alone): a script reading the JSON got no object, where
    every other exit with --json prints one. It is now `{"error": ...}`, the line on
    stderr, with exit code 1 as before: nothing was done that was asked for."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    command = ("reset", "--json", *["--purge"] * purge)
    code, out, err = answered_at_a_terminal(answer, *command)
    assert code == 1, (code, out, err)
    [line] = out.decode().splitlines()
    assert json.loads(line) == {"error": says}
    assert err.decode().rstrip().endswith(says), err
    assert "Traceback" not in err.decode()
    assert run("status", "--json").json_lines()[0]["predicting_with"] == "personalized"


def test_help_lists_the_commands_in_the_order_they_are_used():
    """`luncher --help` listed make-updatable, export, import and examples before predict
    and retrain: the order the modules happened to be imported in."""
    result = luncher("--help")
    listed = [
        line.split()[0]
        for line in result.stdout.split("Commands:")[1].splitlines()
        if line.startswith("  ")
    ]
    assert listed[:3] == ["predict", "retrain", "undo"]
    assert listed[-1] == "repair" and len(listed) == len(set(listed)) == 12


@pytest.mark.parametrize(
    "command",
    [
        *[(c,) for c in ("make-updatable", "export", "import", "predict", "retrain")],
        *[(c,) for c in ("reset", "repair", "undo", "forget", "status", "examples", "labels")],
        ("labels", "rename"),
        ("labels", "remove"),
    ],
    ids=" ".join,
)
def test_every_command_and_subcommand_has_help_with_an_example_that_parses(command):
    """`luncher labels --help` had no example, where the README promises one for every
    command. Each example must also parse as written (`--help` appended shows it does)."""
    result = luncher(*command, "--help")
    assert result.returncode == 0
    [example] = [line for line in result.stdout.splitlines() if "Example: luncher" in line]
    words = example.split("Example: luncher ")[1].split()
    assert words[: len(command)] == list(command), example
    assert luncher(*words, "--help").returncode == 0


def test_the_help_of_views_says_what_a_retrain_does():
    """`retrain --help` said the default was '1 from 16 photos on': with 32 views a retrain,
    16 photos get 2 views each, and a photo is its own single view from 17 photos on, as the
    README says."""
    from healthyluncher.settings import Hyperparameters

    text = " ".join(luncher("retrain", "--help").stdout.split())
    hp = Hyperparameters()
    assert f"{hp.view_budget} per retrain" in text and f"up to {hp.augment_views} each" in text
    first_single = next(n for n in range(1, 1000) if hp.views_for(n) == 1)
    assert f"1 from {first_single} photos on" in text


def test_the_help_of_forget_says_a_digest_or_thumbnail_will_do():
    """The README's `luncher forget PHOTO_OR_DIGEST...` forgets a photo whose file is gone by
    its digest or thumbnail; `forget --help` said only "Photos, or directories to search"."""
    text = " ".join(luncher("forget", "--help").stdout.split())
    assert "PHOTO_OR_DIGEST..." in text
    assert "digest (8 or more hex digits) or thumbnail" in text


def _with_closed(fd: int, *args: object) -> subprocess.CompletedProcess[str]:
    """`luncher ARGS` as `luncher ARGS >&-` (fd 1) or `<&-` (fd 0) runs it: Python then
    has None for sys.stdout or sys.stdin."""
    stream = {0: "<&-", 1: ">&-"}[fd]
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {stream}', "sh", sys.executable, "-m", "healthyluncher"]
        + [str(a) for a in args],
        stdin=subprocess.DEVNULL if fd != 0 else None,
        stdout=subprocess.PIPE if fd != 1 else None,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )


@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell closes the stream")
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_closed_standard_output_is_one_line_before_anything_changes(
    as_json, run, pt_model, photos, models_dir
):
    """`luncher retrain ... >&-` retrained and saved, then said `unexpected AttributeError:
    'NoneType' object has no attribute 'isatty'` (with --json: a traceback) and exit 1, so a
    script took the saved change for a failure. Now: one line, exit 1, nothing changed."""
    assert run("make-updatable", pt_model).code == 0
    state = (models_dir / "state.json").read_bytes()
    json_flag = ["--json"] if as_json else []
    for args in (
        ["retrain", "--label", "healthy", photos["red"][0]],
        ["predict", photos["red"][0]],
        ["status"],
    ):
        done = _with_closed(1, *args, *json_flag)
        assert done.returncode == 1, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
        assert "standard output is closed" in lines[0]
    assert (models_dir / "state.json").read_bytes() == state


@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell closes the stream")
def test_a_closed_standard_input_reads_as_an_empty_one(run, pt_model, photos):
    """`luncher predict - <&-` said `unexpected TypeError: 'NoneType' object is not
    iterable`; `luncher reset <&-` asked sys.stdin (None) whether it is a terminal. A
    closed standard input is now an empty one, as in a script."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", photos["red"][0]).code == 0
    done = _with_closed(0, "predict", "-")
    assert done.returncode == 2 or done.returncode == 1, done
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = _with_closed(0, "reset")
    assert done.returncode == 0, done
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr, done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "args",
    [
        ("predict", "P"),
        ("predict", "--json", "P"),
        ("status", "--json"),
        ("--help",),
        ("--version",),
    ],
    ids=["predict", "predict-json", "status-json", "help", "version"],
)
def test_output_to_a_full_disk_is_one_line(args, run, pt_model, photos, models_dir):
    """`luncher predict photos/ > results.txt` on a full disk: `unexpected OSError` (with
    --json, --help or --version: a traceback, the JSON error failing in its turn). Now one
    line that says the output could not be written, exit 1."""
    assert run("make-updatable", pt_model).code == 0
    argv = [str(photos["red"][0]) if a == "P" else a for a in args]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "healthyluncher", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: cannot write to standard output: No space left on device"], done


def test_output_lost_at_the_last_flush_is_told_once(monkeypatch, capsys):
    """On Python 3.14, `luncher --version > /dev/full` failed at main's last flush (older
    Pythons let click swallow it) and said 'cannot write to standard output' twice: the
    SystemExit of the first telling passed the handler that records the exit code."""
    import errno
    import io

    from healthyluncher import cli_app, cli_streams

    class Full(io.StringIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self) -> int:
            raise io.UnsupportedOperation("no descriptor")

    monkeypatch.setattr(sys, "stdout", cli_streams.Output(Full()))
    monkeypatch.setattr(cli_app, "guard_streams", lambda: None)
    monkeypatch.setattr(cli_app, "stop_on_signals", lambda: None)
    monkeypatch.setattr(cli_app, "_run_app", lambda: print("luncher 0.1.0"))  # buffered
    with pytest.raises(SystemExit) as done:
        cli_app.main()
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: cannot write to standard output: No space left on device\n"


@pytest.mark.skipif(os.name == "nt", reason="a POSIX account without a home")
@pytest.mark.parametrize("where", [None, "~/luncher"], ids=["default", "tilde"])
def test_no_home_directory_is_one_line_naming_what_to_set(
    where, run, monkeypatch, photos, tmp_path
):
    """A container's user (`docker run --user 1000`, systemd's DynamicUser) has no HOME and
    no passwd entry: the default models directory, or `~` in LUNCHER_MODELS_DIR, was
    `unexpected RuntimeError: Could not determine home directory.`"""
    import pwd

    import healthyluncher

    def no_entry(uid: int) -> object:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for name in ("HOME", "XDG_DATA_HOME", "LUNCHER_MODELS_DIR"):
        monkeypatch.delenv(name, raising=False)
    if where is not None:
        monkeypatch.setenv("LUNCHER_MODELS_DIR", where)
    line = one_line_error(run("status"), "home directory", "--models-dir", "LUNCHER_MODELS_DIR")
    assert "unexpected" not in line
    with pytest.raises(healthyluncher.LuncherError, match="home directory"):
        healthyluncher.open()
    # A models directory given is used, and named in the advice to set up a base there.
    result = run("--models-dir", tmp_path / "models", "predict", photos["red"][0])
    line = one_line_error(result, "no base model", f"--models-dir {tmp_path / 'models'}")
    assert "home directory" not in line


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "cp1252"])
def test_output_in_a_legacy_encoding_escapes_what_it_cannot_encode(
    encoding, run, pt_model, tmp_path
):
    """Windows writes redirected output in its ANSI code page (cp1252), and a C locale
    without UTF-8 mode writes ASCII: a photo named 寿司.jpg or a label `café` was
    'unexpected UnicodeEncodeError' (with --json too). What the encoding lacks is written
    as a \\uXXXX escape now, which JSON reads back as the character itself."""
    assert run("make-updatable", pt_model, "--labels", "café,fast_food").code == 0
    photo = solid(tmp_path / "寿司 🍣.jpg", (200, 30, 40))
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    for args in (["predict", str(photo)], ["status"], ["labels"]):
        done = subprocess.run(
            [sys.executable, "-m", "healthyluncher", *args],
            capture_output=True,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done
        assert b"\\u5bff\\u53f8" in done.stdout or args[0] != "predict", done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "predict", "--json", str(photo)],
        capture_output=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done
    [line] = done.stdout.decode(encoding).splitlines()
    assert json.loads(line)["path"] == str(photo)
    assert set(json.loads(line)["probabilities"]) == {"café", "fast_food"}
    missing = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "predict", str(tmp_path / "寿司2.jpg")],
        capture_output=True,
        env=env,
        check=False,
    )
    assert missing.returncode == 1 and b"unexpected" not in missing.stderr, missing
    assert missing.stderr.count(b"\n") == 1 and b"\\u5bff" in missing.stderr, missing


def test_ctrl_c_while_onnx_runtime_loads_is_an_interruption(run, pt_model, photos, monkeypatch):
    """Ctrl-C (or `timeout`'s SIGTERM) while onnxruntime's extension initializes comes out
    of the import as ImportError('initialization failed') caused by KeyboardInterrupt: it
    said 'ONNX Runtime cannot be imported (initialization failed)', as if it were broken."""
    import builtins

    assert run("make-updatable", pt_model).code == 0
    real_import = builtins.__import__

    def interrupted(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise ImportError("initialization failed") from exc
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr(builtins, "__import__", interrupted)
    result = run("predict", photos["red"][0])
    assert result.code == 130 and result.stderr == "interrupted\n", result
