"""The `luncher` process as a whole: how it ends, and what a piped retrain loads."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

from healthyluncher import __version__
from healthyluncher.cli_output import escape, printable

# pip's console script (`sys.exit(run())` at the top level of the main module), with an
# object in a module's namespace, whose __del__ only Python's finalization calls.
SCRIPT = """
import os
import sys
import types


class Finalized:
    def __del__(self, write=os.write):  # the module's `os` may be gone by then
        write(2, b"finalized\\n")


sys.modules["holder"] = types.ModuleType("holder")
sys.modules["holder"].kept = Finalized()
sys.argv = ["luncher", *sys.argv[1:]]
from _healthyluncher_entry import run
"""


def script(*args: str, call: str = "sys.exit(run())") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", SCRIPT + call + "\n", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_the_luncher_process_ends_with_the_command_not_with_pythons_finalization():
    """Python's finalization took apart every module and object typer, numpy and ONNX
    Runtime made, and ran ONNX Runtime's C++ destructors: about 20 ms of every command,
    after its output was complete. The process now ends as the command does, with its
    status and its output flushed."""
    done = script("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"luncher (healthyluncher) {__version__}\n"
    assert "finalized" not in done.stderr
    usage = script("retrain")  # a usage error: click's status 2 and its message
    assert usage.returncode == 2 and "Missing argument" in usage.stderr, usage.stderr
    assert "finalized" not in usage.stderr
    failed = script("predict", "/nonexistent/photo.jpg")
    assert failed.returncode == 1 and failed.stderr.startswith("error:"), failed.stderr
    assert "finalized" not in failed.stderr


def test_what_c_libraries_wrote_through_stdio_is_flushed_before_the_process_ends():
    """Ending without Python's finalization skips C's exit too, which flushes stdio."""
    call = "import ctypes\nctypes.CDLL(None).printf(b'from C\\n')\nsys.exit(run())"
    done = script("--version", call=call)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("from C\n") or done.stdout.endswith("from C\n"), done.stdout


def test_a_program_that_calls_the_entry_point_from_a_function_goes_on():
    """Only pip's script (a call at the top level of the main module) is luncher's own
    process: a program that calls `run` from a function of its own exits in its own way."""
    call = (
        "def main():\n"
        "    try:\n"
        "        run()\n"
        "    except SystemExit as done:\n"
        "        print('status', done.code)\n"
        "    sys.exit(3)\n"
        "main()"
    )
    done = script("--version", call=call)
    assert done.returncode == 3, done.stderr
    assert done.stdout.endswith("status 0\n")
    assert "finalized" in done.stderr


def test_escape_is_richs_markup_escape():
    """The markup escape of cli_output, without rich, is rich's own, character for
    character."""
    from rich.markup import escape as rich_escape

    texts = ["".join(t) for n in range(7) for t in itertools.product("[]\\a/", repeat=n)]
    rng = random.Random(0)
    alphabet = "[]\\/a#@ bZ1=:\n\x1b"
    texts += ["".join(rng.choices(alphabet, k=rng.randint(0, 24))) for _ in range(20000)]
    texts += ["[bold]x[/bold]", "C:\\photos\\", "a\\[red]b", "[#ff0000]", "[@click]", "x [1] y"]
    for text in texts:
        assert escape(text) == rich_escape(printable(text)), repr(text)


def test_a_piped_retrain_never_imports_rich_nor_from_the_cache_pillow(run, pt_model, photos):
    """Piped, a retrain prints plain text: rich (about 15 ms) was imported for the markup
    escape of its last line alone. A retrain of cached photos decodes none, but imported
    Pillow's package to ask whether it decodes AVIF."""
    assert run("make-updatable", pt_model).code == 0
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['luncher', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('healthyluncher', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print('RICH', 'rich' in sys.modules, 'PIL', 'PIL' in sys.modules, file=sys.stderr)\n"
    )
    for label in ("healthy", "fast_food"):  # the photos' first retrain, then from the cache
        args = ["retrain", "--label", label, *map(str, photos["red"])]
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-500:]
        assert "Trained" in done.stdout, done.stdout
        assert "RICH False" in done.stderr, done.stderr[-300:]
    assert "3 photo(s) came from the cache" in done.stdout, done.stdout
    assert "PIL False" in done.stderr, done.stderr[-300:]


def test_the_collector_is_off_while_luncher_starts_and_on_for_the_command(pt_model, run):
    """While typer's, numpy's and ONNX Runtime's modules loaded, the garbage collector went
    over their objects some 70 times and found nothing: ~10 ms of every command. In
    luncher's own process it is off until the command starts, then on again."""
    assert run("make-updatable", pt_model).code == 0
    probe = (
        "import gc, sys\n"
        "import healthyluncher.api as api\n"
        "from healthyluncher.__main__ import run\n"
        "runs = [0]\n"
        "def count(phase, info):\n"
        "    runs[0] += phase == 'start'\n"
        "gc.callbacks.append(count)\n"
        "quiet = api.quiet_default_logger\n"
        "def starting():\n"
        "    print('AT START', runs[0], gc.isenabled(), file=sys.stderr)\n"
        "    quiet()\n"
        "api.quiet_default_logger = starting\n"
        "sys.argv = ['luncher', 'status', '--json']\n"
        "runs[0] = 0\n"
        "try:\n"
        "    run(own_process=True)\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print('AFTER', gc.isenabled(), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert "AT START 0 False" in done.stderr and "AFTER True" in done.stderr, done.stderr
