"""The `luncher` process as a whole: what a piped retrain loads."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

from healthyluncher.cli_output import escape, printable


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


def test_a_piped_retrain_never_imports_rich(run, pt_model, photos):
    """Piped, a retrain prints plain text: rich (about 15 ms) was imported for the markup
    escape of its last line alone."""
    assert run("make-updatable", pt_model).code == 0
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['luncher', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('healthyluncher', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print('RICH', 'rich' in sys.modules, file=sys.stderr)\n"
    )
    for label in ("healthy", "fast_food"):  # the photos' first retrain, then from the cache
        args = ["retrain", "--label", label, *map(str, photos["red"])]
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-500:]
        assert "Trained" in done.stdout, done.stdout
        assert "RICH False" in done.stderr, done.stderr[-300:]
